"""The IR text form: print -> parse -> print round trips, parse errors carry line numbers, and a
fuzzer (random text, and random edits of a valid printed graph) never gets anything but IRError
out of the parser."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isthmus.compiler import ir_text
from isthmus.compiler.ir import Graph, verify
from isthmus.compiler.ir_text import parse_graph, print_graph
from isthmus.compiler.ops import OPS, OpDef
from isthmus.compiler.quant import quantize
from isthmus.errors import IRError


def weights_of(g: Graph) -> dict:
    return {v.name: v.data for v in g.constants}


def roundtrip(g: Graph) -> Graph:
    """print -> parse -> print gives the same text; returns the parsed graph."""
    text = print_graph(g)
    g2 = parse_graph(text, weights=weights_of(g))
    assert print_graph(g2) == text
    return g2


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- graphs to print -------------------------------------------------------------------------------

def llama_like_graph() -> Graph:
    """Symbolic dims, quoted names, external and quantized weights, a KV-cache concat, locations."""
    g = Graph('model/"v2" layers')
    ids = g.add_input("input ids", ("batch", "seq"), "i64")
    pos = g.add_input("pos/ids", ("batch", "seq"), "i64")
    past = g.add_input("past key", ("batch", 2, "past", 8), "f32")
    emb = g.add_constant("token_embd.weight", np.arange(61 * 32, dtype=np.float32).reshape(61, 32) / 100)
    wq = g.add_constant("blk.0/attn q", quantize(np.linspace(-1, 1, 16 * 32, dtype=np.float32).reshape(16, 32), "q4_1"))
    x = g.add("embedding", [emb, ids], name="layers/0/embed", source="token_embd")
    q = g.add("linear", [x, wq], name="q proj", source='blk.0 "attn_q"\n')
    q = g.add("reshape", [q], {"shape": [0, 0, 2, 8]})
    q = g.add("transpose", [q], {"perm": [0, 2, 1, 3]})
    q = g.add("rope", [q, pos], {"theta": 500000.0, "layout": "interleaved"})
    kv = g.add("concat", [past, q], {"axis": 2}, name="present")
    a = g.add("attention", [q, kv, kv], {"causal": True, "scale": 0.125})
    s = g.add("slice", [kv], {"starts": [0], "ends": [5], "axes": [2]}, name="window")
    g.set_outputs([a, kv, s])
    verify(g)
    return g


def literal_graph() -> Graph:
    """Inline literals of every plain type, with the awkward values."""
    g = Graph("literals")
    x = g.add_input("x", (), "f32")
    consts = [
        g.add_constant("f32", np.array([np.nan, np.inf, -np.inf, -0.0, 0.1, 1e-45, 3.4028235e38, -1.5], np.float32)),
        g.add_constant("f16", np.array([65504, -0.0, np.nan, 6e-8, 0.1, -np.inf], np.float16)),
        g.add_constant("f64", np.array([1 / 3, 1e300, -5e-324, np.nan], np.float64)),
        g.add_constant("i64", np.array([-(2**63), 2**63 - 1, 0, -1], np.int64)),
        g.add_constant("i32", np.array([[-(2**31), 2**31 - 1], [7, -7]], np.int32)),
        g.add_constant("i8", np.array([-128, 127], np.int8)),
        g.add_constant("u8", np.array([0, 255], np.uint8)),
        g.add_constant("bool", np.array([[True], [False]])),
        g.add_constant("scalar", np.float32(-0.0) * np.ones((), np.float32)),
        g.add_constant("empty", np.zeros((2, 0), np.float32)),
        g.add_constant("big", np.arange(17, dtype=np.float32)),     # past ir.SMALL_LITERAL: external
    ]
    y = g.add("mul", [x, consts[8]])
    g.set_outputs([y] + consts)
    verify(g)
    return g


@pytest.fixture
def probe_op(monkeypatch):
    """A test-only op whose attributes may be anything printable (nested lists, strings, None)."""
    op = OpDef("test.probe", rule=lambda types, attrs: [types[0], types[0]], reference=None,
               attrs={"nested": None, "text": "", "none": 0, "flag": False, "f": 0.0, "i": 0}, num_inputs=(1, 2))
    monkeypatch.setitem(OPS, "test.probe", op)
    return op


def test_roundtrip_llama_like_graph():
    g = llama_like_graph()
    g2 = roundtrip(g)
    assert [v.type for v in g2.values()] == [v.type for v in g.values()]
    assert [(n.op, n.attrs, n.source) for n in g2.nodes] == [(n.op, n.attrs, n.source) for n in g.nodes]
    assert g2.name == g.name and g2.inputs[0].name == "input ids"
    text = print_graph(g)
    assert '%"input ids": i64[batch, seq]' in text
    assert "past+seq" in text and '"seq[0:5]"' not in text and 'f32[batch, 2, "past+seq[0:5]", 8]' in text
    assert "const %\"blk.0/attn q\": q4_1[16, 32] = external" in text


def test_roundtrip_literals_bit_exact():
    g = literal_graph()
    g2 = roundtrip(g)
    for a, b in zip(g.constants, g2.constants):
        assert same_bits(np.asarray(a.data), np.asarray(b.data)), a.name
    text = print_graph(g)
    assert "[nan, inf, -inf, -0.0," in text
    assert "const %i64: i64[4] = [-9223372036854775808, 9223372036854775807, 0, -1]" in text
    assert "const %bool: bool[2, 1] = [[true], [false]]" in text
    assert "const %big: f32[17] = external" in text


def test_roundtrip_multi_output_nodes_and_attribute_values(probe_op):
    g = Graph("attrs")
    x = g.add_input("x", (2, 3), "f32")
    attrs = {"nested": [[1, [2.5, -0.0]], [], ["a", None, True]], "text": 'quote " slash \\ nl \n tab \t é',
             "none": None, "flag": True, "f": -math.inf, "i": -(2**70)}
    a, b = g.add("test.probe", [x, x], attrs, name="pair")
    c, d = g.add("test.probe", [a], {"f": math.nan, "text": "", "nested": []})
    e = g.add("split", [b], {"axis": 1, "sizes": [1, 2]}, name="s")
    g.set_outputs([c, d, *e])
    verify(g)
    g2 = roundtrip(g)
    assert g2.nodes[0].attrs == attrs
    assert math.isnan(g2.nodes[1].attrs["f"])
    assert [v.name for v in g2.nodes[0].outputs] == ["pair.0", "pair.1"]
    assert "%pair.0: f32[2, 3], %pair.1: f32[2, 3] = test.probe(%x, %x)" in print_graph(g)


def test_roundtrip_empty_and_odd_graphs():
    g = Graph("")
    g.set_outputs([])
    roundtrip(g)
    g = Graph("passthrough")
    x = g.add_input("", ("", "a b", "3", "?"), "bool")   # names and dims that need quoting
    g.set_outputs([x, x])
    g2 = roundtrip(g)
    assert g2.inputs[0].shape == ("", "a b", "3", "?") and g2.outputs == [g2.inputs[0]] * 2


def test_module_docstring_example_parses():
    doc = ir_text.__doc__
    example = doc[doc.index("graph "):doc.index("    }") + 5]
    emb = quantize(np.zeros((64, 32), np.float32), "q8_0")
    g = parse_graph(example, weights={"emb": emb})
    assert [n.op for n in g.nodes] == ["embedding", "split"]
    assert g.nodes[0].source == "token_embd" and g.constants[1].data == np.float32(1e-5)


def test_parse_accepts_comments_and_free_layout():
    text = """# a comment
    graph "g" {   # trailing comment
      input %x : f32 [ 3 ]
      %y: f32[3] = gelu( %x ) { approximate = "tanh" }
      output %y }"""
    g = parse_graph(text)
    assert g.nodes[0].attrs == {"approximate": "tanh"}
    roundtrip(g)


# -- errors ----------------------------------------------------------------------------------------

G = 'graph "g" {\n  input %x: f32[2, 3]\n'   # lines 1-2 of every bad text below
BAD_TEXTS = [   # (text, line the error names, message)
    (G + "  %y: f32[2, 3] = neg(%x) $\n  output %y\n}", 3, "unexpected character '\\$'"),
    (G + "  %y: f32[2, 3] = frobnicate(%x)\n  output %y\n}", 3, "unknown op 'frobnicate'"),
    (G + "  %y: f32[2, 3] = neg(%z)\n  output %y\n}", 3, "%z is not defined"),
    (G + "  %x: f32[2, 3] = neg(%x)\n  output %x\n}", 3, "%x is defined twice"),
    (G + "  %y: f32[3, 2] = neg(%x)\n  output %y\n}", 3, r"declared f32\[3, 2\], but neg gives f32\[2, 3\]"),
    (G + "  %y: f16[2, 3] = neg(%x)\n  output %y\n}", 3, "declared f16"),
    (G + "  %y: f32[2, 3], %z: f32[2, 3] = neg(%x)\n  output %y\n}", 3, "gives 1 outputs, 2 declared"),
    (G + "  %y: f32[2, 3] = add(%x)\n  output %y\n}", 3, "takes 2 inputs, got 1"),
    (G + "  %y: f32[2, 3] = neg(%x) {alpha=1}\n  output %y\n}", 3, "no attribute"),
    (G + "  %y: f32[3, 2] = transpose(%x) {perm=[0, 0]}\n  output %y\n}", 3, "not a permutation"),
    (G + "  %y: f32[3, 2] = transpose(%x) {perm=[1., 0]}\n  output %y\n}", 3, "invalid attributes"),
    (G + "  %y: f32[2, 3] = neg(%x) {\n  output %y\n}", 4, "expected ="),
    (G + "  const %c: f32[2] = [1.0]\n  output %x\n}", 3, "literal does not fit"),
    (G + "  const %c: u8[] = 256\n  output %x\n}", 3, "literal does not fit"),
    (G + "  const %c: i64[] = 99999999999999999999\n  output %x\n}", 3, "literal does not fit"),
    (G + "  const %c: f16[] = 1e10\n  output %x\n}", 3, "literal does not fit"),
    (G + "  const %c: f32[] = null\n  output %x\n}", 3, "numbers and true/false only"),
    (G + '  const %c: f32[] = "1"\n  output %x\n}', 3, "numbers and true/false only"),
    (G + "  const %c: f32[] = " + "[" * 100 + "\n  output %x\n}", 3, "nested"),
    (G + "  const %c: f32[40] = external\n  output %x\n}", 3, "no weight given for external constant %c"),
    (G + "  const %c: q4_0[32] = 1\n  output %x\n}", 3, "literal does not fit"),
    (G + "  input %i: f8[2]\n  output %x\n}", 3, "unknown element type 'f8'"),
    (G + "  input %i: f32[2.5]\n  output %x\n}", 3, "expected a dimension"),
    (G + "  input %i: f32[" + "9" * 5000 + "]\n  output %x\n}", 3, "too long"),
    (G + '  input %"bad \\q": f32[2]\n  output %x\n}', 3, "bad quoted value name"),
    (G + "  output %y\n}", 3, "%y is not defined"),
    (G + "  output %x\n}\nextra", 5, "text after the end"),
    (G + "  output %x\n", 3, "end of text"),
    (G + "  bogus\n}", 3, "expected input, const, a node or output"),
    ('graph "\\x" {\n}', 1, "bad string literal"),
    ("", 1, "expected graph"),
]


@pytest.mark.parametrize("text,line,message", BAD_TEXTS, ids=[m for _, _, m in BAD_TEXTS])
def test_parse_errors_name_the_line(text, line, message):
    with pytest.raises(IRError, match=rf"^IR text line {line}: .*{message}"):
        parse_graph(text)


# -- fuzzing ---------------------------------------------------------------------------------------

def fuzz_graph() -> tuple[str, dict]:
    """A small valid graph touching every grammar production, printed; plus its weights."""
    g = Graph("fuzz")
    x = g.add_input("x", ("b", 4), "f32")
    ids = g.add_input("ids id", ("b",), "i64")
    emb = g.add_constant("emb", np.arange(20 * 4, dtype=np.float32).reshape(20, 4))
    k = g.add_constant("k", np.array([1.5, -0.0, np.nan, np.inf], np.float32))
    u = g.add_constant("u", np.array([250, 3], np.uint8))
    e = g.add("embedding", [emb, ids], source="tok")
    y = g.add("add", [x, e])
    y = g.add("mul", [y, k])
    y = g.add("reshape", [y], {"shape": [0, 2, -1]})
    y = g.add("transpose", [y], {"perm": [0, 2, 1]})
    a, b = g.add("split", [y], {"axis": 1, "sizes": [1, 1]})
    s = g.add("reduce_sum", [a], {"axes": [-1], "keepdims": True})
    c = g.add("concat", [a, b], {"axis": -1})
    w = g.add("gelu", [c], {"approximate": "tanh"})
    g.set_outputs([s, w, u])
    verify(g)
    return print_graph(g), weights_of(g)


FUZZ_TEXT, FUZZ_WEIGHTS = fuzz_graph()
# Small seeds as well as the big one: the fewer places to edit, the more often an edit lands
# in the one that matters (a digit inside a u8 literal, a "." inside an axis).
FUZZ_SEEDS = [FUZZ_TEXT, """graph "lit" {
  const %a: u8[2] = [250, 3]
  const %b: i64[] = 7
  const %c: f32[2, 1] = [[1.5], [nan]]
  const %d: bool[] = true
  output %a, %b, %c, %d
}
""", """graph "attrs" {
  input %x: f32[b, 2, 3]
  %t: f32[b, 3, 2] = transpose(%x) {perm=[0, 2, 1]}
  %c: f32[b, 3, 4] = concat(%t, %t) {axis=-1}
  %r: f32[b, 1, 4] = reduce_max(%c) {axes=[1], keepdims=true}
  %s: f32[b, 1, 1], %u: f32[b, 1, 3] = split(%r) {axis=2, sizes=[1, 3]}
  output %s, %u
}
"""]
IR_ALPHABET = '%"{}[](),:=#\n \\-+.*?0123456789eEabcdfgilnopqrstux_'


def check_parser(text: str, weights=None) -> None:
    """parse_graph either succeeds or raises IRError; what it accepts prints and re-parses stably."""
    try:
        g = parse_graph(text, weights=weights)
    except IRError:
        return
    printed = print_graph(g)
    again = parse_graph(printed, weights=weights_of(g))
    assert print_graph(again) == printed


SNIPPETS = ["9", "0", "-", ".", "e", "[", "]", ",", "1e400", "99999999999999999999", "nan", "-inf", "null", "true",
            '"', '"a"', "%x", "%y", "[0, ", "q4_0", "f16", "seq", "i8"]
INTERESTING = set("0123456789[](){},=-.%:")


@st.composite
def char_edits(draw):
    """Character edits (insert, delete, replace, truncate, duplicate a line), biased toward
    digits and punctuation, where the parser's decisions are."""
    text = draw(st.sampled_from(FUZZ_SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        spots = [i for i, ch in enumerate(text) if ch in INTERESTING]
        at_spot = spots and draw(st.booleans())
        i = draw(st.sampled_from(spots)) if at_spot else draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "insert", "delete", "replace", "truncate", "duplicate"]))
        if kind == "insert":
            text = text[:i] + draw(st.sampled_from(SNIPPETS) | st.sampled_from(IR_ALPHABET)) + text[i:]
        elif kind == "delete":
            text = text[:i] + text[i + 1:]
        elif kind == "replace":
            text = text[:i] + draw(st.sampled_from(SNIPPETS) | st.characters()) + text[i + 1:]
        elif kind == "truncate":
            text = text[:i]
        else:
            lines = text.split("\n")
            j, k = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines)))
            lines.insert(k, lines[j])
            text = "\n".join(lines)
    return text


_PIECE = re.compile(r'\s+|"(?:[^"\\]|\\.)*"|-?\d[\w.+-]*|[%\w.+*?]+|\S')
NUMBERS = ["1.", "-1.", "0.", "2.", "0.5", "256", "-129", "1e400", "nan", "-inf", "99999999999999999999", "9" * 30]


def value_numbers(pieces) -> list[int]:
    """Indices of numbers that are attribute values or constant literals (not dims)."""
    out, depth, const_line, after_eq = [], 0, False, False
    for i, p in enumerate(pieces):
        if "\n" in p:
            const_line = after_eq = False
        depth += (p == "{") - (p == "}")
        const_line = const_line or p == "const"
        after_eq = after_eq or (const_line and p == "=")
        if re.match(r"-?\d", p) and (depth >= 2 or after_eq):
            out.append(i)
    return out


TOKENS = ['graph', '"g"', '{', '}', 'input', 'const', 'output', '%x', '%y', '%"a b"', ':', '=', ',', '(', ')',
          '[', ']', 'f32', 'i64', 'u8', 'q4_0', 'bool', '2', '-1', '1e400', '-inf', 'nan', 'null', 'true', '"s"',
          'external', 'loc', 'neg', 'add', 'split', 'transpose', 'perm', 'axis', 'sizes', '\n', 'seq', 'past+seq']


@st.composite
def token_edits(draw):
    """Token edits: numbers swapped for awkward ones (floats where ints belong, values out of
    range, huge), tokens replaced, dropped or repeated; whitespace kept."""
    pieces = _PIECE.findall(draw(st.sampled_from(FUZZ_SEEDS)))
    words = [i for i, p in enumerate(pieces) if not p.isspace()]
    numbers = [i for i in words if re.match(r"-?\d", pieces[i])]
    values = value_numbers(pieces)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "number", "replace", "delete", "repeat"]))
        if kind in ("value", "number") and values:
            i = draw(st.sampled_from(values if kind == "value" else numbers))
            pieces[i] = draw(st.sampled_from(NUMBERS) if draw(st.integers(0, 3)) else
                             st.integers().map(str) | st.floats().map(repr))
            continue
        i = draw(st.sampled_from(words))
        if kind == "replace":
            pieces[i] = draw(st.sampled_from(TOKENS))
        elif kind == "delete":
            pieces[i] = ""
        else:
            pieces[i] = pieces[i] + " " + pieces[i]
    return "".join(pieces)


def fuzz(examples):
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz(200)
@given(char_edits())
def test_fuzz_character_edits_of_valid_graphs(text):
    check_parser(text, FUZZ_WEIGHTS)


@fuzz(300)   # finds a crash in the unfixed parser in ~10% of examples
@given(token_edits())
def test_fuzz_token_edits_of_valid_graphs(text):
    check_parser(text, FUZZ_WEIGHTS)


@fuzz(150)
@given(st.text(alphabet=IR_ALPHABET, max_size=200) | st.text(max_size=100))
def test_fuzz_random_text(text):
    check_parser(text)


@fuzz(150)
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_fuzz_token_soup(tokens):
    """Random sequences of real tokens get deeper into the grammar than random characters."""
    check_parser('graph "g" {\n' + " ".join(tokens))
    check_parser(" ".join(tokens))


def test_fuzz_seeds_are_valid():
    for text in FUZZ_SEEDS:
        g = parse_graph(text, weights=FUZZ_WEIGHTS)
        assert print_graph(g) == text


# -- the default model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_roundtrips(default_model):
    from isthmus.compiler.passes.pipeline import run_pipeline

    g = default_model.graph
    roundtrip(g)
    roundtrip(run_pipeline(g))


def test_roundtrip_keeps_the_decoder_interface_and_verify_checks_it():
    from tiny_models import tiny_llama_model

    g = tiny_llama_model().graph
    g2 = roundtrip(g)
    assert g2.decoder == g.decoder and len(g2.decoder.kv) == 2
    assert g2.decoder.kv[1].present_value == "present_value.1"
    broken = print_graph(g).replace("present_key=%present_key.1", "present_key=%blk.1.attn")
    with pytest.raises(IRError, match="present key.*not a graph output"):
        parse_graph(broken, {v.name: v.data for v in g.constants})
    with pytest.raises(IRError, match="expected one of"):
        parse_graph(print_graph(g).replace("logits=%logits", "logit=%logits"), {v.name: v.data for v in g.constants})

"""The IR's text form: a printer and a parser that round-trip.

    graph "tiny" {
      input %ids: i64[batch, seq]
      const %emb: q8_0[64, 32] = external
      const %eps: f32[] = 1e-05
      %x: f32[batch, seq, 32] = embedding(%emb, %ids) loc "token_embd"
      %a: f32[batch, seq, 16], %b: f32[batch, seq, 16] = split(%x) {axis=-1, sizes=[16, 16]}
      output %a, %b
    }

Large constants print as `external`; `parse_graph(text, weights)` takes their arrays from
`weights` (keyed by value name). Small float/int constants print inline, exactly.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from isthmus.compiler.ir import DecoderInterface, Graph, KVLayer, Node, TensorType, Value, numpy_dtype, verify
from isthmus.errors import IRError

MAX_NESTING = 32   # attribute lists nest at most this deep (the parser recurses per level)
_BARE = re.compile(r"[A-Za-z0-9_.]+\Z")
_BARE_DIM = re.compile(r"[A-Za-z_?][A-Za-z0-9_+*?]*\Z")


# -- printing --------------------------------------------------------------------------------

def _name(v: Value) -> str:
    return "%" + (v.name if _BARE.match(v.name) else json.dumps(v.name))


def _bare(name: str) -> str:
    return name if _BARE.match(name) else json.dumps(name)


_KV_FIELDS = ("past_key", "past_value", "present_key", "present_value")


def _dim(d) -> str:
    if isinstance(d, int):
        return str(d)
    return d if _BARE_DIM.match(d) else json.dumps(d)


def _type(t: TensorType) -> str:
    return f"{t.dtype}[{', '.join(_dim(d) for d in t.shape)}]"


def _scalar(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        f = float(x)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f)
    if x is None:
        return "null"
    if isinstance(x, str):
        return json.dumps(x)
    raise IRError(f"cannot print attribute value {x!r}")


def _attr(x) -> str:
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_attr(e) for e in x) + "]"
    return _scalar(x)


def _literal(a: np.ndarray) -> str:
    return _attr(a.tolist()) if a.ndim else _scalar(a.item())


def print_graph(g: Graph) -> str:
    lines = [f"graph {json.dumps(g.name)} {{"]
    for v in g.inputs:
        lines.append(f"  input {_name(v)}: {_type(v.type)}")
    for v in g.constants:
        rhs = _literal(v.data) if v.is_small_literal else "external"
        lines.append(f"  const {_name(v)}: {_type(v.type)} = {rhs}")
    for n in g.nodes:
        outs = ", ".join(f"{_name(v)}: {_type(v.type)}" for v in n.outputs)
        ins = ", ".join(_name(v) for v in n.inputs)
        line = f"  {outs} = {n.op}({ins})"
        if n.attrs:
            line += " {" + ", ".join(f"{k}={_attr(v)}" for k, v in n.attrs.items()) + "}"
        if n.source:
            line += f" loc {json.dumps(n.source)}"
        lines.append(line)
    lines.append("  output " + ", ".join(_name(v) for v in g.outputs))
    if g.decoder is not None:
        d = g.decoder
        fields = [("input_ids", d.input_ids), ("position_ids", d.position_ids),
                  ("attention_mask", d.attention_mask), ("logits", d.logits)]
        lines.append("  decoder(" + ", ".join(f"{k}=%{_bare(n)}" for k, n in fields if n is not None) + ")")
        for c in d.kv:
            lines.append("  kv_cache(" + ", ".join(f"{k}=%{_bare(getattr(c, k))}" for k in _KV_FIELDS) + ")")
    if g.fusion is not None:       # an analysis of these nodes: printed as comments, recomputed not parsed
        from isthmus.compiler.passes.fusion import format_groups
        lines.append(f"  # fusion: {len(g.fusion)} kernel calls for {len(g.nodes)} nodes")
        lines += ["  # " + line for line in format_groups(g.fusion).splitlines()]
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- parsing ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|-inf\b)
  | (?P<word>[A-Za-z_?][A-Za-z0-9_.+*?]*)
  | (?P<val>%(?:[A-Za-z0-9_.]+|"(?:[^"\\]|\\.)*"))
  | (?P<punct>[()\[\]{},:=])
""", re.VERBOSE)


class _Parser:
    def __init__(self, text: str):
        self.toks: list[tuple[str, str, int]] = []
        pos, line = 0, 1
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise IRError(f"IR text line {line}: unexpected character {text[pos]!r}")
            kind = m.lastgroup
            if kind != "ws":
                self.toks.append((kind, m.group(), line))
            line += m.group().count("\n")
            pos = m.end()
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("eof", "", self.toks[-1][2] if self.toks else 1)

    def error(self, msg: str, at: int | None = None):
        """Raise IRError at the current token, or at token index `at` (a statement's start)."""
        kind, text, line = self.peek() if at is None else self.toks[at]
        raise IRError(f"IR text line {line}: {msg} (at {text or 'end of text'!r})")

    def integer(self, text: str) -> int:
        try:
            return int(text)
        except ValueError:   # past Python's limit on digits in an int literal
            self.error("integer literal too long")

    def next(self, kind=None, text=None):
        tok = self.peek()
        if (kind and tok[0] != kind) or (text and tok[1] != text) or tok[0] == "eof":
            self.error(f"expected {text or kind}")
        self.i += 1
        return tok[1]

    def accept(self, text):
        if self.peek()[1] == text and self.peek()[0] in ("punct", "word"):
            self.i += 1
            return True
        return False

    def string(self) -> str:
        raw = self.next("str")
        try:
            return json.loads(raw)
        except ValueError:
            self.error("bad string literal")

    def value_name(self) -> str:
        raw = self.next("val")[1:]
        if raw.startswith('"'):
            try:
                return json.loads(raw)
            except ValueError:
                self.error("bad quoted value name")
        return raw

    def dim(self):
        kind, text, _ = self.peek()
        if kind == "num" and re.fullmatch(r"\d+", text):
            self.i += 1
            return self.integer(text)
        if kind == "word":
            self.i += 1
            return text
        if kind == "str":
            return self.string()
        self.error("expected a dimension")

    def type(self) -> TensorType:
        start = self.i
        dtype = self.next("word")
        self.next("punct", "[")
        dims = []
        if not self.accept("]"):
            dims.append(self.dim())
            while self.accept(","):
                dims.append(self.dim())
            self.next("punct", "]")
        try:
            return TensorType(tuple(dims), dtype)
        except IRError as e:
            self.error(str(e), at=start)

    def attr_value(self, depth: int = 0):
        kind, text, _ = self.peek()
        if depth > MAX_NESTING:
            self.error(f"lists nested more than {MAX_NESTING} deep")
        if self.accept("["):
            items = []
            if not self.accept("]"):
                items.append(self.attr_value(depth + 1))
                while self.accept(","):
                    items.append(self.attr_value(depth + 1))
                self.next("punct", "]")
            return items
        if kind == "str":
            return self.string()
        if kind == "num":
            self.i += 1
            if text == "-inf":
                return -math.inf
            return float(text) if any(c in text for c in ".eE") else self.integer(text)
        if kind == "word" and text in ("true", "false", "null", "inf", "nan"):
            self.i += 1
            return {"true": True, "false": False, "null": None, "inf": math.inf, "nan": math.nan}[text]
        self.error("expected an attribute value")


def _is_number_literal(x) -> bool:
    if isinstance(x, list):
        return all(_is_number_literal(e) for e in x)
    return isinstance(x, (bool, int, float))


def _parse_decoder(p: "_Parser", g: Graph) -> None:
    """The optional `decoder(...)` line and its `kv_cache(...)` lines, after `output`."""
    def fields(allowed):
        start = p.i
        p.next("punct", "(")
        got = {}
        while True:
            key = p.next("word")
            if key not in allowed or key in got:
                p.i -= 1
                p.error(f"expected one of {', '.join(k for k in allowed if k not in got)}")
            p.next("punct", "=")
            got[key] = p.value_name()
            if not p.accept(","):
                break
        p.next("punct", ")")
        return got, start

    if not p.accept("decoder"):
        return
    head, start = fields(("input_ids", "position_ids", "attention_mask", "logits"))
    if "input_ids" not in head or "logits" not in head:
        p.error("decoder(...) needs input_ids and logits", at=start)
    kv = []
    while p.accept("kv_cache"):
        layer, start = fields(_KV_FIELDS)
        if len(layer) != 4:
            p.error(f"kv_cache(...) needs {', '.join(_KV_FIELDS)}", at=start)
        kv.append(KVLayer(**layer))
    g.decoder = DecoderInterface(head["input_ids"], head["logits"], head.get("position_ids"), tuple(kv),
                                 head.get("attention_mask"))


def parse_graph(text: str, weights: dict | None = None) -> Graph:
    """Parse the text form; `weights` maps the names of `external` constants to their arrays."""
    from isthmus.compiler.ops import get_op

    p = _Parser(text)
    weights = weights or {}
    p.next("word", "graph")
    g = Graph(p.string())
    p.next("punct", "{")
    env: dict[str, Value] = {}

    def define(v: Value):
        if v.name in env:
            p.error(f"value %{v.name} is defined twice", at=start)
        env[v.name] = v

    def use() -> Value:
        name = p.value_name()
        if name not in env:
            p.i -= 1
            p.error(f"value %{name} is not defined")
        return env[name]

    while True:
        kind, text, _ = p.peek()
        start = p.i   # errors found after a statement is read point at its first token
        if kind == "word" and text == "input":
            p.i += 1
            name = p.value_name()
            p.next("punct", ":")
            v = Value(name, p.type())
            define(v)
            g.inputs.append(v)
        elif kind == "word" and text == "const":
            p.i += 1
            name = p.value_name()
            p.next("punct", ":")
            t = p.type()
            p.next("punct", "=")
            if p.accept("external"):
                if name not in weights:
                    p.error(f"no weight given for external constant %{name}", at=start)
                data = weights[name]
            else:
                lit = p.attr_value()
                if not _is_number_literal(lit):
                    p.error(f"constant %{name}: a literal holds numbers and true/false only", at=start)
                try:
                    with np.errstate(over="raise"):   # 1e300 as f16 does not fit; inf does
                        data = np.array(lit, dtype=numpy_dtype(t.dtype)).reshape(
                            tuple(d for d in t.shape))
                except (ValueError, TypeError, ArithmeticError, IRError) as e:
                    p.error(f"literal does not fit {t}: {e}", at=start)
            if tuple(data.shape) != t.shape:
                p.error(f"constant %{name} data shape {tuple(data.shape)} does not match {t}", at=start)
            v = Value(name, t, data=data)
            define(v)
            g.constants.append(v)
        elif kind == "word" and text == "output":
            p.i += 1
            if p.peek()[0] == "val":
                g.outputs.append(use())
                while p.accept(","):
                    g.outputs.append(use())
            _parse_decoder(p, g)
            p.next("punct", "}")
            if p.peek()[0] != "eof":
                p.error("text after the end of the graph")
            break
        elif kind == "val":
            outs = []
            while True:
                name = p.value_name()
                p.next("punct", ":")
                outs.append(Value(name, p.type()))
                if not p.accept(","):
                    break
            p.next("punct", "=")
            op = p.next("word")
            try:
                opdef = get_op(op)
            except Exception:
                p.i -= 1
                p.error(f"unknown op {op!r}")
            p.next("punct", "(")
            ins = []
            if not p.accept(")"):
                ins.append(use())
                while p.accept(","):
                    ins.append(use())
                p.next("punct", ")")
            attrs = {}
            if p.accept("{"):
                if not p.accept("}"):
                    while True:
                        key = p.next("word")
                        p.next("punct", "=")
                        attrs[key] = p.attr_value()
                        if not p.accept(","):
                            break
                    p.next("punct", "}")
            source = ""
            if p.accept("loc"):
                source = p.string()
            try:
                where = _name(outs[0])
                attrs = opdef.complete_attrs(attrs, where=where)
                expected = opdef.infer([v.type for v in ins], attrs, where=where)
            except IRError as e:
                p.error(str(e), at=start)
            if len(expected) != len(outs):
                p.error(f"op {op} gives {len(expected)} outputs, {len(outs)} declared", at=start)
            for v, t in zip(outs, expected):
                if v.type != t:
                    p.error(f"%{v.name} is declared {v.type}, but {op} gives {t}", at=start)
            node = Node(op, ins, outs, attrs, source)
            for v in outs:
                v.producer = node
                define(v)
            g.nodes.append(node)
        else:
            p.error("expected input, const, a node or output")
    g.rebuild_names()
    verify(g)
    return g

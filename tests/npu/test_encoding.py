"""The binary encoding and the assembly text: property round trips and decoder fuzzing (hypothesis)."""

import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isthmus.errors import NpuDecodeError, NpuError
from isthmus.npu import asm, encoding
from isthmus.npu.isa import AP, DTYPES, OPS, TENSOR_KINDS, Instruction, Program, TensorDecl

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
u = st.integers


@st.composite
def aps(draw):
    space = draw(st.sampled_from(["hbm", "sbuf", "psum"]))
    dims = tuple(draw(st.lists(st.tuples(u(1, 2**16 - 1), u(0, 2**24 - 1)), min_size=1, max_size=3)))
    return AP(space, draw(st.sampled_from(list(DTYPES))), 0 if space == "hbm" else draw(u(0, 255)), draw(u(1, 255)),
              draw(u(0, 2**32 - 1)), dims, draw(u(0, 2**32 - 1)) if space == "hbm" else 0)


f32s = st.floats(width=32, allow_nan=False)
labels = st.none() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


def value(f):
    return {"ap": aps(), "opt_ap": st.none() | aps(), "scalar": f32s | aps(), "enum": st.sampled_from(f.choices),
            "engine": st.sampled_from(f.choices), "uint": u(0, 2**f.bits - 1), "int": u(-2**31, 2**31 - 1),
            "f32": f32s, "flag": u(0, 1)}[f.kind]


@st.composite
def instructions(draw):
    op = OPS[draw(st.sampled_from(sorted(OPS)))]
    args = {f.name: draw(value(f)) for f in op.fields}
    args = {k: v for k, v in args.items() if v is not None}
    return Instruction(op.name, args, draw(labels))


@st.composite
def programs(draw):
    names = draw(st.lists(st.from_regex(encoding.NAME_RE.pattern[:-2] + r"\Z", fullmatch=True).filter(
        lambda s: len(s) < 20), max_size=3, unique=True))
    tensors = [TensorDecl(n, d, tuple(draw(st.lists(u(1, 9), max_size=3))), draw(u(0, 2**20)) * DTYPES[d].size,
                          draw(st.sampled_from(TENSOR_KINDS)))
               for n, d in ((n, draw(st.sampled_from(list(DTYPES)))) for n in names)]
    return Program(draw(st.lists(instructions(), max_size=8)), tensors, draw(u(0, 2**40)))


@SETTINGS
@given(programs())
def test_random_programs_round_trip_asm_bin_asm_exactly(prog):
    text = asm.format_program(prog)
    binary = asm.assemble(text)
    assert asm.disassemble(binary) == text
    assert encoding.decode_program(binary) == prog
    assert asm.parse_program(text) == prog


@SETTINGS
@given(instructions())
def test_instruction_words_are_fixed_width_and_canonical(ins):
    word = encoding.encode_instruction(ins, 0)
    assert len(word) == encoding.WORD_BYTES
    assert encoding.decode_instruction(word) == Instruction(ins.op, ins.args, None)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_decode_errors(data):
    with pytest.raises(NpuDecodeError):
        encoding.decode_program(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=encoding.WORD_BYTES, max_size=encoding.WORD_BYTES))
def test_random_instruction_words_decode_or_raise_decode_errors(word):
    try:
        ins = encoding.decode_instruction(word, ["x"])
    except NpuDecodeError:
        return
    floats = [v for v in ins.args.values() if isinstance(v, float)]
    if not any(math.isnan(v) for v in floats):                # NaN payloads are not kept
        assert encoding.encode_instruction(ins, 1 if ins.label else 0) == word


@SETTINGS
@given(programs(), st.data())
def test_corrupted_programs_raise_only_decode_errors(prog, data):
    blob = bytearray(encoding.encode_program(prog))
    for _ in range(data.draw(u(1, 4))):
        i = data.draw(u(0, len(blob) - 1))
        blob[i] = data.draw(u(0, 255))
    cut = data.draw(u(0, len(blob)))
    for candidate in (bytes(blob), bytes(blob[:cut]), bytes(blob) + b"\0"):
        try:
            encoding.decode_program(candidate)
        except NpuDecodeError:
            pass


def test_decoder_messages():
    word = bytearray(encoding.encode_instruction(Instruction("nop", {"engine": "act"})))
    word[0] = 0xEE
    with pytest.raises(NpuDecodeError, match="opcode 0xee is not defined"):
        encoding.decode_instruction(bytes(word))
    word = bytearray(encoding.encode_instruction(Instruction("nop", {"engine": "act"})))
    word[-1] = 1
    with pytest.raises(NpuDecodeError, match="nop: bits past its last field are not zero"):
        encoding.decode_instruction(bytes(word))
    with pytest.raises(NpuDecodeError, match="label id 1 is past the label table"):
        encoding.decode_instruction(encoding.encode_instruction(Instruction("halt", {}), 1))
    with pytest.raises(NpuDecodeError, match="bad magic"):
        encoding.decode_program(b"\x7fELF" + bytes(40))
    good = encoding.encode_program(Program([Instruction("halt", {})]))
    with pytest.raises(NpuDecodeError, match="trailing bytes"):
        encoding.decode_program(good + b"x")
    with pytest.raises(NpuDecodeError, match="truncated program"):
        encoding.decode_program(good[:-3])
    bad_version = good[:6] + struct.pack("<H", 9) + good[8:]
    with pytest.raises(NpuDecodeError, match="unsupported program format"):
        encoding.decode_program(bad_version)


def test_encoder_rejects_unencodable_instructions():
    with pytest.raises(NpuError, match="count 300 is outside"):
        encoding.encode_instruction(Instruction("memset", {"dst": AP("sbuf", "f32", 0, 300), "value": 0.0}))
    with pytest.raises(NpuError, match="an HBM access pattern has no partition start"):
        encoding.encode_instruction(Instruction("memset", {"dst": AP("hbm", "f32", 3, 1), "value": 0.0}))
    with pytest.raises(NpuError, match="missing field value"):
        encoding.encode_instruction(Instruction("memset", {"dst": AP("sbuf", "f32")}))
    with pytest.raises(NpuError, match="op: 'pow' is not one of"):
        encoding.encode_instruction(Instruction("tensor_tensor", {"dst": AP("sbuf", "f32"), "src0": AP("sbuf", "f32"),
                                                                  "src1": AP("sbuf", "f32"), "op": "pow"}))


def test_table_fits_the_word_and_opcodes_are_unique():
    assert len({op.opcode for op in OPS.values()}) == len(OPS)
    for op in OPS.values():
        assert encoding.HEADER_BITS + sum(f.bits for f in op.fields) <= encoding.WORD_BYTES * 8, op.name
        assert len({f.name for f in op.fields}) == len(op.fields)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["halt", "nop engine=act", "memset", "sbuf.f32[0:4]{8:1}", "value=1", ",", " ",
                                 '@"x"', "#", "=", "[", "]", "{", "}", ":", "*", "+0x10", "hbm.bf16[2*8]", ".tensor",
                                 ".hbm", "\n", "9", "-1", "matmul", "queue=3", "acc=1", "nan", "ü"]), max_size=12))
def test_random_assembly_text_raises_only_npu_errors(tokens):
    try:
        asm.parse_program("".join(tokens))
    except NpuError:
        pass

"""The assembly text: syntax, labels, directives and one-line errors with file:line."""

import pytest

from isthmus.errors import NpuError
from isthmus.npu import asm
from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.isa import AP

SOURCE = """\
# a comment line
.tensor x f32[4,8] 0x0 input     # directive comment
.tensor y bf16[4,8] 128 output
  memset sbuf.f32[0:4]{8:1}, value=0.5   @"blk.0.attn_q"   # trailing comment
activate sbuf.bf16[0:4]+0x40{8:1}, sbuf.f32[0:4]{8:1}, func=exp, bias=sbuf.f32[0:4]+0x80{1:1}, scale=2
dma_copy hbm.bf16[4*8]+0x80{8:1}, sbuf.bf16[0:4]+0x40{8:1}, queue=1 @"label with \\"quotes\\" # and hash"
"""


def test_parse_accepts_comments_labels_keywords_in_any_order():
    prog = asm.parse_program(SOURCE, "t.s")
    assert [i.op for i in prog.instructions] == ["memset", "activate", "dma_copy"]
    assert [i.label for i in prog.instructions] == ["blk.0.attn_q", None, 'label with "quotes" # and hash']
    act = prog.instructions[1]
    assert act["scale"] == 2.0 and act["bias"] == AP("sbuf", "f32", 0, 4, 0x80, ((1, 1),))
    assert "accum" not in act.args
    assert [t.name for t in prog.tensors] == ["x", "y"] and prog.hbm_bytes == 128 + 64


def test_canonical_text():
    text = asm.format_program(asm.parse_program(SOURCE))
    assert text.splitlines()[3:] == [
        'memset sbuf.f32[0:4]{8:1}, value=0.5 @"blk.0.attn_q"',
        "activate sbuf.bf16[0:4]+0x40{8:1}, sbuf.f32[0:4]{8:1}, func=exp, scale=2.0, bias=sbuf.f32[0:4]+0x80{1:1}",
        'dma_copy hbm.bf16[4*8]+0x80{8:1}, sbuf.bf16[0:4]+0x40{8:1}, queue=1 @"label with \\"quotes\\" # and hash"',
    ]
    assert asm.disassemble(asm.assemble(text)) == text


@pytest.mark.parametrize("line,needle", [
    ("frobnicate sbuf.f32[0:4]{8:1}", "unknown instruction 'frobnicate'"),
    ("memset sbuf.f32[0:4]{8:1}", "memset: missing field value"),
    ("memset sbuf.f32[0:4]{8:1}, value=1, value=2", "field value given twice"),
    ("memset sbuf.f32[0:4]{8:1}, colour=1", "unknown field 'colour'"),
    ("memset sbuf.f32[0:4]{8:1}, sbuf.f32[0:4]{8:1}, value=1", "too many operands"),
    ("memset sbuf.f32[0:4]{8}, value=1", "bad free dim '8'"),
    ("memset sbuf.f32[0*4]{8:1}, value=1", "write HBM rows as [rows*rowstride]"),
    ("memset dram.f32[0:4]{8:1}, value=1", "unknown memory space 'dram'"),
    ("memset sbuf.f64[0:4]{8:1}, value=1", "unknown dtype 'f64'"),
    ("memset sbuf.f32[4:4]{8:1}, value=1", "empty partition range"),
    ("memset sbuf.f32[0:4]{8:1}, value=lots", "value: 'lots' is not a number"),
    ("tensor_tensor sbuf.f32[0:4]{8:1}, sbuf.f32[0:4]{8:1}, sbuf.f32[0:4]{8:1}, op=pow", "'pow' is not one of"),
    ("sem_wait engine=gpu, sem=0, value=1", "'gpu' is not one of"),
    ("sem_signal engine=act, sem=256", "sem: 256 is outside [0, 255]"),
    ('halt @"unterminated', "bad label string"),
    ('halt @"a" junk', "unexpected text after the label"),
    (".tensor 9x f32[4] 0 input", "tensor name '9x' is not an identifier"),
    (".tensor x f32[4] 2 input", "offset 0x2 is not aligned"),
    (".tensor x f32[4] 0 weights", "kind 'weights'"),
    (".section text", "bad directive"),
])
def test_errors_are_one_line_with_file_and_line(line, needle):
    with pytest.raises(NpuError) as e:
        asm.parse_program("halt\n" + line + "\n", "prog.s")
    msg = str(e.value)
    assert msg.startswith("prog.s:2: ") and needle in msg and "\n" not in msg, msg


def test_builder_and_text_agree():
    b = ProgramBuilder()
    x = b.tensor("x", (4, 8), "f32")
    t = b.sbuf(8, "f32", 4)
    with b.label("blk.1.mlp"):
        b.dma_copy(t.ap(), x[:, :], queue=2)
        b.sem_signal(engine="dma2", sem=0)
    b.tensor_scalar(t.ap(), t.ap(), op="mul", scalar=0.1)
    prog = b.build()
    text = asm.format_program(prog)
    assert 'dma_copy sbuf.f32[0:4]{8:1}, hbm.f32[4*8]{8:1}, queue=2 @"blk.1.mlp"' in text
    assert "tensor_scalar sbuf.f32[0:4]{8:1}, sbuf.f32[0:4]{8:1}, op=mul, scalar=0.1" in text
    assert asm.parse_program(text) == prog


def test_builder_slices_and_errors():
    b = ProgramBuilder()
    w = b.tensor("w", (256, 64), "bf16")
    assert w[128:256, 16:48] == AP("hbm", "bf16", 0, 128, (128 * 64 + 16) * 2, ((32, 1),), 64)
    t = b.sbuf(100, "f32")
    assert t[32:64, 10:20] == AP("sbuf", "f32", 32, 32, t.offset + 40, ((10, 1),))
    with pytest.raises(NpuError, match="unknown field"):
        b.memset(t.ap(), value=0.0, colour=3)
    with pytest.raises(NpuError, match="unknown instruction"):
        b.emit("frobnicate")
    with pytest.raises(AttributeError):
        b.frobnicate()
    with pytest.raises(NpuError, match="unit-step"):
        w[0:10:2, :]


def test_builder_dependency_tokens():
    b = ProgramBuilder()
    t1 = b.signal("dma3")
    t2 = b.signal("dma3")
    assert (t1.sem, t1.value, t2.value) == (6, 1, 2)
    b.wait("tensor", t2)
    b.wait("tensor", t1)                                      # implied by t2: no instruction
    b.wait("dma3", t2)                                        # own queue: already in order
    b.wait("act", None, b.signal("tensor"))
    assert [str(i) for i in b.instructions] == [
        "sem_signal engine=dma3, sem=6", "sem_signal engine=dma3, sem=6", "sem_wait engine=tensor, sem=6, value=2",
        "sem_signal engine=tensor, sem=0", "sem_wait engine=act, sem=0, value=1"]
    with pytest.raises(NpuError, match="dma20 has no token semaphore"):
        ProgramBuilder("edge").signal("dma20")

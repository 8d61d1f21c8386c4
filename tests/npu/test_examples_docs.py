"""Generated artefacts stay in sync (docs/npu-isa.md, pinned example programs) and the examples run correctly."""

from pathlib import Path

import numpy as np

from isthmus.npu import asm, docs, programs, sim
from isthmus.npu.config import PRESETS
from isthmus.npu.isa import OPS
from isthmus.npu.timing import COSTS

ROOT = Path(__file__).resolve().parents[2]


def test_isa_doc_is_up_to_date():
    """docs/npu-isa.md is generated from the table: run `python -m isthmus.npu.docs` after changing it."""
    assert (ROOT / "docs" / "npu-isa.md").read_text() == docs.render()


def test_isa_doc_covers_every_op_cost_and_preset():
    text = docs.render()
    for op in OPS.values():
        assert f"### {op.name}" in text and op.cost in COSTS
    for name in PRESETS:
        assert f"| {name} " in text or f"| {name} |" in text
    assert docs.main(["--check"]) == 0


def test_pinned_disassembly_of_the_tiled_matmul():
    """Golden diff: a change to the generated program shows up here (rewrite with python -m isthmus.npu.programs)."""
    for name, make in programs.GOLDEN.items():
        assert (ROOT / "examples" / "npu" / name).read_text() == asm.format_program(make()), name


def test_softmax_example_matches_numpy():
    prog = asm.parse_program((ROOT / "examples" / "npu" / "softmax.s").read_text(), "softmax.s")
    x = np.random.default_rng(3).standard_normal((128, 64)).astype(np.float32) * 4
    y = sim.run(prog, {"x": x}).outputs["y"]
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)

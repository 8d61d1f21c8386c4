"""Golden disassembly: the decode program of a one-layer Llama, as the NPU lowering emits it.

A change to the generated code (tiling, scheduling, semaphores, layouts) shows up as a diff of
tests/lower/golden/decode_step.s in review. After a deliberate change, rewrite it with
`ISTHMUS_UPDATE_GOLDEN=1 pytest tests/lower/test_npu_golden.py` and review the diff."""

import os
from pathlib import Path

import numpy as np

from isthmus.compiler.lower.npu.target import lower_npu
from isthmus.compiler.lower.npu.chunk_program import build_chunk_program, resident_values
from isthmus.compiler.passes.pipeline import run_pipeline
from isthmus.npu import sim
from isthmus.npu.asm import format_program, parse_program
from tiny_models import tiny_llama_model  # tests/support, on pythonpath

GOLDEN = Path(__file__).parent / "golden" / "decode_step.s"
CFG = dict(n_layers=1, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=40,
           rms_eps=1e-5, rope_theta=10000.0, context_length=64)


def _program():
    model = tiny_llama_model(CFG, seed=3, quant="q8_0", layout="interleaved", name="golden")
    exe = lower_npu(run_pipeline(model.graph), model=model, precision="bf16x3",
                    config="datacenter", eager=False)
    return exe, build_chunk_program(exe.image, 1, 64)


def test_decode_step_disassembly_is_pinned():
    exe, prog = _program()
    text = format_program(prog)
    if os.environ.get("ISTHMUS_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "generated code changed: see the module docstring"
    assert parse_program(text) == prog                                  # the text is the program
    names = {n.outputs[0].name for n in exe.graph.nodes}
    assert all(i.label in names for i in prog.instructions)             # every instruction names its node
    loaded = sim.LoadedProgram(prog, "datacenter")                      # and it runs, race-free
    loaded.bind(resident_values(exe.image))
    out = loaded.run({"ids": np.array([7], np.int32), "pos": np.array([0], np.int32),
                      "kvbias": np.r_[0.0, np.full(63, -3e4)].astype(np.float32)}).outputs["logits"]
    assert out.shape == (40,) and np.isfinite(out).all()

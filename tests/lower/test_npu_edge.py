"""The default model (SmolLM2-135M: 64-wide heads over edge's 32 partitions) on the `edge` preset (slow:
needs the pulled model): greedy tokens against the reference, and the on-device table of
docs/npu-performance.md (modeled cycles are deterministic) against the rooflines and the page."""

import re
from pathlib import Path

import pytest

import isthmus
from isthmus.compiler.lower.npu.profile_tables import decode_figures, prefill_figures
from isthmus.compiler.lower.npu.target import lower_npu
from isthmus.compiler.passes.pipeline import run_pipeline
from isthmus.runtime.generate import generate
from isthmus.runtime.sampling import SamplingParams

pytestmark = pytest.mark.slow
from default_prompts import PROMPTS  # tests/support
DOC = Path(__file__).parents[2] / "docs" / "npu-performance.md"
# the stated factors: decode step / its roofline, and a 64-token prompt / the sum of its chunks' rooflines
# (measured 1.118 / 1.686 / 1.871 and 1.168 / 2.461 / 2.187: docs/npu-performance.md)
DECODE_FACTOR = {"bf16": 1.15, "int8": 1.75, "q4": 1.95}
PROMPT_FACTOR = {"bf16": 1.20, "int8": 2.55, "q4": 2.25}


@pytest.fixture(scope="module")
def pipelined(default_model):
    return run_pipeline(default_model.graph)


@pytest.fixture(scope="module")
def edge_exe(default_model, pipelined):
    exe = lower_npu(pipelined, model=default_model, config="edge")          # bf16x3, bf16 weights
    assert exe.spec is not None and exe.image.slots.hc == 2
    return exe


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_on_edge_matches_reference(default_model, default_exe, edge_exe, prompt):
    ids = default_model.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    want = list(generate(default_exe, ids, params))
    assert list(generate(edge_exe, ids, params)) == want and len(want) == 20


def _doc_row(fmt: str) -> str:
    text = DOC.read_text()
    section = text[text.index("## On the phone-class `edge` preset"):]
    return next(line for line in section.splitlines() if line.startswith(f"| {fmt} |"))


@pytest.mark.parametrize("fmt", ["bf16", "int8", "q4"])
def test_edge_table(default_model, pipelined, fmt):
    exe = lower_npu(pipelined, model=default_model, config="edge", precision="bf16", weights=fmt)
    f = decode_figures(exe, window=64)
    r = f["roofline"]
    assert r.binding == "hbm"
    assert f["cycles"] <= DECODE_FACTOR[fmt] * r.cycles, f["cycles"] / r.cycles
    p = prefill_figures(exe, 64)
    assert sum(P for P, *_ in p["chunks"]) == 64 and p["binds"] == ["hbm"]
    assert p["cycles"] <= PROMPT_FACTOR[fmt] * p["roofline_cycles"], p["cycles"] / p["roofline_cycles"]
    row = _doc_row(fmt)
    assert f"{f['cycles']:,}" in row and f"{p['cycles']:,}" in row, row
    assert re.search(rf"{f['cycles'] / r.cycles:.3f}", row), row

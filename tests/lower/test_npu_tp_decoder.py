"""A Llama decoder tensor-parallel over the `chip` preset's 8 cores (compiler/lower/npu/tp_decoder.py):
query heads per core (evenly, and unevenly as SmolLM2's 9 heads must be), the MLP by hidden features,
the logits by vocabulary rows, two all-reduces a layer; a prompt chunk and decode steps simulated on the
chip against the one-core NPU program and the reference target, and the decode step timed with the
cores concurrent (deterministic modeled cycles)."""

import numpy as np
import pytest

import isthmus
from isthmus.compiler.lower.npu.llama_matcher import match_llama
from isthmus.compiler.lower.npu.target import lower_npu
from isthmus.compiler.lower.npu.tp_decoder import TpChip, shard_heads, tp_decode_figures
from isthmus.compiler.passes.pipeline import run_pipeline
from tiny_models import tiny_llama_model  # tests/support, on pythonpath

# head_dim 16; vocab 300 does not split evenly over 8 cores (38 rows each, the last 34)
CFG = dict(n_layers=2, hidden=128, ffn=256, n_heads=8, n_kv_heads=2, head_dim=16, vocab_size=300,
           rms_eps=1e-5, rope_theta=10000.0, context_length=256)


def test_shard_heads():
    assert shard_heads(8, 2, 8) == [([h], [h // 4]) for h in range(8)]
    smollm2 = shard_heads(9, 3, 8)
    assert smollm2[0] == ([0, 1], [0]) and smollm2[1:] == [([h], [h // 3]) for h in range(2, 9)]
    assert shard_heads(16, 4, 8)[3] == ([6, 7], [1])
    with pytest.raises(ValueError, match="equal groups"):
        shard_heads(8, 4, 3)                 # core 0: heads 0-2 read kv heads 0, 0, 1
    with pytest.raises(ValueError, match="one"):
        shard_heads(4, 2, 8)


@pytest.mark.parametrize("heads,kv,precision", [(8, 2, "bf16x3"), (9, 3, "f32"), (16, 4, "bf16")])
def test_chip_decoder_matches_one_core_and_reference(heads, kv, precision):
    model = tiny_llama_model(dict(CFG, n_heads=heads, n_kv_heads=kv), seed=0, layout="half")
    graph = run_pipeline(model.graph)
    chip = TpChip(match_llama(graph), "chip", precision, 256)
    assert len(chip.images) == 8
    tp = chip.decoder()
    one = lower_npu(graph, model=model, precision=precision, check_races=True).decoder()
    ref = isthmus.compile(model, target="reference").decoder()
    # a prompt chunk padded 5 -> 8, then decode steps
    for ids in ([5, 17, 99, 3, 42], [7], [8], [299]):
        got, alone, want = tp.step(ids), one.step(ids), ref.step(ids)
        # the same products as one core; only the order of the partial sums' additions differs
        assert np.abs(got - alone).max() <= 2e-5 * np.abs(alone).max()
        tol = {"f32": 1e-5, "bf16x3": 1e-4, "bf16": 3e-2}[precision]
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert tp.length == ref.length == 8


def test_chip_decode_step_timing_tiny():
    """Modeled cycles are deterministic: one decode step of the 8-head tiny model, every core concurrent."""
    model = tiny_llama_model(CFG, seed=0, layout="half")
    spec = match_llama(run_pipeline(model.graph))
    f = tp_decode_figures(spec, 64, "bf16", 256)
    assert (f["cycles"], f["one_core_cycles"]) == (11_883, 10_382)     # too small to gain: latency binds both


@pytest.mark.slow
def test_chip_decode_step_smollm2(default_model):
    """SmolLM2-135M's decode step (window 64, bf16) on `chip`, tensor-parallel, against one `core` and the
    chip's HBM bound: the figures of docs/npu-performance.md ("Eight cores")."""
    spec = match_llama(run_pipeline(default_model.graph))
    f = tp_decode_figures(spec, 64, "bf16", 4096)
    assert (f["cycles"], f["one_core_cycles"]) == (278_921, 1_101_969)
    assert f["speedup"] >= 3.9              # 3.95x
    assert f["hbm_ratio"] <= 2.15            # 2.10x; the target is 1.5x: not met (see the docs)


@pytest.mark.slow
def test_chip_decoder_smollm2_greedy(default_model):
    """SmolLM2-135M (9 query heads over 8 cores: core 0 takes two) on the chip simulator, bf16x3: a prompt
    chunk and three greedy decode steps equal to the one-core program and the reference."""
    graph = run_pipeline(default_model.graph)
    tp = TpChip(match_llama(graph), "chip", "bf16x3", 256).decoder()
    one = lower_npu(graph, model=default_model, precision="bf16x3", max_context=256).decoder()
    ref = isthmus.compile(default_model, target="reference").decoder()
    ids = [504, 3575, 282, 4649, 314]
    for _ in range(4):
        got, alone, want = tp.step(ids), one.step(ids), ref.step(ids)
        assert np.abs(got - alone).max() <= 5e-5 * np.abs(alone).max()
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
        assert int(got.argmax()) == int(want.argmax())
        ids = [int(want.argmax())]

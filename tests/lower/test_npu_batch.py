"""Batched decode on the NPU (compiler/lower/npu/batch_decode.py): B conversations step together in one
program, each against the reference target decoding it alone."""

import numpy as np
import pytest

import isthmus
from isthmus.compiler.lower.npu.batch_decode import NpuBatchDecoder
from isthmus.compiler.lower.npu.target import lower_npu
from isthmus.compiler.passes.pipeline import run_pipeline
from isthmus.errors import InputError
from tiny_models import tiny_llama_model  # tests/support, on pythonpath

CFG = dict(n_layers=2, hidden=64, ffn=96, n_heads=6, n_kv_heads=2, head_dim=16, vocab_size=131,
           rms_eps=1e-5, rope_theta=10000.0, context_length=256)


@pytest.mark.parametrize("precision,tol", [("bf16x3", 1e-4), ("bf16", 3e-2)])
def test_batched_steps_match_each_conversation_decoded_alone(precision, tol):
    """Three conversations of different lengths (5, 2 and 61 tokens: the last one's window grows from
    64 to 128 during the batch), prefilled one by one, then decoded together for four greedy steps."""
    model = tiny_llama_model(CFG, seed=0, quant="q4_1")
    exe = lower_npu(run_pipeline(model.graph), model=model, precision=precision, check_races=True)
    prompts = [[5, 17, 99, 3, 42], [7, 8], list(range(20, 81))]
    refs = [isthmus.compile(model, target="reference").decoder() for _ in prompts]
    decs = [exe.decoder() for _ in prompts]
    for r, d, p in zip(refs, decs, prompts):
        r.step(p), d.step(p)
    batch = NpuBatchDecoder(exe, decs)
    toks = [1, 2, 3]
    for _ in range(4):
        got = batch.step(toks)
        assert got.shape == (3, CFG["vocab_size"])
        for b, r in enumerate(refs):
            want = r.step([toks[b]])
            assert np.abs(got[b] - want).max() <= tol * np.abs(want).max()
        toks = [int(g.argmax()) for g in got]
    assert batch.lengths == [9, 6, 65] and sorted(batch.loaded) == [64, 128]


def test_batch_errors():
    model = tiny_llama_model(CFG, seed=0, quant="q4_1")
    exe = lower_npu(run_pipeline(model.graph), model=model, precision="bf16")
    a, b = exe.decoder(), exe.decoder()
    a.step([1, 2])
    with pytest.raises(InputError, match="must be prefilled first"):
        NpuBatchDecoder(exe, [a, b])
    b.step([3])
    with pytest.raises(InputError, match="one token per conversation"):
        NpuBatchDecoder(exe, [a, b]).step([1])
    with pytest.raises(InputError, match="NPU decoders of this executable"):
        NpuBatchDecoder(exe, [a, object()])


@pytest.mark.slow
def test_batch_16_decodes_at_least_8x_the_tokens_per_second_of_batch_1_on_core(default_model):
    """SmolLM2-135M, window 64, bf16: 16 sequences a step stream the weights once for 16 tokens.
    Measured: batch 1 1,101,937 cycles (1,270 tokens per modeled second), batch 16 1,840,218 cycles
    (12,172: 9.58x)."""
    from isthmus.compiler.lower.npu.profile_tables import batch_figures
    exe = lower_npu(run_pipeline(default_model.graph), model=default_model, precision="bf16")
    one, sixteen = batch_figures(exe, 1, 64), batch_figures(exe, 16, 64)
    assert sixteen["tokens_per_s"] >= 8 * one["tokens_per_s"], (sixteen["tokens_per_s"], one["tokens_per_s"])
    assert sixteen["roofline"].binding == "hbm" and sixteen["memory"]["spills"] == []


def test_decode_batch_steps_conversations_together_and_they_can_go_on_alone():
    """What continuous batching calls every step: the conversations in flight take it together (one
    batched program), the set changes between steps, and a conversation then steps alone."""
    from isthmus.compiler.batch import decode_batch
    model = tiny_llama_model(CFG, seed=1, quant="q8_0")
    exe = lower_npu(run_pipeline(model.graph), model=model, precision="bf16x3", check_races=True)
    prompts = [[5, 17, 99, 3, 42], [7, 8], list(range(20, 81))]
    refs = [isthmus.compile(model, target="reference").decoder() for _ in prompts]
    decs = [exe.decoder() for _ in prompts]
    for r, d, p in zip(refs, decs, prompts):
        r.step(p), d.step(p)
    exe.profiling = True
    for members in ([0, 1, 2], [0, 1, 2], [2, 0], [0, 1, 2]):
        toks = [(11 * m + len(exe.runs)) % CFG["vocab_size"] for m in members]
        got = decode_batch(exe, [decs[m] for m in members], toks)
        for row, m, t in zip(got, members, toks):
            want = refs[m].step([t])
            assert np.abs(row - want).max() <= 1e-4 * np.abs(want).max()
    assert [p.tensor("logits").shape for p, _, _ in exe.runs] == [(3, 131), (3, 131), (2, 131), (3, 131)]
    for d, r in zip(decs, refs):                   # each goes on alone from the batch's caches
        a, b = d.step([4]), r.step([4])
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()

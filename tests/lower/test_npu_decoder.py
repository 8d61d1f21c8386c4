"""The Llama decoder on the NPU (chunk programs over a KV window in HBM) against the reference target,
on tiny random models: every precision, both rope layouts, quantized weights, prefill padding,
power-of-two chunking, window growth, interleaved conversations, generation; plus the per-op path
on the same graph (run() with past_* inputs) and the fallbacks."""

import numpy as np
import pytest

import isthmus
from isthmus.compiler.frontends import Model
from isthmus.compiler.kv_cache import FunctionalDecoder
from isthmus.compiler.lower.npu.target import NpuDecoder, lower_npu
from isthmus.compiler.lower.npu.chunk_program import assign_slots
from isthmus.compiler.lower.npu.llama_matcher import match_llama
from isthmus.compiler.passes.pipeline import run_pipeline
from isthmus.errors import InputError
from isthmus.runtime.generate import generate
from isthmus.runtime.sampling import SamplingParams
from tiny_models import tiny_llama_model  # tests/support, on pythonpath

# head_dim 16 (slots of 32 partitions), hidden/ffn multiples of 32 so the linears really quantize
CFG = dict(n_layers=2, hidden=64, ffn=96, n_heads=6, n_kv_heads=2, head_dim=16, vocab_size=131,
           rms_eps=1e-5, rope_theta=10000.0, context_length=256)
TOL = {"f32": 1e-5, "bf16x3": 1e-4, "bf16": 3e-2}       # of max |logit|


def tiny(quant=None, layout="interleaved", cfg=CFG, seed=0) -> Model:
    return tiny_llama_model(cfg, seed=seed, quant=quant, layout=layout)


def npu(model, precision):
    return lower_npu(run_pipeline(model.graph), model=model, precision=precision, check_races=True)


def close(a, b, precision):
    assert a.shape == b.shape
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= TOL[precision], f"relative error {err:.3g} > {TOL[precision]}"


@pytest.mark.parametrize("precision", ["f32", "bf16x3", "bf16"])
@pytest.mark.parametrize("layout,quant", [("interleaved", "q4_1"), ("half", "q8_0"), ("half", None)])
def test_steps_match_reference(precision, layout, quant):
    model = tiny(quant, layout)
    ref = isthmus.compile(model, target="reference").decoder()
    dec = npu(model, precision).decoder()
    assert isinstance(dec, NpuDecoder)
    # a padded prefill (5 -> 8), decode steps, a 3-token chunk (2 + 1), a 9-token chunk (8 + 1)
    for ids in ([5, 17, 99, 3, 42], [7], [8, 9, 10], [11], list(range(20, 29)), [130]):
        close(dec.step(ids), ref.step(ids), precision)
    assert dec.length == ref.length == 20


def test_window_grows_and_long_prefill_chunks():
    """Past 64 tokens the next window (128) shares the same HBM cache; a prompt over 512 tokens is
    prefilled as a padded first chunk plus exact 512-token chunks."""
    cfg = dict(CFG, context_length=1024)
    model = tiny("q8_0", cfg=cfg)
    ref = isthmus.compile(model, target="reference").decoder()
    exe = npu(model, "f32")
    dec = exe.decoder()
    rng = np.random.default_rng(1)
    for n in (60, 1, 1, 1, 1, 1):
        ids = [int(i) for i in rng.integers(0, cfg["vocab_size"], n)]
        close(dec.step(ids), ref.step(ids), "f32")
    assert {C for _, C in exe.runtime.loaded} == {64, 128}
    ref2, dec2 = isthmus.compile(model, target="reference").decoder(), exe.decoder()
    ids = [int(i) for i in rng.integers(0, cfg["vocab_size"], 600)]
    close(dec2.step(ids), ref2.step(ids), "f32")
    assert (512, 1024) in exe.runtime.loaded


def test_interleaved_conversations_keep_their_caches():
    model = tiny("q4_1")
    exe = npu(model, "bf16x3")
    refs = [isthmus.compile(model, target="reference").decoder() for _ in range(2)]
    decs = [exe.decoder(), exe.decoder()]
    for step, ids in enumerate(([1, 2, 3], [4, 5], [6], [7], [8])):
        for i in (0, 1):
            toks = [t + 10 * i for t in ids]
            close(decs[i].step(toks), refs[i].step(toks), "bf16x3")


def test_generate_same_tokens_as_reference():
    model = tiny("q4_1")
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = list(generate(isthmus.compile(model, target="reference"), [3, 14, 15, 92], params))
    got = list(generate(isthmus.compile(model, target="npu"), [3, 14, 15, 92], params))
    assert got == want and len(got) == 12


def test_errors_are_input_errors():
    cfg = dict(CFG, context_length=64)
    dec = npu(tiny(None, cfg=cfg), "f32").decoder()
    with pytest.raises(InputError, match="out of range"):
        dec.step([cfg["vocab_size"]])
    with pytest.raises(InputError, match="context window of 64"):
        dec.step([1] * 65)
    with pytest.raises(InputError, match="at least one token"):
        dec.step([])


def test_run_on_the_decoder_graph_uses_the_per_op_lowering():
    model = tiny("q8_0")
    g = run_pipeline(model.graph)
    rng = np.random.default_rng(2)
    feeds = {"input_ids": rng.integers(0, 131, (1, 3)), "position_ids": np.arange(4, 7)[None]}
    for v in g.inputs:
        if v.name.startswith("past_"):
            feeds[v.name] = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
    ref = isthmus.compile(model, target="reference").run(feeds)
    got = lower_npu(g, model=model, precision="f32", check_races=True).run(feeds)
    for name, r in ref.items():
        assert np.abs(got[name] - r).max() <= 1e-5 * max(1.0, np.abs(r).max()), name


def test_other_graphs_fall_back_to_the_functional_decoder(tiny_llama_graph):
    g = run_pipeline(tiny_llama_graph)
    assert match_llama(g) is not None
    attn = next(n for n in g.nodes if n.op == "attention")
    attn.attrs = {**attn.attrs, "causal": False}      # still a decoder, no longer the Llama structure
    assert g.decoder is not None and match_llama(g) is None
    exe = lower_npu(g, model=None)
    assert isinstance(exe.decoder(), FunctionalDecoder)


def test_head_slots_put_each_query_head_with_its_kv_head():
    sl = assign_slots(9, 3, 64, 128, 32)               # SmolLM2-135M
    assert sl.q_chunks == 5 and sl.k_chunks == 2 and sl.q_rows == 576
    starts = {}
    for j, row in enumerate(sl.k_groups):
        for i, g in enumerate(row):
            if g is not None:
                starts.setdefault(g, set()).add(i * sl.stride)
    for h, (c, s) in enumerate(sl.head_slot):
        assert s in starts[h // 3]                     # the kv head is at the query head's partition start
    sl = assign_slots(6, 2, 8, 128, 32)                # small heads: one per 32-partition slot
    assert sl.stride == 32 and sl.per_chunk == 4
    assert assign_slots(4, 2, 160, 128, 32) is None    # wider than the partitions, not a multiple of them
    sl = assign_slots(9, 3, 64, 32, 32)                # SmolLM2 on edge: each head spans 2 chunks
    assert sl.hc == 2 and sl.q_chunks == 18 and sl.k_chunks == 6 and sl.q_rows == 576


def test_edge_preset():
    """32 partitions, one PSUM bank, 16 KiB of SBUF per partition: the same lowering, smaller tiles;
    a chunk whose working set does not fit SBUF is split in halves until it does."""
    model = tiny("q4_1")
    ref = isthmus.compile(model, target="reference").decoder()
    exe = lower_npu(run_pipeline(model.graph), model=model, config="edge", precision="bf16x3", check_races=True)
    dec = exe.decoder()
    for ids in ([1, 2, 3, 4, 5], [6], [7, 8], list(range(9, 109))):
        close(dec.step(ids), ref.step(ids), "bf16x3")
    assert exe.runtime.unfit                       # the 64-token chunk over a 128 window did not fit


# heads of 64 (SmolLM2's width) on edge's 32 partitions: each head two chunks (sub-heads), scores
# accumulated over them in PSUM
WIDE = dict(CFG, hidden=96, ffn=64, n_heads=3, n_kv_heads=1, head_dim=64)


@pytest.mark.parametrize("layout,precision", [("half", "bf16x3"), ("interleaved", "f32"), ("half", "bf16")])
def test_heads_wider_than_the_partitions_on_edge(layout, precision):
    model = tiny("q8_0", layout, cfg=WIDE)
    ref = isthmus.compile(model, target="reference").decoder()
    exe = lower_npu(run_pipeline(model.graph), model=model, config="edge", precision=precision, check_races=True)
    assert exe.image.slots.hc == 2
    dec = exe.decoder()
    for ids in ([1, 2, 3, 4, 5], [6], [7, 8], [9]):
        close(dec.step(ids), ref.step(ids), precision)


def test_heads_wider_than_the_partitions_per_op_path():
    """The per-op attention kernel splits a 64-wide head over two 32-partition tiles on edge."""
    model = tiny("q8_0", "half", cfg=WIDE)
    g = run_pipeline(model.graph)
    rng = np.random.default_rng(3)
    feeds = {"input_ids": rng.integers(0, 131, (1, 3)), "position_ids": np.arange(4, 7)[None]}
    for v in g.inputs:
        if v.name.startswith("past_"):
            feeds[v.name] = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    ref = isthmus.compile(model, target="reference").run(feeds)
    got = lower_npu(g, model=model, config="edge", precision="f32", check_races=True).run(feeds)
    for name, r in ref.items():
        assert np.abs(got[name] - r).max() <= 1e-5 * max(1.0, np.abs(r).max()), name

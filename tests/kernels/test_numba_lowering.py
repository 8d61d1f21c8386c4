"""The numba target end to end: fusion groups, the plan, run() and the in-place decoder,
against the reference target on tiny random Llama models (quantized and not)."""

import numpy as np
import pytest

pytest.importorskip("numba")

import isthmus  # noqa: E402
from isthmus.compiler.ir import Graph  # noqa: E402
from isthmus.compiler.passes.fusion import format_groups, fuse  # noqa: E402
from tiny_models import tiny_llama_model  # noqa: E402  # tests/support, on pythonpath
from default_prompts import PROMPTS  # noqa: E402  # tests/support

# hidden and ffn are multiples of 32 so every linear is really quantized
CFG = dict(n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=67,
           rms_eps=1e-5, rope_theta=10000.0, context_length=48)


def tiny(quant, layout="interleaved", seed=0):
    return tiny_llama_model(CFG, seed=seed, quant=quant, layout=layout)


def feeds(model, batch, seq, past, seed=0):
    rng = np.random.default_rng(seed)
    f = {"input_ids": rng.integers(0, CFG["vocab_size"], size=(batch, seq)),
         "position_ids": np.tile(np.arange(past, past + seq), (batch, 1))}
    for v in model.graph.inputs:
        if v.name.startswith("past_"):
            f[v.name] = rng.standard_normal((batch, CFG["n_kv_heads"], past, CFG["head_dim"])).astype(np.float32)
    return f


def test_fusion_groups_of_a_decoder():
    g = tiny("q4_1").graph
    groups = fuse(g)
    assert sorted(n for gr in groups for n in map(id, gr.nodes)) == sorted(map(id, g.nodes))
    kinds = [(gr.kind, gr.attrs.get("epilogue")) for gr in groups]
    per_layer = [("linear", "qkv"), ("attention", None), ("linear", "add"), ("linear", "swiglu"), ("linear", "add")]
    assert kinds == [("embedding", None)] + per_layer * CFG["n_layers"] + [("linear", None)]
    assert all(gr.attrs["norm"] is not None for gr in groups if gr.attrs.get("epilogue") in ("qkv", "swiglu"))
    assert "epilogue=qkv norm" in format_groups(groups)


@pytest.mark.parametrize("quant,layout", [(None, "half"), ("q4_1", "interleaved"), ("q4_0", "half"),
                                          ("q8_0", "interleaved")])
@pytest.mark.parametrize("batch,seq,past", [(1, 1, 0), (2, 5, 3), (1, 11, 0), (2, 17, 2)])
def test_run_matches_reference(quant, layout, batch, seq, past):
    model = tiny(quant, layout)
    ref, exe = isthmus.compile(model, target="reference"), isthmus.compile(model, target="numba")
    f = feeds(model, batch, seq, past)
    want, got = ref.run(f), exe.run(f)
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=2e-4 * (1 + np.abs(want[k]).max()), err_msg=k)


@pytest.mark.parametrize("quant", [None, "q4_1"])
def test_decoder_matches_reference_decoder(quant):
    model = tiny(quant)
    ref, exe = isthmus.compile(model, target="reference"), isthmus.compile(model, target="numba")
    d_ref, d = ref.decoder(), exe.decoder()
    assert type(d).__name__ == "NumbaDecoder"
    for ids in ([5, 9, 2, 40, 3, 3, 17, 60, 1], [7], [8], [1, 2], [66], [0]):
        want, got = d_ref.step(ids), d.step(ids).copy()
        assert d.length == d_ref.length
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * (1 + np.abs(want).max()))


def test_decode_step_allocates_no_arrays():
    exe = isthmus.compile(tiny("q8_0"), target="numba")
    d = exe.decoder()
    d.step([1, 2, 3])
    first = d.step([4])
    bound = d._bound[1][0]
    buffers = {id(a) for a in bound.env.values() if isinstance(a, np.ndarray)}
    second = d.step([5])
    assert second is first          # the same logits buffer, refilled
    assert {id(a) for a in bound.env.values() if isinstance(a, np.ndarray)} == buffers


def test_buffers_are_reused_across_layers():
    exe = isthmus.compile(tiny("q4_1"), target="numba")
    d = exe.decoder()
    d.step([1, 2, 3, 4])
    bound = d._bind(4)[0]
    owned = {id(a) for a in bound.env.values() if isinstance(a, np.ndarray) and a.dtype == np.float32}
    produced = sum(len(st.outs) for st in exe.plan.steps if st.kind != "op")
    assert len(owned) < produced / 2


def test_decoder_rejects_overflow_and_bad_ids():
    from isthmus.errors import InputError

    d = isthmus.compile(tiny(None), target="numba").decoder()
    with pytest.raises(InputError, match="out of range"):
        d.step([CFG["vocab_size"]])
    with pytest.raises(InputError, match="KV cache"):
        d.step(list(range(CFG["context_length"] + 1)))


def test_generate_matches_reference():
    from isthmus.runtime.generate import generate
    from isthmus.runtime.sampling import SamplingParams

    model = tiny("q4_1")
    outs = [list(generate(isthmus.compile(model, target=t), [3, 1, 4, 1, 5], SamplingParams(max_tokens=12)))
            for t in ("reference", "numba")]
    assert outs[0] == outs[1]


def test_unfused_graph_runs_through_op_kernels():
    """Ops outside any fusion group use the op kernels (or the reference) one by one."""
    g = Graph("misc")
    x = g.add_input("x", ("n", 33), "f32")
    w = g.add_constant("w", np.linspace(0.5, 1.5, 33, dtype=np.float32))
    y = g.add("rmsnorm", [x, w], {"eps": 1e-6})
    s = g.add("softmax", [y], {"axis": -1})
    z = g.add("gelu", [s], {"approximate": "tanh"})
    t = g.add("tanh", [z])
    g.set_outputs([t, s])
    xs = np.random.default_rng(3).standard_normal((5, 33)).astype(np.float32)
    want = isthmus.compile(g, target="reference").run({"x": xs})
    got = isthmus.compile(g, target="numba").run({"x": xs})
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_default_target_prefers_numba(monkeypatch):
    from isthmus.compiler import targets

    monkeypatch.delenv("ISTHMUS_TARGET", raising=False)
    monkeypatch.setattr(targets, "_cuda_available", lambda: False)
    assert targets.default_target() == "numba"
    monkeypatch.setenv("ISTHMUS_TARGET", "reference")
    assert targets.default_target() == "reference"


@pytest.fixture(scope="module")
def default_numba_exe(default_model):
    return isthmus.compile(default_model, target="numba")


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_default_model_greedy_matches_reference(default_model, default_exe, default_numba_exe, prompt):
    from isthmus.runtime.generate import generate
    from isthmus.runtime.sampling import SamplingParams

    ids = default_model.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=24)
    want = list(generate(default_exe, ids, params))
    got = list(generate(default_numba_exe, ids, params))
    assert got == want, (default_model.tokenizer.decode(got), default_model.tokenizer.decode(want))


def test_siblings_in_mixed_block_formats_still_decode_in_place():
    """A Q4_K_M file mixes formats among siblings (q4_k Q/K beside a q6_k V): the fused step runs one
    product per weight into its columns instead of giving up the qkv kernel and the in-place cache."""
    from isthmus.compiler.frontends import Model
    from isthmus.compiler.frontends.llama import build_llama
    from isthmus.compiler.quant import quantize
    from tiny_models import tiny_llama_weights

    w = tiny_llama_weights(CFG, seed=4)
    for i in range(CFG["n_layers"]):        # every sibling group of a layer mixes formats
        p = f"blk.{i}"
        for name, qtype in (("attn_q", "q4_0"), ("attn_k", "q4_1"), ("attn_v", "q8_0"), ("ffn_gate", "q8_0"),
                            ("ffn_up", "q4_1")):
            w[f"{p}.{name}.weight"] = quantize(w[f"{p}.{name}.weight"], qtype)
    model = Model(build_llama(CFG, w, rope_layout="interleaved"), "mixed", "test", dict(CFG))
    exe = isthmus.compile(model, target="numba")
    assert [(st.group.attrs.get("epilogue"), st.group.attrs.get("stacked")) for st in exe.plan.steps[1:6]] == \
        [("qkv", False), (None, None), ("add", True), ("swiglu", False), ("add", True)]
    ref, dec = isthmus.compile(model, target="reference").decoder(), exe.decoder()
    assert type(dec).__name__ == "NumbaDecoder"
    for ids in ([3, 7, 1, 9, 4, 11, 2, 5, 8, 13], [5], [2, 6], [1]):      # prefill (matmul), then matvec steps
        want = ref.step(ids)
        np.testing.assert_allclose(dec.step(ids), want, rtol=2e-4, atol=2e-4 * (1 + np.abs(want).max()))


def test_compiling_leaves_no_worker_team_on_the_callers_thread(tmp_path):
    """The warm-up's parallel launches run on a thread that ends with it: a thread that launched
    one keeps libgomp workers for as long as it lives, and two such teams on a small machine make
    every team's workers sleep between launches (a server's engine thread then decodes ~2.5x slower).
    Counted in a fresh process, by the OS threads before and after compiling."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import os, time, isthmus\n"
        "from tiny_models import tiny_llama_model\n"
        "m = tiny_llama_model(dict(n_layers=1, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, head_dim=16, "
        "vocab_size=67, rms_eps=1e-5, rope_theta=1e4, context_length=16), quant='q4_1')\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "exe = isthmus.compile(m, target='numba')\n"
        "deadline = time.monotonic() + 10\n"          # the ended thread's workers exit a moment later
        "while len(os.listdir('/proc/self/task')) > before and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "after = len(os.listdir('/proc/self/task'))\n"
        "d = exe.decoder(); d.step([1, 2])\n"
        "print(before, after, len(os.listdir('/proc/self/task')))\n")
    support = str(Path(__file__).parents[1] / "support")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": support}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, decoding = map(int, out.stdout.split())
    assert after == before < decoding          # the team appears with the first decode, on its thread

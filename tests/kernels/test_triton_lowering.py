"""`--target triton` against the reference target, under TRITON_INTERPRET=1 on CPU tensors (f32).

A tiny Llama (float and GGUF-quantized weights) through run(), the cached decoder and
generate(); an arbitrary graph op by op; and the errors a user can hit.
"""

import numpy as np
import pytest

from triton_interpreted import import_interpreted  # noqa: E402  tests/support

LOWERING, = import_interpreted("isthmus.compiler.lower.triton")


pytestmark = pytest.mark.usefixtures("triton_interpreter")     # tests/kernels/conftest.py

import isthmus  # noqa: E402
from isthmus.compiler.frontends import Model, load_model  # noqa: E402
from isthmus.compiler.frontends.llama import build_llama  # noqa: E402
from isthmus.compiler.ir import Graph  # noqa: E402
from isthmus.compiler.quant import quantize  # noqa: E402
from isthmus.errors import InputError, UnsupportedError  # noqa: E402
from isthmus.runtime.generate import generate  # noqa: E402
from isthmus.runtime.sampling import SamplingParams  # noqa: E402

QCONFIG = dict(n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=67,
               rms_eps=1e-5, rope_theta=10000.0, context_length=300)


def quantized_weights(cfg, seed=3):
    """Random GGUF-named weights: attention in q4_0 / q8_0, the MLP in q4_1, tied q8_0 embedding."""
    rng = np.random.default_rng(seed)
    D, F, H, KVH, hd, V = (cfg[k] for k in ("hidden", "ffn", "n_heads", "n_kv_heads", "head_dim", "vocab_size"))

    def mat(rows, cols, qtype):
        return quantize((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32), qtype)

    w = {"token_embd.weight": mat(V, D, "q8_0"), "output_norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)}
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}"
        w[f"{p}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[f"{p}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[f"{p}.attn_q.weight"] = mat(H * hd, D, "q4_0")
        w[f"{p}.attn_k.weight"] = mat(KVH * hd, D, "q4_0")
        w[f"{p}.attn_v.weight"] = mat(KVH * hd, D, "q8_0")
        w[f"{p}.attn_output.weight"] = mat(D, H * hd, "q4_0")
        w[f"{p}.ffn_gate.weight"] = mat(F, D, "q4_1")
        w[f"{p}.ffn_up.weight"] = mat(F, D, "q4_1")
        w[f"{p}.ffn_down.weight"] = mat(D, F, "q4_1")
    return w


@pytest.fixture(scope="module")
def quantized_model():
    g = build_llama(QCONFIG, quantized_weights(QCONFIG), rope_layout="interleaved", name="tiny-q")
    return Model(g, "tiny-q", "test", dict(QCONFIG))


def feeds_for(graph, ids, past=0):
    out = {"input_ids": np.asarray([ids]), "position_ids": np.arange(past, past + len(ids))[None]}
    for v in graph.inputs:
        if v.name.startswith("past"):
            out[v.name] = np.zeros((1, v.shape[1], 0, v.shape[3]), np.float32)
    return out


def test_run_matches_reference(tiny_model):
    ref = isthmus.compile(tiny_model, target="reference")
    exe = isthmus.compile(tiny_model, target="triton")
    assert exe.target == "triton"
    feeds = feeds_for(tiny_model.graph, [3, 7, 1])
    want, got = ref.run(feeds), exe.run(feeds)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_plan_binds_the_fusion_groups_the_numba_target_binds(tiny_model):
    from isthmus.compiler.lower.plan import label

    exe = isthmus.compile(tiny_model, target="triton")
    ops = [s.op for s in exe._plan.steps]
    layers = tiny_model.config["n_layers"]
    # per layer: norm + q|k|v + rope + cache append, attention, attn_out + residual,
    # norm + gate|up + swiglu, down + residual; then norm + the LM head
    assert ops == ["embedding"] + ["linear+norm+qkv", "attention", "linear+add", "linear+norm+swiglu",
                                   "linear+add"] * layers + ["linear+norm"]
    numba = isthmus.compile(tiny_model, target="numba")
    assert ops == [label(st) for st in numba.plan.steps]
    assert len(exe._plan.steps[1].outputs) == 3


@pytest.mark.parametrize("which", ["float", "quantized"])
def test_decoder_matches_reference(which, tiny_model, quantized_model):
    model = tiny_model if which == "float" else quantized_model
    ref = isthmus.compile(model, target="reference").decoder()
    exe = isthmus.compile(model, target="triton")
    dec = exe.decoder()
    assert type(dec).__name__ == "TritonDecoder"
    for ids in ([3, 7, 1, 9, 4], [5], [2, 6]):
        want, got = ref.step(ids), dec.step(ids)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert dec.length == ref.length == 8


def test_decoder_bf16_activations_as_on_a_gpu(quantized_model):
    """The GPU default: bf16 activations and KV cache (f32 accumulation), logits close to f32's."""
    ref = isthmus.compile(quantized_model, target="reference").decoder()
    dec = LOWERING.lower_triton(quantized_model.graph, model=quantized_model, dtype="bf16").decoder()
    assert dec.state.cache == {} and dec.exe.act_dtype == "bf16"
    for ids in ([3, 7, 1, 9], [5]):
        want, got = ref.step(ids), dec.step(ids)
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    import torch
    assert all(c.dtype == torch.bfloat16 for c in dec.state.cache.values())


def test_decoder_cache_grows_to_the_context_length(quantized_model):
    model = Model(quantized_model.graph, "tiny-q", "test", dict(QCONFIG, context_length=24))
    ref = isthmus.compile(model, target="reference").decoder()
    dec = isthmus.compile(model, target="triton").decoder(capacity=8)
    for ids in ([1, 2, 3, 4, 5, 6], [7, 8, 9], [10]):            # capacity 8, then 16
        np.testing.assert_allclose(dec.step(ids), ref.step(ids), rtol=1e-4, atol=1e-4)
    assert dec.capacity == 16 and dec.length == 10
    np.testing.assert_allclose(dec.step([11] * 9), ref.step([11] * 9), rtol=1e-4, atol=1e-4)
    assert dec.capacity == 24 and dec.length == 19
    with pytest.raises(InputError, match="context window"):
        dec.step([1] * 6)


def test_decoder_of_an_architecture_only_its_frontend_knows():
    """tests/support/sandwich_model.py: its own interface names and dims, post-norms, GeGLU, soft-capped
    logits; the triton decoder steps it as its numpy definition says."""
    from sandwich_model import numpy_logits, sandwich_model

    dec = isthmus.compile(sandwich_model(), target="triton").decoder()
    assert type(dec).__name__ == "TritonDecoder"
    seen = []
    for ids in ([5, 17, 3, 44], [12], [2, 8]):
        seen += ids
        want = numpy_logits(seen)[-1]
        np.testing.assert_allclose(dec.step(ids), want, rtol=0, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama3", "gemma2", "qwen3"])
def test_decoder_of_gguf_architectures_matches_transformers(arch, tmp_path):
    """No rotary (gpt2), Q/K/V biases (qwen2), rope factors (llama3) through the shared plan's qkv step; gemma2's
    soft-capped sliding-window attention on the host reference."""
    from hf_gguf import hf_logits, hf_model, write_gguf

    hf = hf_model(arch)
    ids = [3, 17, 5, 60, 22, 9, 41, 7, 2, 88, 14, 30, 20]
    want = hf_logits(hf, ids)
    dec = isthmus.compile(load_model(write_gguf(hf, tmp_path / "m.gguf", arch)), target="triton").decoder()
    assert type(dec).__name__ == "TritonDecoder"
    got = [dec.step(ids[:9])] + [dec.step([t]) for t in ids[9:]]
    for row, ref in zip(got, want[8:]):
        np.testing.assert_allclose(row, ref, rtol=0, atol=1e-4 * np.ptp(want))


def test_generate_greedy_same_tokens(tiny_model):
    params = SamplingParams(max_tokens=4, temperature=0.0)
    want = list(generate(isthmus.compile(tiny_model, target="reference"), [1, 2, 3], params))
    got = list(generate(isthmus.compile(tiny_model, target="triton"), [1, 2, 3], params))
    assert got == want and len(got) == 4


def test_profile_names_ops(tiny_model):
    exe = isthmus.compile(tiny_model, target="triton")
    exe.profiling = True
    exe.decoder().step([1, 2])
    ops = {p.op: p for p in exe.profile()}
    assert {"linear+norm+qkv", "attention", "linear+add", "linear+norm+swiglu", "linear+norm", "embedding"} == set(ops)
    assert ops["attention"].calls == tiny_model.config["n_layers"]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # the interpreter's numpy sigmoid
def test_arbitrary_graph_op_by_op():
    """Kernels where they exist (layernorm, gelu, softmax, matmul, add with a row bias), torch ops for
    data movement, the numpy reference for the rest (trilu)."""
    rng = np.random.default_rng(5)
    g = Graph("misc")
    x = g.add_input("x", ("n", 24), "f32")
    w = g.add_constant("w", rng.standard_normal((24, 40)).astype(np.float32))
    b = g.add_constant("b", rng.standard_normal(40).astype(np.float32))
    gamma = g.add_constant("gamma", (1 + 0.1 * rng.standard_normal(24)).astype(np.float32))
    h = g.add("layernorm", [x, gamma], {"eps": 1e-5})
    y = g.add("add", [g.add("matmul", [h, w]), b])
    y = g.add("gelu", [y], {"approximate": "tanh"})
    s = g.add("softmax", [g.add("reshape", [y], {"shape": [0, 5, 8]})], {"axis": 1})
    t = g.add("transpose", [s], {"perm": [0, 2, 1]})
    tri = g.add("trilu", [g.add("reshape", [t], {"shape": [-1, 5]})], {"upper": False, "k": 0})
    mx = g.add("reduce_max", [tri], {"axes": [1], "keepdims": True})
    g.set_outputs([tri, mx])
    feeds = {"x": rng.standard_normal((3, 24)).astype(np.float32)}
    want = isthmus.compile(g, target="reference").run(feeds)
    exe = isthmus.compile(g, target="triton")
    got = exe.run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    from isthmus.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match="not a decoder"):     # no decoder interface recorded
        exe.decoder()


def test_errors(tiny_model, monkeypatch):
    exe = isthmus.compile(tiny_model, target="triton")
    with pytest.raises(InputError, match="token id out of range"):
        exe.run(feeds_for(tiny_model.graph, [3, 999]))
    with pytest.raises(InputError, match="token id out of range"):
        exe.decoder().step([-1])
    import torch
    if not torch.cuda.is_available():
        with monkeypatch.context() as m:
            m.setattr(LOWERING, "interpreting", lambda: False)
            with pytest.raises(UnsupportedError, match="CUDA"):
                isthmus.compile(tiny_model, target="triton")
    monkeypatch.setenv("ISTHMUS_TRITON_DTYPE", "f64")
    with pytest.raises(UnsupportedError, match="ISTHMUS_TRITON_DTYPE"):
        isthmus.compile(tiny_model, target="triton")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_torch_dynamo_onnx_exports_run_as_onnxruntime_does(arch, tmp_path_factory):
    """The exports build positions and masks with host-run integer ops fed 0-d constants (range):
    the decoder of a dynamo export with its cache, against onnxruntime on the same file."""
    import onnxruntime as ort
    from onnx_exports import exported

    path = exported("dynamocache", arch, tmp_path_factory)[0] / "model.onnx"
    model = load_model(path)
    exe = isthmus.compile(model, target="triton")
    d = model.graph.decoder.resolve(model.graph)
    feeds = {d.input_ids.name: np.asarray([[3, 17, 5, 9]], np.int64)}
    if d.position_ids is not None:
        feeds[d.position_ids.name] = np.arange(4)[None]
    for past in d.pasts:
        feeds[past.name] = np.zeros((1, past.shape[1], 0, past.shape[3]), np.float32)
    if model.graph.decoder.attention_mask is not None:
        feeds[model.graph.decoder.attention_mask] = np.ones((1, 4), np.int64)
    want = ort.InferenceSession(str(path)).run([d.logits.name], feeds)[0]
    got = exe.run(feeds)[d.logits.name]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.ptp(want))

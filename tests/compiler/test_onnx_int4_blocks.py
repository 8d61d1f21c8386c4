"""MatMulNBits / GatherBlockQuantized weights kept as 4-bit q4_1 blocks where that is exact.

4 bits in blocks of 32 with a scale d and zero point zp per block are ggml's q4_1 (value = q * d + m,
m = -zp * d) when d and m are exactly f16s; then the ONNX frontend reorders the nibbles and keeps the
weight 4-bit (no f32 copy), and the numba target runs it on its q4 kernels. Otherwise (an f32 scale
or an m that f16 would round, columns that do not fill the blocks: the committed genai exports,
hidden size 48 and f32 scales) the weight is dequantized exactly to f32 as before.

Oracles that share no code with isthmus: a few lines of numpy reading the ONNX tensors, and
onnxruntime (accuracy level 0: f32 activations) on the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import isthmus  # noqa: E402
from isthmus.compiler.frontends import load_model  # noqa: E402
from isthmus.compiler.quant import QuantizedArray  # noqa: E402

GENAI_INT4 = Path(__file__).resolve().parents[1] / "data" / "genai" / "int4" / "model.onnx"
V, D, F = 96, 64, 96        # vocab, hidden, mlp width: multiples of the 32-value block
MS = "com.microsoft"


def _pack_nbits(q: np.ndarray) -> np.ndarray:
    """[N, blocks, 32] values 0-15 -> MatMulNBits bytes [N, blocks, 16]: value 2i low, 2i + 1 high."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _f16_scales(rng, shape, coarse=False) -> np.ndarray:
    """f32 scales that are exactly f16s; `coarse` ones (7 significant bits) keep -zp * d an f16 too."""
    sign = rng.choice([-1.0, 1.0], shape)
    if coarse:
        return (sign * rng.integers(16, 128, shape) * 2.0 ** -13).astype(np.float32)
    return (sign * rng.uniform(0.002, 0.02, shape)).astype(np.float16).astype(np.float32)


def _model(nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "int4", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def _tiny_decoder(path: Path, seed=0) -> Path:
    """A genai-builder-shaped int4 stack: the embedding a GatherBlockQuantized on the tied lm_head's
    blocks (through a Reshape, as the builder writes it), an MLP with zero points, the lm_head."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def blocks(name, n, k, zp=False):
        q = rng.integers(0, 16, (n, k // 32, 32), dtype=np.uint8)
        inits.append(numpy_helper.from_array(_pack_nbits(q), f"{name}.weight_Q4"))
        inits.append(numpy_helper.from_array(_f16_scales(rng, (n, k // 32), coarse=zp), f"{name}.weight_scales"))
        ins = ["", f"{name}.weight_Q4", f"{name}.weight_scales"]
        if zp:
            z = rng.integers(0, 16, (n, k // 32), dtype=np.uint8)
            inits.append(numpy_helper.from_array((z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1),
                                                 f"{name}.weight_zp"))
            ins.append(f"{name}.weight_zp")
        return ins

    def matmul(name, x, n, k, ins):
        nodes.append(helper.make_node("MatMulNBits", [x, *ins[1:]], [f"{name}.out"], domain=MS, name=name,
                                      K=k, N=n, bits=4, block_size=32, accuracy_level=0))
        return f"{name}.out"

    head = blocks("lm_head", V, D)
    inits.append(numpy_helper.from_array(np.array([V, D // 2], np.int64), "table_shape"))
    nodes.append(helper.make_node("Reshape", [head[1], "table_shape"], ["table"], name="embed/Reshape"))
    nodes.append(helper.make_node("GatherBlockQuantized", ["table", "input_ids", head[2]], ["embed"], domain=MS,
                                  name="embed", bits=4, block_size=32, gather_axis=0, quantize_axis=1))
    up = matmul("up", "embed", F, D, blocks("up", F, D, zp=True))
    nodes.append(helper.make_node("Relu", [up], ["act"], name="act"))
    down = matmul("down", "act", D, F, blocks("down", D, F))
    nodes.append(helper.make_node("Add", ["embed", down], ["hidden"], name="residual"))
    matmul("lm_head", "hidden", V, D, head)
    nodes[-1].output[0] = "logits"
    model = _model(nodes, inits, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", V])])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _numpy_weights(path: Path) -> dict[str, np.ndarray]:
    """Each MatMulNBits node's f32 [N, K] weight read from the ONNX tensors: (q - zp) * scale."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n, k, block = a["N"], a["K"], a["block_size"]
        packed = inits[node.input[1]].reshape(n, -1)
        q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1, block).astype(np.float32)
        scale = inits[node.input[2]].astype(np.float32).reshape(n, -1, 1)
        zp = np.full(scale.shape, 8, np.float32)
        if len(node.input) > 3 and node.input[3]:
            z = inits[node.input[3]].reshape(n, -1)
            zp = np.stack([z & 15, z >> 4], axis=-1).reshape(n, -1)[:, :q.shape[1], None].astype(np.float32)
        out[node.name] = ((q - zp) * scale).reshape(n, -1)[:, :k]
    return out


def _weights(graph) -> dict[str, object]:
    """ONNX node name -> the weight constant its linear or embedding reads."""
    return {node.source: node.inputs[int(node.op == "linear")] for node in graph.nodes
            if node.op in ("linear", "embedding")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny_decoder(tmp_path_factory.mktemp("int4") / "model.onnx")


def test_weights_stay_q4_1_and_dequantize_as_the_onnx_tensors(tiny):
    model = load_model(tiny)
    weights = _weights(model.graph)
    assert set(weights) == {"embed", "up", "down", "lm_head"}
    want = _numpy_weights(tiny)
    for name, w in weights.items():
        assert isinstance(w.data, QuantizedArray) and w.data.qtype == "q4_1", (name, w.type)
        got = w.data.dequantize()
        ref = want["lm_head" if name == "embed" else name]
        # bit for bit, but for the sign of a zero ((8 - 8) * -d is -0, 8 * d - 8 * d is +0)
        np.testing.assert_array_equal((got + np.float32(0)).view(np.uint32), (ref + np.float32(0)).view(np.uint32))
    assert weights["embed"] is weights["lm_head"]          # the tied blocks are one constant
    assert not any(v.dtype == "f32" and v.data.size >= D * D for v in model.graph.constants)   # no f32 copy
    assert sum(w.data.nbytes for w in set(weights.values())) == (V * D + F * D + D * F) // 32 * 20


def test_targets_run_the_blocks_as_onnxruntime(tiny):
    ids = np.array([[3, 1, 95, 40, 7]], np.int64)
    want = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    model = isthmus.load(str(tiny))
    # numba dots the 4-bit weights with i16-quantized activations (1e-4 of the range)
    for target, tol in (("reference", 1e-5), ("numba", 1e-3)):
        exe = isthmus.compile(model, target=target)
        got = exe.run({"input_ids": ids})["logits"]
        err = np.abs(got - want).max() / np.ptp(want)
        assert err <= tol, f"{target}: {err:.3g} of the logits' range"
        if target == "numba":
            packed = [st.group.attrs["packed"] for st in exe.plan.steps if st.kind in ("linear", "embedding")]
            parts = [q for p in packed for q in getattr(p, "parts", [p])]
            assert len(packed) == 4 and all(p.kind == "q4" for p in parts), [p.kind for p in parts]


def _one_node(path: Path, scale: np.ndarray, zp: np.ndarray | None, k: int, n: int = 8) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    blocks = -(-k // 32)
    q = rng.integers(0, 16, (n, blocks, 32), dtype=np.uint8)
    inits = [numpy_helper.from_array(_pack_nbits(q), "W"), numpy_helper.from_array(scale.reshape(-1), "S")]
    ins = ["x", "W", "S"]
    if zp is not None:
        inits.append(numpy_helper.from_array((zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1), "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain=MS, name="mm", K=k, N=n, bits=4, block_size=32)
    model = _model([node], inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])])
    onnx.save(model, str(path))
    return path, rng.standard_normal((3, k)).astype(np.float32)


@pytest.mark.parametrize("case", ["f32 scale", "m not an f16", "k not whole blocks"])
def test_inexact_blocks_keep_the_exact_f32_weight(tmp_path, case):
    n, k = 8, 40 if case == "k not whole blocks" else 64
    scale = np.full((n, 2), 2.0 ** -7, np.float32)
    zp = None
    if case == "f32 scale":
        scale[3, 1] = np.float32(0.1)                          # 0.1 rounds in f16
    elif case == "m not an f16":
        scale[:] = np.float32(np.float16(0.0999))              # an f16 with all 11 bits used ...
        zp = np.full((n, 2), 3, np.uint8)                      # ... times 3 is not one
        assert np.float32(np.float16(-3 * scale[0, 0])) != -3 * scale[0, 0]
    path, x = _one_node(tmp_path / "model.onnx", scale, zp, k, n)
    (w,) = _weights(load_model(path).graph).values()
    assert w.dtype == "f32" and isinstance(w.data, np.ndarray)
    np.testing.assert_array_equal(w.data, _numpy_weights(path)["mm"])
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = isthmus.compile(isthmus.load(str(path)), target="reference").run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_published_int4_export_keeps_f32():
    """The builder's cpu int4 export: hidden size 48 (not whole blocks) and f32 scales that f16
    would round, so every weight is the exact f32 matrix, equal to numpy's reading."""
    graph = load_model(GENAI_INT4).graph
    want = _numpy_weights(GENAI_INT4)
    got = {name: w for name, w in _weights(graph).items() if name in want}
    assert len(got) == len(want) == 11
    for name, w in got.items():
        assert w.dtype == "f32"
        np.testing.assert_array_equal(w.data, want[name])


@pytest.mark.slow
def test_genai_builder_int4_of_a_bf16_checkpoint_stays_4_bit(tmp_path):
    """The builder's cpu int4 export (symmetric, block 32) of a bf16 checkpoint with hidden size 64:
    its f32 scales are +-(a bf16 weight) / 8, exact f16s, so every MatMulNBits is kept as q4_1 (about
    10 s: the builder runs)."""
    pytest.importorskip("onnxruntime_genai")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from onnx_exports import VOCAB, export_genai

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_theta=500.0, bos_token_id=1, eos_token_id=2)
    source = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(4.0)
    path = export_genai(source.to(torch.bfloat16), tmp_path, "int4") / "model.onnx"
    exact = onnx.load(str(path))              # onnxruntime on f32 activations: accuracy level 0
    for node in exact.graph.node:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = 0
    onnx.save(exact, str(tmp_path / "exact.onnx"), save_as_external_data=True, location="exact.onnx.data")

    model = load_model(path)
    want_w = _numpy_weights(path)
    got_w = {name: w for name, w in _weights(model.graph).items() if name in want_w}
    assert len(got_w) == len(want_w) == 11
    for name, w in got_w.items():
        assert w.dtype == "q4_1", (name, w.type)
        np.testing.assert_array_equal(w.data.dequantize() + np.float32(0), want_w[name] + np.float32(0))
    sess = ort.InferenceSession(str(tmp_path / "exact.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 17, 42, 99, 7, 250]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds.update({i.name: np.zeros((1, 1, 0, 16), np.float32) for i in sess.get_inputs() if i.name.startswith("past")})
    want = sess.run(["logits"], feeds)[0]
    for target, tol in (("reference", 1e-5), ("numba", 1e-3)):
        exe = isthmus.compile(model, target=target)
        err = np.abs(exe.run(feeds)["logits"] - want).max() / np.ptp(want)
        assert err <= tol, f"{target}: {err:.3g} of the logits' range"
    kinds = [q.kind for st in exe.plan.steps if st.kind == "linear"
             for q in getattr(st.group.attrs["packed"], "parts", [st.group.attrs["packed"]])]
    assert kinds and all(k == "q4" for k in kinds), kinds

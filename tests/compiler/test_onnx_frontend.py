"""ONNX frontend: torch-exported decoders run as onnxruntime runs them, and bad files fail cleanly.

The two decoders are defined here with random weights (nothing is downloaded) and exported once
per module with torch.onnx.export(dynamo=True) and a dynamic sequence dim, then run at two
lengths through isthmus (load_onnx -> compile_model(reference)) and onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper  # noqa: E402

from isthmus.compiler.frontends.onnx import load_onnx  # noqa: E402
from isthmus.compiler.ir import Graph  # noqa: E402
from isthmus.compiler.ir_text import parse_graph, print_graph  # noqa: E402
from isthmus.compiler.passes.constant_fold import constant_fold  # noqa: E402
from isthmus.compiler.targets import compile_model  # noqa: E402
from isthmus.errors import ModelFormatError, UnsupportedError  # noqa: E402

nn, F = torch.nn, torch.nn.functional
VOCAB = 100
SEQS = (5, 11)


# -- the models ------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x):               # as HF's LlamaRMSNorm
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def repeat_kv(x, rep):                  # as HF: expand + reshape
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)


class LlamaBlock(nn.Module):
    def __init__(self, d, hq, hkv, hd, ff):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, hd
        self.ln1, self.ln2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k = nn.Linear(d, hq * hd, bias=False), nn.Linear(d, hkv * hd, bias=False)
        self.v, self.o = nn.Linear(d, hkv * hd, bias=False), nn.Linear(hq * hd, d, bias=False)
        self.gate, self.up = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        h = self.ln1(x)
        q = self.q(h).view(b, s, self.hq, self.hd).transpose(1, 2)
        k = self.k(h).view(b, s, self.hkv, self.hd).transpose(1, 2)
        v = self.v(h).view(b, s, self.hkv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, self.hq // self.hkv), repeat_kv(v, self.hq // self.hkv)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.hd ** -0.5 + mask
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        x = x + self.o(torch.matmul(p, v).transpose(1, 2).reshape(b, s, self.hq * self.hd))
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    """Hidden 96 (not a multiple of 64), head_dim 24, 4 query heads over 2 kv heads."""

    def __init__(self, d=96, hq=4, hkv=2, hd=24, ff=160, layers=2, theta=10000.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList([LlamaBlock(d, hq, hkv, hd, ff) for _ in range(layers)])
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids):
        s = input_ids.shape[1]
        freqs = torch.arange(s)[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


class GPT2Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.h, d // self.h).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(d, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.fc(self.ln2(x))           # GELU, tanh form, written out as HF's NewGELUActivation
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return x + self.fc2(h)


class TinyGPT2(nn.Module):
    """Hidden 72, 3 heads of 24, fused qkv, learned positions, tied head, biases everywhere."""

    def __init__(self, d=72, h=3, layers=2, ctx=32):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList([GPT2Block(d, h) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        with torch.no_grad():          # no all-ones / all-zeros parameters the exporter could share
            for p in self.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def forward(self, input_ids):
        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1]))[None]
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def _export(model: nn.Module, path) -> str:
    model.eval()
    seq = torch.export.Dim("seq", min=2, max=32)
    torch.onnx.export(model, (torch.randint(0, VOCAB, (1, 7)),), str(path), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {1: seq}}, verbose=False)
    return str(path)


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    torch.manual_seed(0)
    return _export(TinyLlama(), tmp_path_factory.mktemp("llama") / "llama.onnx")


@pytest.fixture(scope="module")
def gpt2_onnx(tmp_path_factory):
    torch.manual_seed(1)
    return _export(TinyGPT2(), tmp_path_factory.mktemp("gpt2") / "gpt2.onnx")


def _run_both(path):
    """(compiled executable, [(isthmus logits, onnxruntime logits) per sequence length])."""
    exe = compile_model(load_onnx(path), target="reference")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    pairs = []
    for s in SEQS:
        ids = rng.integers(0, VOCAB, (1, s)).astype(np.int64)
        pairs.append((exe.run({"input_ids": ids})["logits"], sess.run(["logits"], {"input_ids": ids})[0]))
    return exe, pairs


def _attention_nodes(exe):
    return [n for n in exe.graph.nodes if n.op == "attention"]


# -- end to end against onnxruntime ----------------------------------------------------------------

def test_llama_matches_onnxruntime(llama_onnx):
    exe, pairs = _run_both(llama_onnx)
    for (ours, theirs), s in zip(pairs, SEQS):
        assert ours.shape == theirs.shape == (1, s, VOCAB)
        assert np.abs(ours - theirs).max() <= 1e-4
    hist = exe.graph.op_histogram()
    assert hist.get("rmsnorm") == 5 and hist.get("swiglu") == 2 and hist.get("attention") == 2, hist
    for gone in ("softmax", "reduce_mean", "sqrt", "reciprocal", "sigmoid", "pow", "trilu", "expand"):
        assert gone not in hist, hist
    for node in _attention_nodes(exe):     # causal from the triu(-inf) mask; GQA kept as 2 kv heads
        assert node.attrs["causal"] is True and len(node.inputs) == 3
        assert node.inputs[0].shape[1] == 4 and node.inputs[1].shape[1] == 2
        assert node.attrs["scale"] == pytest.approx(24 ** -0.5, rel=1e-6)


def test_gpt2_matches_onnxruntime(gpt2_onnx):
    exe, pairs = _run_both(gpt2_onnx)
    for (ours, theirs), s in zip(pairs, SEQS):
        assert ours.shape == theirs.shape == (1, s, VOCAB)
        assert np.abs(ours - theirs).max() <= 1e-4
    hist = exe.graph.op_histogram()
    assert hist.get("layernorm") == 5 and hist.get("gelu") == 2 and hist.get("attention") == 2, hist
    for gone in ("softmax", "tanh", "pow", "trilu", "where", "constant_of_shape"):
        assert gone not in hist, hist
    assert all(n.attrs["approximate"] == "tanh" for n in exe.graph.nodes if n.op == "gelu")
    for node in _attention_nodes(exe):     # SDPA(is_causal=True)'s where(tril == 0, -FLT_MAX, 0) mask
        assert node.attrs["causal"] is True and len(node.inputs) == 3
        assert node.attrs["scale"] == pytest.approx(24 ** -0.5, rel=1e-5)


def test_import_keeps_names_symbols_sources_and_weights_by_reference(llama_onnx):
    g = load_onnx(llama_onnx)
    proto = onnx.load(llama_onnx, load_external_data=False)
    assert [(v.name, v.shape, v.dtype) for v in g.inputs] == [("input_ids", (1, "seq"), "i64")]
    assert [(v.name, v.shape) for v in g.outputs] == [("logits", (1, "seq", VOCAB))]
    onnx_names = {n.name for n in proto.graph.node}
    assert g.nodes and all(n.source in onnx_names for n in g.nodes)
    external = [t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external, "the exporter is expected to write weights beside the model"
    consts = {v.name: v for v in g.constants}
    for name in external:       # memory-mapped, read-only views of the .data file: no copy
        data = consts[name].data
        assert not data.flags.owndata and not data.flags.writeable
    # the imported graph (new ops, symbolic attributes) prints and parses back
    again = parse_graph(print_graph(g), {v.name: v.data for v in g.constants})
    assert again.op_histogram() == g.op_histogram()


# -- op coverage against onnxruntime on hand-built graphs ----------------------------------------

def _model(nodes, inputs, outputs, inits=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _tensor(name, arr):
    return onnx.numpy_helper.from_array(np.asarray(arr), name)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _check_against_ort(tmp_path, model, feeds_list, rtol=1e-5, atol=1e-5):
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    exe = compile_model(load_onnx(path))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for feeds in feeds_list:
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        got = exe.run(feeds)
        assert set(got) == set(want)
        for k in want:
            assert got[k].shape == want[k].shape, k
            np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)
    return exe


def test_dynamic_shape_arithmetic_and_shape_built_tensors(tmp_path):
    """Shape -> Gather/Slice -> Concat -> Reshape / Expand / ConstantOfShape / Range with a dynamic seq."""
    F32, I64 = TensorProto.FLOAT, TensorProto.INT64
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "one"], ["seq"], name="gather_seq", axis=0),
        helper.make_node("Unsqueeze", ["seq", "axes0"], ["seq1"], name="unsq_seq"),
        helper.make_node("Concat", ["batch_neg", "seq1", "heads", "hd"], ["tgt"], name="concat_tgt", axis=0),
        helper.make_node("Reshape", ["x", "tgt"], ["x4"], name="reshape_heads"),
        helper.make_node("Transpose", ["x4"], ["xt"], name="to_heads", perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["seq1", "seq1"], ["ss"], name="concat_ss", axis=0),
        helper.make_node("ConstantOfShape", ["ss"], ["ones"], name="cos_ones",
                         value=helper.make_tensor("v", F32, [1], [1.0])),
        helper.make_node("Trilu", ["ones"], ["tril"], name="tril", upper=0),
        helper.make_node("Range", ["zero", "seq", "one"], ["pos"], name="range_pos"),
        helper.make_node("Cast", ["pos"], ["posf"], name="cast_pos", to=F32),
        helper.make_node("Expand", ["posf", "ss"], ["grid"], name="expand_grid"),
        helper.make_node("Mul", ["tril", "grid"], ["mask"], name="mul_mask"),
        helper.make_node("Slice", ["x", "zero1", "seqslice", "axes1"], ["xs"], name="slice_to_seq"),
        helper.make_node("Shape", ["x"], ["last2"], name="shape_tail", start=-2),
        helper.make_node("ReduceSum", ["xs", "axes_last"], ["rs"], name="reduce_sum", keepdims=0),
    ]
    inits = [_tensor("one", np.int64(1)), _tensor("zero", np.int64(0)), _tensor("axes0", [0]),
             _tensor("batch_neg", [-1]), _tensor("heads", [3]), _tensor("hd", [4]), _tensor("zero1", [0]),
             _tensor("seqslice", [np.iinfo(np.int64).max]), _tensor("axes1", [1]), _tensor("axes_last", [-1])]
    model = _model(nodes, [_vi("x", F32, [2, "seq", 12])],
                   [_vi(n, F32, None) for n in ("xt", "mask", "rs")] + [_vi("last2", I64, None)], inits)
    rng = np.random.default_rng(0)
    exe = _check_against_ort(tmp_path, model, [{"x": rng.standard_normal((2, s, 12)).astype(np.float32)}
                                               for s in (1, 4, 9)])
    assert [v.shape for v in exe.graph.outputs[:2]] == [(2, 3, "seq", 4), ("seq", "seq")]


def _unary_binary_model():
    F32 = TensorProto.FLOAT
    un = ["Neg", "Abs", "Exp", "Sqrt", "Reciprocal", "Erf", "Tanh", "Sigmoid", "Cos", "Sin", "Relu"]
    nodes = [helper.make_node("Abs", ["b"], ["pa"], name="abs_b"),
             helper.make_node("Add", ["pa", "eps"], ["pos"], name="pos")]
    outs = []
    for op in un:
        nodes.append(helper.make_node(op, ["pos" if op in ("Sqrt", "Reciprocal") else "a"], [op.lower()], name=op))
        outs.append(op.lower())
    for op in ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"]:
        ins = ["pos", "b"] if op == "Pow" else ["a", "b"]
        nodes.append(helper.make_node(op, ins, [f"{op.lower()}_ab"], name=f"{op}_ab"))
        outs.append(f"{op.lower()}_ab")
    nodes += [
        helper.make_node("Less", ["a", "b"], ["lt"], name="less"),
        helper.make_node("Greater", ["a", "b"], ["gt"], name="greater"),
        helper.make_node("Equal", ["lt", "gt"], ["eq"], name="equal"),
        helper.make_node("Where", ["eq", "a", "b"], ["where"], name="where"),
        helper.make_node("Softmax", ["a"], ["softmax"], name="softmax", axis=-1),
        helper.make_node("ReduceMean", ["a", "ax_last"], ["rmean"], name="rmean", keepdims=1),
        helper.make_node("ReduceMax", ["a", "ax1"], ["rmax"], name="rmax", keepdims=0),
        helper.make_node("LayerNormalization", ["a", "w", "bias"], ["ln"], name="ln", epsilon=1e-5),
        helper.make_node("Gelu", ["a"], ["gelu"], name="gelu"),
        helper.make_node("Gelu", ["a"], ["gelu_t"], name="gelu_t", approximate="tanh"),
        helper.make_node("Split", ["a"], ["s0", "s1"], name="split", axis=-1, num_outputs=2),
        helper.make_node("Unsqueeze", ["s1", "ax0"], ["s0u"], name="unsqueeze"),
        helper.make_node("Squeeze", ["s0u", "ax0"], ["sq"], name="squeeze"),
        helper.make_node("Flatten", ["a"], ["a2"], name="flatten", axis=2),
        helper.make_node("Gemm", ["a2", "wg", "bg"], ["gemm"], name="gemm", transB=1),
        helper.make_node("Gemm", ["a2", "wg2", "bg2"], ["gemm2"], name="gemm2", alpha=0.5, beta=2.0),
        helper.make_node("Identity", ["where"], ["ident"], name="ident"),
        helper.make_node("Cast", ["lt"], ["lt_f"], name="cast", to=F32),
        helper.make_node("MatMul", ["a", "wm"], ["mm"], name="mm"),
    ]
    outs += ["eq", "where", "softmax", "rmean", "rmax", "ln", "gelu", "gelu_t", "s0", "sq", "gemm", "gemm2",
             "ident", "lt_f", "mm"]
    rng = np.random.default_rng(1)
    inits = [_tensor("eps", np.float32(0.1)), _tensor("ax0", [0]), _tensor("ax1", [1]), _tensor("ax_last", [-1]),
             _tensor("w", rng.standard_normal(8).astype(np.float32)),
             _tensor("bias", rng.standard_normal(8).astype(np.float32)),
             _tensor("wg", rng.standard_normal((5, 8)).astype(np.float32)),
             _tensor("bg", rng.standard_normal(5).astype(np.float32)),
             _tensor("wg2", rng.standard_normal((8, 5)).astype(np.float32)),
             _tensor("bg2", rng.standard_normal((1, 5)).astype(np.float32)),
             _tensor("wm", rng.standard_normal((8, 3)).astype(np.float32))]
    return _model(nodes, [_vi("a", F32, [1, 6, 8]), _vi("b", F32, [1, 6, 8])],
                  [_vi(o, TensorProto.BOOL if o == "eq" else F32, None) for o in outs], inits)


def test_elementwise_norm_reduce_and_gemm_ops(tmp_path):
    rng = np.random.default_rng(2)
    feeds = [{"a": rng.standard_normal((1, 6, 8)).astype(np.float32),
              "b": rng.standard_normal((1, 6, 8)).astype(np.float32)}]
    exe = _check_against_ort(tmp_path, _unary_binary_model(), feeds)
    assert "linear" in exe.graph.op_histogram()      # Gemm with transB keeps the [out, in] weight


def test_gather_nd_sequences_isnan_and_integer_comparisons(tmp_path):
    """Ops HF graphs bring: GatherND (padding masks), SplitToSequence/SequenceAt (unoptimised
    torch.onnx split), IsNaN (SDPA's guard), LessOrEqual on positions."""
    F32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    nodes = [helper.make_node("GatherND", ["data", "idx"], ["nd"], name="gather_nd"),
             helper.make_node("SplitToSequence", ["x", "sizes"], ["seq"], name="to_seq", axis=-1),
             helper.make_node("SequenceAt", ["seq", "one"], ["mid"], name="seq_at_1"),
             helper.make_node("SequenceAt", ["seq", "minus_one"], ["last"], name="seq_at_last"),
             helper.make_node("IsNaN", ["x"], ["nan"], name="isnan"),
             helper.make_node("LessOrEqual", ["i", "j"], ["le"], name="le"),
             helper.make_node("GreaterOrEqual", ["i", "j"], ["ge"], name="ge")]
    inits = [_tensor("sizes", [2, 3, 3]), _tensor("one", np.int64(1)), _tensor("minus_one", np.int64(-1))]
    model = _model(nodes, [_vi("data", I64, ["b", "s"]), _vi("idx", I64, [3, 4, 2]), _vi("x", F32, [2, 8]),
                           _vi("i", I64, ["n"]), _vi("j", I64, ["n"])],
                   [_vi("nd", I64, None), _vi("mid", F32, None), _vi("last", F32, None), _vi("nan", BOOL, None),
                    _vi("le", BOOL, None), _vi("ge", BOOL, None)], inits)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    x[0, 3] = np.nan
    feeds = {"data": rng.integers(0, 9, (3, 5)), "idx": np.stack([rng.integers(-3, 3, (3, 4)),
                                                                  rng.integers(-5, 5, (3, 4))], axis=-1),
             "x": x, "i": rng.integers(0, 4, 6), "j": rng.integers(0, 4, 6)}
    _check_against_ort(tmp_path, model, [feeds])


def test_opset_9_attribute_forms(tmp_path):
    """In old opsets axes, split sizes and slice bounds were attributes, not inputs."""
    F32 = TensorProto.FLOAT
    nodes = [helper.make_node("ReduceMean", ["a"], ["m"], name="mean", axes=[-1]),
             helper.make_node("ReduceSum", ["a"], ["s"], name="sum", axes=[1], keepdims=0),
             helper.make_node("Split", ["a"], ["p0", "p1"], name="split", axis=2, split=[3, 5]),
             helper.make_node("Unsqueeze", ["p0"], ["u"], name="unsq", axes=[0]),
             helper.make_node("Squeeze", ["u"], ["q"], name="sq", axes=[0]),
             helper.make_node("Softmax", ["p1"], ["sm"], name="softmax", axis=2),
             helper.make_node("Slice", ["a"], ["sl"], name="slice", starts=[1], ends=[4], axes=[1])]
    model = _model(nodes, [_vi("a", F32, [1, 6, 8])], [_vi(o, F32, None) for o in ("m", "s", "q", "sm", "sl")],
                   opset=9)
    _check_against_ort(tmp_path, model, [{"a": np.random.default_rng(3).standard_normal((1, 6, 8)).astype(np.float32)}])


# -- errors ------------------------------------------------------------------------------------

def test_unsupported_ops_are_all_listed_at_once(tmp_path):
    F32 = TensorProto.FLOAT
    nodes = [helper.make_node("Hardmax", ["x"], ["h1"], name="hard_1"),
             helper.make_node("Relu", ["h1"], ["r"], name="relu"),
             helper.make_node("Hardmax", ["r"], ["h2"], name="hard_2"),
             helper.make_node("Einsum", ["h2", "x"], ["y"], name="einsum_0", equation="ij,ij->ij")]
    path = tmp_path / "unsupported.onnx"
    onnx.save(_model(nodes, [_vi("x", F32, [2, 3])], [_vi("y", F32, [2, 3])]), str(path))
    with pytest.raises(UnsupportedError) as info:
        load_onnx(path)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("Hardmax", "hard_1", "hard_2", "Einsum", "einsum_0"):
        assert part in msg
    assert "Relu" not in msg


def test_bad_files_raise_model_format_error(tmp_path, llama_onnx):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = open(llama_onnx, "rb").read()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 3])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (junk, truncated, empty, tmp_path / "missing.onnx", tmp_path):
        with pytest.raises(ModelFormatError) as info:
            load_onnx(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_or_short_external_data_is_a_format_error(tmp_path, gpt2_onnx):
    import shutil

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(gpt2_onnx, folder / "model.onnx")
    data_name = next(t.external_data[0].value for t in onnx.load(gpt2_onnx, load_external_data=False).graph.initializer
                     if t.data_location == TensorProto.EXTERNAL)
    with pytest.raises(ModelFormatError, match="missing"):
        load_onnx(folder / "model.onnx")
    data = open(gpt2_onnx.replace("gpt2.onnx", data_name), "rb").read()
    (folder / data_name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        load_onnx(folder / "model.onnx")


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    t = _tensor("w", np.zeros(4, np.float32))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        t.external_data.add(key=k, value=v)
    (tmp_path / "secret.bin").write_bytes(bytes(16))
    sub = tmp_path / "sub"
    sub.mkdir()
    model = _model([helper.make_node("Add", ["x", "w"], ["y"], name="add")],
                   [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", TensorProto.FLOAT, [4])], [t])
    onnx.save(model, str(sub / "m.onnx"))
    with pytest.raises(ModelFormatError, match="outside"):
        load_onnx(sub / "m.onnx")


def test_constant_fold_folds_shape_of_a_static_value():
    g = Graph("s")
    x = g.add_input("x", (2, 3, 4), "f32")
    shp = g.add("shape", [x], {"start": 1})
    tgt = g.add("concat", [g.const([-1], "i64"), g.add("gather", [shp, g.const([1], "i64")])], {"axis": 0})
    g.set_outputs([g.add("reshape", [x], {"shape": [-1, 4]}), tgt])
    folded = constant_fold(g)
    assert "shape" not in folded.op_histogram() and "concat" not in folded.op_histogram()
    assert folded.outputs[1].data.tolist() == [-1, 4]

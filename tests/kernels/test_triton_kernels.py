"""Triton kernels against the numpy reference ops, under TRITON_INTERPRET=1 on CPU tensors.

Shapes are small and odd (1, 3, 127, 129, ...) so every mask and tail is exercised; where a
kernel tiles, a forced small `config` makes it take several tiles and K steps. The GPU
figures come from benchmarks/gpu_check.py.
"""

import numpy as np
import pytest

from triton_interpreted import import_interpreted  # noqa: E402  tests/support

import_interpreted(*(f"isthmus.kernels.triton.{m}" for m in (
    "_aot", "attention", "elementwise", "embedding", "matmul", "norm", "qmatmul", "rope", "softmax")))
import torch  # noqa: E402
from isthmus.kernels.triton import (_aot, attention, elementwise, embedding, matmul, norm, qmatmul,  # noqa: E402
                                    rope, softmax)


pytestmark = pytest.mark.usefixtures("triton_interpreter")     # tests/kernels/conftest.py

from isthmus.compiler import quant  # noqa: E402
from isthmus.compiler.ops import attention as ref_attn  # noqa: E402
from isthmus.compiler.ops import elementwise as ref_ew  # noqa: E402,F401  (registers the ops)
from isthmus.compiler.ops import get_op  # noqa: E402
from isthmus.compiler.ops import matmul as ref_mm  # noqa: E402
from isthmus.compiler.ops import norm as ref_norm  # noqa: E402
from isthmus.compiler.ops import reduce as ref_reduce  # noqa: E402

RNG = np.random.default_rng(1234)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def close(got, want, tol=2e-5):
    got = got.float().numpy() if isinstance(got, torch.Tensor) else got
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= tol * scale, f"max error {err} (scale {scale})"


# -- norms ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 127), (2, 3, 129)])
def test_rmsnorm(shape):
    x, w = rand(*shape), rand(shape[-1])
    close(norm.rmsnorm(T(x), T(w), 1e-5), ref_norm.rmsnorm(x, w, 1e-5))
    close(norm.rmsnorm(T(x), T(w), 1e-5, persistent=2), ref_norm.rmsnorm(x, w, 1e-5))   # programs walk rows


def test_rmsnorm_fused_residual_and_f16():
    x, r, w = rand(4, 129), rand(4, 129), rand(129)
    res = T(r.copy())
    close(norm.rmsnorm(T(x), T(w), 1e-6, residual=res), ref_norm.rmsnorm(x + r, w, 1e-6))
    close(res, x + r)
    x16 = x.astype(np.float16)
    got = norm.rmsnorm(T(x16), T(w.astype(np.float16)), 1e-6)
    assert got.dtype == torch.float16
    close(got, ref_norm.rmsnorm(x16.astype(np.float32), w.astype(np.float16).astype(np.float32), 1e-6), 2e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm(bias):
    x, w, b = rand(3, 127) * 3 + 1, rand(127), rand(127)
    got = norm.layernorm(T(x), T(w), T(b) if bias else None, 1e-5)
    close(got, ref_norm.layernorm(x, w, b if bias else None, 1e-5))


# -- softmax --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 127), (5, 129)])
def test_softmax(shape):
    x = rand(*shape) * 4
    close(softmax.softmax(T(x)), ref_reduce.softmax(x))
    close(softmax.softmax(T(x), persistent=2), ref_reduce.softmax(x))   # a few programs walk the rows
    close(softmax.softmax(T(x), block=32), ref_reduce.softmax(x))    # the looped kernel, several chunks


def test_softmax_masked_rows_and_f16():
    x = rand(3, 70)
    x[0] = -np.inf                 # a fully masked row gives zeros
    x[1, 5:] = -np.inf
    for kw in ({}, {"block": 16}):
        got = softmax.softmax(T(x), **kw)
        close(got, ref_reduce.softmax(x))
        assert not torch.isnan(got).any()
    x16 = rand(2, 129).astype(np.float16)
    close(softmax.softmax(T(x16)), ref_reduce.softmax(x16.astype(np.float32)), 2e-3)


# -- rope -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dim", [0, 6])
def test_rope(layout, dim):
    x = rand(2, 3, 5, 10)
    pos = RNG.integers(0, 300, size=(2, 5))
    close(rope.rope(T(x), T(pos), 10000.0, layout, dim), ref_attn.rope(x, pos, 10000.0, layout, dim))
    pos1 = np.arange(7, 12)
    close(rope.rope(T(x), T(pos1), 500.0, layout, dim), ref_attn.rope(x, pos1, 500.0, layout, dim))


def test_rope_strided_input_into_cache_slice():
    y = rand(1, 4, 17 * 8)                        # a projection [batch, seq, heads*dim]
    x = T(y).view(1, 4, 17, 8).transpose(1, 2)    # [batch, heads, seq, dim] view, read in place
    pos = np.arange(3, 7)[None]
    cache = torch.zeros(1, 17, 10, 8)
    out = cache[:, :, 3:7]
    rope.rope(x, T(pos), layout="interleaved", out=out)
    want = ref_attn.rope(np.ascontiguousarray(x.numpy()), pos, layout="interleaved")
    close(cache[:, :, 3:7], want)
    assert not cache[:, :, :3].any() and not cache[:, :, 7:].any()
    inplace = T(np.ascontiguousarray(x.numpy()))
    rope.rope(inplace, T(pos), out=inplace)
    close(inplace, ref_attn.rope(np.ascontiguousarray(x.numpy()), pos))


# -- elementwise ----------------------------------------------------------------------------------

def test_swiglu_separate_and_fused_halves():
    g, u = rand(3, 129), rand(3, 129)
    want = get_op("swiglu").reference(g, u)
    close(elementwise.swiglu(T(g), T(u)), want)
    close(elementwise.swiglu(T(np.concatenate([g, u], axis=-1))), want)
    gu = T(np.concatenate([g, u], axis=-1))
    close(elementwise.swiglu(gu[:, :129], gu[:, 129:]), want)      # strided views


@pytest.mark.parametrize("kind,op,attrs", [("silu", "silu", {}), ("sigmoid", "sigmoid", {}),
                                           ("gelu", "gelu", {"approximate": "none"}),
                                           ("gelu_tanh", "gelu", {"approximate": "tanh"})])
def test_activations(kind, op, attrs):
    x = rand(2, 1, 127) * 3
    close(elementwise.activation(T(x), kind), get_op(op).reference(x, **attrs), 1e-5)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_binary_same_shape_and_row_broadcast(op):
    a, b, row = rand(3, 129), rand(3, 129) + 4, rand(129) + 4
    ref = get_op(op).reference
    close(elementwise.binary(T(a), T(b), op), ref(a, b))
    close(elementwise.binary(T(a), T(row), op), ref(a, row))


# -- attention ------------------------------------------------------------------------------------

ATTN_SHAPES = [  # batch, q heads, kv heads, seq, total, head_dim
    (1, 1, 1, 1, 1, 8), (2, 4, 2, 5, 5, 16), (1, 6, 2, 3, 40, 8), (2, 4, 1, 1, 37, 16), (1, 2, 2, 20, 33, 24),
]


@pytest.mark.parametrize("b,hq,hkv,s,t,d", ATTN_SHAPES)
@pytest.mark.parametrize("decode", [False, True])
def test_attention(b, hq, hkv, s, t, d, decode):
    q, k, v = rand(b, hq, s, d), rand(b, hkv, t, d), rand(b, hkv, t, d)
    close(attention.attention(T(q), T(k), T(v), decode=decode), ref_attn.attention(q, k, v), 1e-5)


def test_attention_tiles_and_splits():
    q, k, v = rand(1, 2, 37, 16), rand(1, 1, 45, 16), rand(1, 1, 45, 16)
    want = ref_attn.attention(q, k, v)
    close(attention.attention(T(q), T(k), T(v), decode=False, config={"BLOCK_M": 16, "BLOCK_N": 16}), want, 1e-5)
    close(attention.attention(T(q), T(k), T(v), causal=False, decode=False, config={"BLOCK_M": 16, "BLOCK_N": 16}),
          ref_attn.attention(q, k, v, causal=False), 1e-5)
    q1 = q[:, :, -3:]
    for splits in (1, 3):
        close(attention.attention(T(q1), T(k), T(v), decode=True, splits=splits, config={"BLOCK_N": 16}),
              ref_attn.attention(q1, k, v), 1e-5)


def test_attention_reads_a_cache_view_with_scale_and_16_bit():
    cache_k, cache_v = torch.zeros(1, 2, 64, 16), torch.zeros(1, 2, 64, 16)
    k, v = rand(1, 2, 21, 16), rand(1, 2, 21, 16)
    cache_k[:, :, :21], cache_v[:, :, :21] = T(k), T(v)
    q = rand(1, 4, 2, 16)
    want = ref_attn.attention(q, k, v, scale=0.3)
    close(attention.attention(T(q), cache_k[:, :, :21], cache_v[:, :, :21], scale=0.3), want, 1e-5)
    for dt in (torch.float16, torch.bfloat16):
        got = attention.attention(T(q).to(dt), cache_k[:, :, :21].to(dt), cache_v[:, :, :21].to(dt), scale=0.3)
        assert got.dtype == dt
        close(got, want, 3e-2)


# -- matmul ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 70, 33), (37, 70, 129), (5, 127, 3)])
def test_matmul(m, k, n):
    a, b = rand(m, k), rand(k, n)
    close(matmul.matmul(T(a), T(b)), a @ b, 1e-5)
    close(matmul.matmul(T(a), T(b), gemv=not m <= matmul.GEMV_MAX_M), a @ b, 1e-5)


def test_matmul_tiles_batch_bias_residual():
    a, b, bias, r = rand(2, 37, 70), rand(70, 33), rand(33), rand(2, 37, 33)
    want = a @ b + bias + r
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4}
    close(matmul.matmul(T(a), T(b), T(bias), residual=T(r), config=small), want, 1e-5)
    close(matmul.matmul(T(a[:, :3]), T(b), T(bias), residual=T(r[:, :3]), config={"BLOCK_N": 16, "BLOCK_K": 16}),
          want[:, :3], 1e-5)
    bb = rand(2, 70, 33)
    close(matmul.matmul(T(a), T(bb)), a @ bb, 1e-5)


def test_linear_and_16_bit():
    x, w = rand(2, 3, 96), rand(129, 96)
    close(matmul.linear(T(x), T(w)), ref_mm.linear(x, w), 1e-5)
    for dt in (torch.float16, torch.bfloat16):
        got = matmul.linear(T(x).to(dt), T(w).to(dt))
        assert got.dtype == dt
        close(got, ref_mm.linear(x, w), 2e-2)


# -- quantized matmul and embedding ----------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_repack_dequantize_matches_ggml(qtype):
    w = quant.quantize(rand(33, 96), qtype)
    pw = qmatmul.repack(qtype, w.shape, w.raw)
    assert pw.nbytes == w.nbytes
    np.testing.assert_array_equal(qmatmul.dequantize(pw).numpy(), w.dequantize())


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("m", [1, 3, 7])
def test_qlinear(qtype, m):
    w = quant.quantize(rand(33, 288), qtype)
    pw = qmatmul.repack(qtype, w.shape, w.raw)
    x = rand(m, 288)
    want = ref_mm.linear(x, w)
    close(qmatmul.qlinear(T(x), pw), want, 1e-5)
    close(qmatmul.qlinear(T(x), pw, gemv=m > qmatmul.GEMV_MAX_M), want, 1e-5)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_qlinear_tiles_bias_residual(qtype):
    w = quant.quantize(rand(45, 160), qtype)
    pw = qmatmul.repack(qtype, w.shape, w.raw)
    x, bias, r = rand(2, 9, 160), rand(45), rand(2, 9, 45)
    want = ref_mm.linear(x, w, bias) + r
    close(qmatmul.qlinear(T(x), pw, T(bias), residual=T(r), gemv=False,
                          config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}), want, 1e-5)
    close(qmatmul.qlinear(T(x[:, :1]), pw, T(bias), residual=T(r[:, :1]), gemv=True,
                          config={"BLOCK_N": 16, "BLOCK_K": 64}), want[:, :1], 1e-5)
    got = qmatmul.qlinear(T(x).to(torch.float16), pw, gemv=False)
    assert got.dtype == torch.float16
    close(got, ref_mm.linear(x, w), 2e-2)


@pytest.mark.parametrize("qtype", [None, "q4_0", "q4_1", "q8_0"])
def test_embedding(qtype):
    table = rand(37, 96)
    ids = np.array([[0, 36, 5], [5, 17, 2]])
    if qtype is None:
        close(embedding.embedding(T(table), T(ids)), ref_mm.embedding(table, ids))
        close(embedding.embedding(T(table[:, :3]), T(ids[0])), ref_mm.embedding(table[:, :3], ids[0]))
    else:
        q = quant.quantize(table, qtype)
        pw = qmatmul.repack(qtype, q.shape, q.raw)
        close(embedding.embedding(pw, T(ids)), ref_mm.embedding(q, ids))
        assert embedding.embedding(pw, T(ids), dtype=torch.float16).dtype == torch.float16


# -- ahead-of-time compilation records ------------------------------------------------------------

def test_launches_record_every_autotune_variant():
    """What `gpu_check.py --compile-only` compiles: one variant per launch and tuning config."""
    pw = qmatmul.PackedWeight("q4_1", 64, 64, torch.empty(64, 32, dtype=torch.uint8),
                              torch.empty(64, 2, dtype=torch.float16), torch.empty(64, 2, dtype=torch.float16))
    launches = _aot.record(lambda: (matmul.matmul(torch.empty(64, 64), torch.empty(64, 64)),
                                    qmatmul.qlinear(torch.empty(1, 64), pw),
                                    attention.attention(torch.empty(1, 2, 64, 64), torch.empty(1, 1, 64, 64),
                                                        torch.empty(1, 1, 64, 64), decode=False)))
    names = [name for name, *_ in _aot.variants(launches)]
    assert 1 <= names.count("_matmul_kernel") < len(matmul._configs())     # pruned: M is 64, inputs f32
    assert names.count("_qgemv_kernel") == len(qmatmul._gemv_configs())
    assert names.count("_prefill_kernel") == 4

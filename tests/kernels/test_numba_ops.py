"""Each Numba kernel against its op's numpy reference, over random shapes (odd sizes included)."""

import numpy as np
import pytest

pytest.importorskip("numba")

from isthmus.compiler.ops import get_op  # noqa: E402
from isthmus.compiler.quant import packable_together, quantize  # noqa: E402
from isthmus.kernels.numba import activation, attention, linear, norm, rope, softmax  # noqa: E402

RNG = np.random.default_rng(1234)
SHAPES = [(1, 7), (3, 5, 33), (2, 1, 96), (17, 130)]


def ref(op, *args, **attrs):
    return get_op(op).reference(*args, **attrs)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def close_linear(got, want):
    """Decode-sized linears quantize activations to i16 per block (simd.py): errors scale with
    the magnitude of the values summed, so the tolerance does too."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + np.abs(want).max()))


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_layernorm(shape):
    x, w, b = rand(*shape), rand(shape[-1]), rand(shape[-1])
    np.testing.assert_allclose(norm.rmsnorm(x, w, 1e-5), ref("rmsnorm", x, w, eps=1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.layernorm(x, w, b, 1e-5), ref("layernorm", x, w, b, eps=1e-5), rtol=1e-4, atol=1e-4)


def test_norm_parallel_path():
    x, w = rand(300, 257), rand(257)
    np.testing.assert_allclose(norm.rmsnorm(x, w, 1e-6), ref("rmsnorm", x, w, eps=1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES + [(130, 257)])
def test_softmax(shape):
    x = rand(*shape) * 10
    np.testing.assert_allclose(softmax.softmax(x), ref("softmax", x, axis=-1), rtol=1e-5, atol=1e-7)


def test_softmax_masked_rows_and_axis():
    x = rand(4, 9)
    x[1] = -np.inf
    x[2, :4] = -np.inf
    got = softmax.softmax(x)
    np.testing.assert_allclose(got, ref("softmax", x, axis=-1), rtol=1e-5, atol=1e-7)
    assert np.all(got[1] == 0)
    y = rand(5, 6, 7)
    np.testing.assert_allclose(softmax.softmax(y, axis=1), ref("softmax", y, axis=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES + [(70, 1001)])
def test_activations(shape):
    g, u = rand(*shape) * 4, rand(*shape)
    np.testing.assert_allclose(activation.swiglu(g, u), ref("swiglu", g, u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(activation.silu(g), ref("silu", g), rtol=1e-5, atol=1e-6)
    for approx in ("none", "tanh"):
        np.testing.assert_allclose(activation.gelu(g, approx), ref("gelu", g, approximate=approx), rtol=1e-5, atol=1e-5)


def test_exp_edges():
    x = np.array([-np.inf, -100, -87.0, -1e-3, 0, 1, 50, 88.0, 89, np.inf], np.float32)
    got = activation.silu(x)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ref("silu", x)
    np.testing.assert_allclose(got[1:-1], want[1:-1], rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("shape,dim", [((1, 3, 5, 8), 0), ((2, 4, 3, 10), 6), ((1, 9, 1, 64), 0), ((1, 16, 70, 64), 0)])
def test_rope(layout, shape, dim):
    x = rand(*shape)
    pos = RNG.integers(0, 500, size=(shape[0], shape[2]))
    want = ref("rope", x, pos, theta=10000.0, layout=layout, dim=dim)
    np.testing.assert_allclose(rope.rope(x, pos, 10000.0, layout, dim), want, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(rope.rope(x, pos[0], 10000.0, layout, dim)[:1], ref(
        "rope", x[:1], pos[0], theta=10000.0, layout=layout, dim=dim), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("b,hq,hkv,seq,past,hd,causal", [
    (1, 9, 3, 1, 0, 64, True), (1, 9, 3, 1, 37, 64, True), (2, 4, 4, 5, 3, 7, True),
    (1, 6, 2, 11, 0, 16, True), (2, 2, 1, 3, 4, 5, False),
    (1, 6, 2, 20, 3, 16, True), (2, 4, 2, 17, 0, 9, False),      # seq >= 4, hd % 16 == 0: tiles; hd 9: BLAS
    (1, 9, 3, 4, 300, 64, True), (2, 8, 2, 33, 40, 32, True), (1, 4, 2, 6, 5, 80, False)])
def test_attention(b, hq, hkv, seq, past, hd, causal):
    q, k, v = rand(b, hq, seq, hd), rand(b, hkv, past + seq, hd), rand(b, hkv, past + seq, hd)
    want = ref("attention", q, k, v, causal=causal, scale=0.0)
    cap = past + seq + 3           # a cache with spare capacity, as the decoder holds it
    kc = np.zeros((b, hkv, cap, hd), np.float32)
    vc = np.zeros_like(kc)
    kc[:, :, :past + seq], vc[:, :, :past + seq] = k, v
    got = attention.attention(q, kc, vc, past, causal)
    np.testing.assert_allclose(got, want.transpose(0, 2, 1, 3).reshape(b, seq, hq * hd), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seq,past", [(1, 0), (1, 30), (5, 9), (20, 3), (17, 0)])    # decode kernel; tiles
@pytest.mark.parametrize("softcap,window", [(0.5, 0), (0.0, 4), (2.0, 7)])
def test_attention_softcap_and_window(seq, past, softcap, window):
    """Gemma 2's soft-capped scores and sliding windows against the op's reference definition."""
    b, hq, hkv, hd = 2, 6, 2, 16
    q, k, v = rand(b, hq, seq, hd) * 3, rand(b, hkv, past + seq, hd), rand(b, hkv, past + seq, hd)
    want = ref("attention", q, k, v, causal=True, scale=0.0, softcap=softcap, window=window)
    got = attention.attention(q, k, v, past, True, softcap=softcap, window=window)
    np.testing.assert_allclose(got, want.transpose(0, 2, 1, 3).reshape(b, seq, hq * hd), rtol=1e-4, atol=1e-5)
    if past + seq > max(window, 1):        # with more keys than the window (or one key) either one matters
        assert np.abs(attention.attention(q, k, v, past, True) - got).max() > 1e-3


@pytest.mark.parametrize("hq,hkv,hd,softcap,window,causal", [
    (9, 3, 64, 0.0, 0, True), (6, 2, 16, 0.5, 0, True), (4, 2, 32, 0.0, 7, True), (4, 4, 16, 0.0, 0, False)])
def test_attention_tiles_give_a_query_the_same_bits_in_any_prompt_part(hq, hkv, hd, softcap, window, causal):
    """A prompt part of TILES_MIN_SEQ queries or more takes the tile kernel, whose every query is
    computed by the same instructions in the same order whatever part it is in: a 40-token prompt
    after 23 cached positions read whole and in parts of 4-16 gives each query the same bits."""
    from isthmus.kernels.numba.attention_tiles import TILES_MIN_SEQ

    b, past, seq = 2, 23, 40
    q = rand(b, hq, seq, hd) * 2
    k, v = rand(b, hkv, past + seq + 5, hd), rand(b, hkv, past + seq + 5, hd)
    whole = attention.attention(q, k, v, past, causal, softcap=softcap, window=window)
    at = 0
    for n in (4, 9, 16, 11):
        assert n >= TILES_MIN_SEQ
        if causal:      # a part sees the cache up to its own last position
            part = attention.attention(q[:, :, at:at + n], k, v, past + at, True, softcap=softcap, window=window)
            assert np.array_equal(part, whole[:, at:at + n]), (at, n)
        at += n
    want = ref("attention", q, k[:, :, :past + seq], v[:, :, :past + seq], causal=causal, scale=0.0,
               softcap=softcap, window=window)
    np.testing.assert_allclose(whole, want.transpose(0, 2, 1, 3).reshape(b, seq, hq * hd), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("int_dot", [True, False], ids=["i16-act", "f32-act"])
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", None])
@pytest.mark.parametrize("n", [1, 3, 20])
@pytest.mark.parametrize("rows,cols", [(37, 64), (5, 96), (48, 96)])     # 48: three groups of 16 rows
def test_linear(qtype, n, rows, cols, int_dot, monkeypatch):
    if int_dot and not linear.INT_ACTIVATIONS:
        pytest.skip("no AVX2 here: the integer dot products are not used")
    monkeypatch.setattr(linear, "INT_ACTIVATIONS", int_dot)
    wf = rand(rows, cols)
    w = quantize(wf, qtype) if qtype else wf
    x = rand(n, cols)
    want = ref("linear", x, w)
    ws = linear.Workspace()
    p = linear.pack(w)
    assert p.grouped == (int_dot and qtype is not None and rows % 16 == 0)       # grouped.py's layout
    out = np.empty((n, rows), np.float32)
    close_linear(linear.linear(x, p, out, ws), want)
    # epilogues: residual add, and a norm prologue
    res = rand(n, rows)
    close_linear(linear.linear(x, p, np.empty_like(out), ws, res=res, epilogue=linear.EPI_ADD), want + res)
    nw = rand(cols)
    h = np.empty_like(x)
    got = linear.linear(x, p, np.empty_like(out), ws, norm=(nw, 1e-5), h=h)
    close_linear(got, ref("linear", ref("rmsnorm", x, nw, eps=1e-5), w))


@pytest.mark.parametrize("n", [1, 2, 12])
@pytest.mark.parametrize("rows", [29, 32])
def test_linear_swiglu_stacked(n, rows):
    gf, uf = rand(rows, 64), rand(rows, 64)
    g, u = quantize(gf, "q4_1"), quantize(uf, "q4_1")
    x = rand(n, 64)
    p = linear.pack([g, u])
    assert p.splits == (rows, rows) and packable_together([g, u])
    got = linear.linear(x, p, np.empty((n, rows), np.float32), linear.Workspace(), epilogue=linear.EPI_SWIGLU)
    close_linear(got, ref("swiglu", ref("linear", x, g), ref("linear", x, u)))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", None])
@pytest.mark.parametrize("rows", [50, 64])
def test_embedding_and_dequantize(qtype, rows):
    tf = rand(rows, 64)
    t = quantize(tf, qtype) if qtype else tf
    ids = np.array([0, rows - 1, 7, 7], np.int64)
    p = linear.pack(t)
    got = linear.embedding(p, ids, np.empty((4, 64), np.float32))
    np.testing.assert_allclose(got, ref("embedding", t, ids), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(p.dequantize(), ref("embedding", t, np.arange(rows)), rtol=1e-6, atol=1e-6)

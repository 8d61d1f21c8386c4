"""The Numba kernels on GGUF blocks kept as blocks (kernels/numba/kquant.py: q5_0, q5_1,
q2_k..q6_k; iq4_nl is repacked as q8_0) against an oracle sharing no code with isthmus: weights quantized by llama.cpp
(tests/support/ggml_ref.py) and dequantized by the gguf package, multiplied in float64.

Tolerance: activations may be quantized to i16 per 32-block and sums run in f32, so an output's
error is bounded relative to sum_j |w_j| |x_j| (1e-3 of it; layout mistakes give ~1e-1). Where
the host has VNNI, q4_k and q6_k decode with i8 activations, one scale per 256 values (as llama.cpp's
q8_K): each x_j is then off by up to half a step, amax of its 256-block / 254, which adds
sum_j |w_j| amax_j / 254."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

pytest.importorskip("numba")
import ggml_ref  # noqa: E402  tests/support

from isthmus.compiler.quant import QuantizedArray  # noqa: E402
from isthmus.kernels.numba import linear  # noqa: E402
from isthmus.kernels.numba.kquant_simd import I8_FORMATS  # noqa: E402

pytestmark = pytest.mark.skipif(not ggml_ref.available(), reason="needs llama-cpp-python (peers extra)")

QTYPES = ["q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
RNG = np.random.default_rng(7)


def weight(qtype, rows, cols, seed=0):
    """(QuantizedArray made by llama.cpp, its values per gguf's dequantizer)."""
    wf = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    wf[0] *= 1e-3                                  # a row of small values: tiny f16 scales
    raw = ggml_ref.quantize(wf, T[qtype.upper()])
    return QuantizedArray(qtype, wf.shape, raw), gguf.quants.dequantize(raw, T[qtype.upper()])


def check(got, x, wd, extra=0.0, i8=False):
    x64, w64 = x.astype(np.float64), wd.astype(np.float64)
    want = x64 @ w64.T + extra
    bound = 1e-3 * (np.abs(x64) @ np.abs(w64).T) + 1e-6 * np.abs(extra)
    if i8:
        step = np.repeat(np.abs(x64).reshape(len(x64), -1, 256).max(axis=2), 256, axis=1) / 254
        bound = bound + step @ np.abs(w64).T
    err = np.abs(got - want)
    assert np.all(err <= bound), f"worst {float((err / bound).max()):.2f} x the bound"


@pytest.mark.parametrize("int_dot", [True, False], ids=["i16-act", "f32-act"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_linear_on_blocks(qtype, int_dot, monkeypatch):
    if int_dot and not linear.INT_ACTIVATIONS:
        pytest.skip("no AVX2 here: the integer dot products are not used")
    monkeypatch.setattr(linear, "INT_ACTIVATIONS", int_dot)
    cols = 512
    qa, wd = weight(qtype, 37, cols)
    p = linear.pack(qa)
    assert p.cols == cols and p.rows == 37
    # the file's bytes (iq4_nl: as q8_0 blocks, 34 bytes per 32 values), never an fp32 copy
    assert p.nbytes == (37 * cols // 32 * 34 if qtype == "iq4_nl" else qa.nbytes)
    ws = linear.Workspace()
    for n in (1, 3, linear.MATVEC_MAX_ROWS + 5):                          # decode (matvec) and prefill
        x = RNG.standard_normal((n, cols)).astype(np.float32)
        i8 = int_dot and qtype in I8_FORMATS and n <= linear.MATVEC_MAX_ROWS
        check(linear.linear(x, p, np.empty((n, 37), np.float32), ws), x, wd, i8=i8)
        res = RNG.standard_normal((n, 37)).astype(np.float32)
        got = linear.linear(x, p, np.empty((n, 37), np.float32), ws, res=res, epilogue=linear.EPI_ADD)
        check(got, x, wd, extra=res, i8=i8)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_and_embedding_match_gguf(qtype):
    qa, wd = weight(qtype, 9, 256 * 3, seed=1)
    p = linear.pack(qa)
    np.testing.assert_array_equal(p.dequantize(), wd)
    ids = np.array([8, 0, 3, 3], np.int64)
    np.testing.assert_array_equal(linear.embedding(p, ids, np.empty((4, 768), np.float32)), wd[ids])


@pytest.mark.parametrize("n", [1, 12])
def test_swiglu_over_stacked_k_quant_siblings(n):
    (g, gd), (u, ud) = weight("q4_k", 29, 256, seed=2), weight("q4_k", 29, 256, seed=3)
    p = linear.pack([g, u])
    assert p.splits == (29, 29)
    x = RNG.standard_normal((n, 256)).astype(np.float32)
    got = linear.linear(x, p, np.empty((n, 29), np.float32), linear.Workspace(), epilogue=linear.EPI_SWIGLU)
    gate, up = x.astype(np.float64) @ gd.T, x.astype(np.float64) @ ud.T
    want = gate / (1 + np.exp(-gate)) * up
    scale = (np.abs(x) @ np.abs(gd).T) * (np.abs(x) @ np.abs(ud).T)
    assert np.all(np.abs(got - want) <= 2e-3 * scale)


def test_mixed_formats_do_not_stack():
    with pytest.raises(ValueError, match="cannot stack"):
        linear.pack([weight("q4_k", 4, 256)[0], weight("q6_k", 4, 256)[0]])

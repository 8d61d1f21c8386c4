"""Ahead-of-time weight conversion: kernels/numba/weight_pack.py against a plain numpy statement of the layout."""

import ml_dtypes
import numpy as np
import pytest

from isthmus.kernels.numba import weight_pack
from isthmus.compiler.quant import quantize


def layout(wt: np.ndarray, parts: int, piece_cols: int) -> np.ndarray:
    """W^T [k, n] as pieces of `piece_cols` outputs: [parts, kt-1, cols] then the last K-tile's rows."""
    k, n = wt.shape
    kt = -(-k // parts)
    kf = (kt - 1) * parts
    out = []
    for o0 in range(0, n, piece_cols):
        cols = wt[:, o0:o0 + piece_cols]
        out += [cols[:kf].reshape(kt - 1, parts, -1).transpose(1, 0, 2).reshape(-1), cols[kf:].reshape(-1)]
    return np.concatenate(out)


@pytest.mark.parametrize("qtype", ["q4_1", "q4_0", "q8_0", "bf16", None])
def test_pack_matches_the_layout(qtype):
    w = np.random.default_rng(0).standard_normal((300, 160)).astype(np.float32)
    data = quantize(w, qtype) if qtype else w
    ref = data.dequantize() if qtype else w
    assert np.array_equal(weight_pack.dequantize(data), ref)
    rows = np.array([5, 3, -1] + list(range(297)))          # permuted outputs, one zero row
    cols = np.arange(160)[::-1].copy()
    cols[7] = -1                                            # a zero input column
    wt = np.zeros((160, 300), np.float32)
    for j, r in enumerate(rows):
        if r >= 0:
            wt[:, j] = np.where(cols >= 0, ref[r, cols], 0.0)
    want = layout(wt, 128, 256)
    f32, _ = weight_pack.pack(data, "f32", 128, 256, rows=rows, cols=cols)
    assert np.array_equal(f32, want)
    hi, lo = weight_pack.pack(data, "bf16", 128, 256, rows=rows, cols=cols, split=True)
    assert np.array_equal(hi, want.astype(ml_dtypes.bfloat16))            # round to nearest even
    assert np.array_equal(lo, (want - hi.astype(np.float32)).astype(ml_dtypes.bfloat16))
    err = np.abs(hi.astype(np.float32) + lo.astype(np.float32) - want)
    assert err.max() <= 2.0 ** -16 * np.abs(want).max()                    # hi + lo: ~16 significant bits


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q5_1"])
def test_formats_without_a_row_decoder_pack_their_dequantized_values(qtype):
    """Block formats this packer does not decode fall back to their dequantizer (checked against
    gguf in test_quant.py); the layout is the same as for floats."""
    import ggml_ref  # tests/support
    from gguf import GGMLQuantizationType as T

    from isthmus.compiler.quant import QuantizedArray

    if not ggml_ref.available():
        pytest.skip("needs llama-cpp-python (peers extra)")
    w = np.random.default_rng(1).standard_normal((40, 256)).astype(np.float32)
    data = QuantizedArray(qtype, w.shape, ggml_ref.quantize(w, T[qtype.upper()]))
    ref = data.dequantize()
    assert np.array_equal(weight_pack.dequantize(data), ref)
    f32, _ = weight_pack.pack(data, "f32", 128, 256)
    assert np.array_equal(f32, layout(ref.T.copy(), 128, 256))

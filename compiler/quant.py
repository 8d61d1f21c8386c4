"""ggml tensor storage formats, defined once.

GGUF files store each tensor in one of ggml's types: plain floats, or blocks of 32 values that
share a scale. `GGML_TYPES` names every type id ggml has assigned, so a file using one isthmus
does not implement fails with the type's name rather than a bare number. `QuantizedArray` holds
a block-quantized tensor as its raw bytes (usually a read-only view into the memory-mapped file)
and dequantizes on demand; `quantize` makes such tensors, as ggml's reference quantizers do.

Block layouts (little-endian; llama.cpp's ggml-common.h and dequantize_row_* in ggml-quants.c).
32-value blocks:
    q8_0:   f16 d, 32 x int8 q                          value = q * d
    q4_0:   f16 d, 16 bytes of nibbles                   value = (q - 8) * d
    q4_1:   f16 d, f16 m, 16 bytes of nibbles            value = q * d + m
    q5_0:   f16 d, u32 qh, 16 bytes of nibbles           value = (q - 16) * d
    q5_1:   f16 d, f16 m, u32 qh, 16 bytes of nibbles    value = q * d + m
    iq4_nl: f16 d, 16 bytes of nibbles                   value = d * IQ4_NL_VALUES[q]
In these, byte j holds value j in its low nibble and value j + 16 in its high nibble; the 5-bit
types add bit j of qh as bit 4 of value j. The k-quants group 256 values into a super-block with
an f16 scale d (and f16 dmin) and small per-sub-block integer scales (and mins):
    q2_k: u8 scales[16] (low nibble scale, high nibble min, one per 16 values), 64 bytes of 2-bit q,
          f16 d, f16 dmin                                value = d * sc * q - dmin * mn
    q3_k: 32 bytes hmask, 64 bytes of 2-bit q, 12 bytes of 16 6-bit scales, f16 d
                                                         value = d * (sc - 32) * (q - (hbit ? 0 : 4))
    q4_k: f16 d, f16 dmin, 12 bytes of 8 6-bit scales and 8 6-bit mins (one per 32), 128 bytes nibbles
                                                         value = d * sc * q - dmin * mn
    q5_k: as q4_k, with 32 bytes qh between scales and nibbles giving bit 4 of q
    q6_k: 128 bytes low nibbles, 64 bytes of high 2-bit pairs, int8 scales[16] (one per 16), f16 d
                                                         value = d * sc * (q - 32)
Within a k-quant super-block the bits of value i sit as `_kquant_values` unpacks them (each
128-value half reads one 32-byte run of 2-bit q at shifts 0, 2, 4, 6; q4_k/q5_k read 32 bytes
per 64 values, low nibbles first).
bf16 is stored here too (one "block" per value), because numpy has no bfloat16 dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from isthmus.errors import UnsupportedError


class GGMLType(NamedTuple):
    name: str  # ggml's spelling, e.g. "Q4_1"
    block_size: int  # values per block
    type_size: int  # bytes per block


_QK_K = 256  # super-block size of the k-quants
# Every id ggml has assigned (ids 4, 5, 31-33, 36-38 were retired). Only the sizes of the
# types in SUPPORTED matter to isthmus; the rest are listed so the reader can bounds-check
# and name them.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 2 + 16),
    3: GGMLType("Q4_1", 32, 2 + 2 + 16),
    6: GGMLType("Q5_0", 32, 2 + 4 + 16),
    7: GGMLType("Q5_1", 32, 2 + 2 + 4 + 16),
    8: GGMLType("Q8_0", 32, 2 + 32),
    9: GGMLType("Q8_1", 32, 4 + 4 + 32),
    10: GGMLType("Q2_K", 256, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    11: GGMLType("Q3_K", 256, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    12: GGMLType("Q4_K", 256, 2 + 2 + _QK_K // 2 + 12),
    13: GGMLType("Q5_K", 256, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    14: GGMLType("Q6_K", 256, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    15: GGMLType("Q8_K", 256, 4 + _QK_K + _QK_K // 8),
    16: GGMLType("IQ2_XXS", 256, 2 + _QK_K // 4),
    17: GGMLType("IQ2_XS", 256, 2 + _QK_K // 4 + _QK_K // 32),
    18: GGMLType("IQ3_XXS", 256, 2 + _QK_K // 4 + _QK_K // 8),
    19: GGMLType("IQ1_S", 256, 2 + _QK_K // 8 + _QK_K // 16),
    20: GGMLType("IQ4_NL", 32, 2 + 16),
    21: GGMLType("IQ3_S", 256, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    22: GGMLType("IQ2_S", 256, 2 + _QK_K // 4 + _QK_K // 16),
    23: GGMLType("IQ4_XS", 256, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 2 + 4 * 13),
    35: GGMLType("TQ2_0", 256, 2 + 64),
    39: GGMLType("MXFP4", 32, 1 + 16),
}

# ggml type name -> numpy dtype for the types held as plain arrays; the rest become QuantizedArray.
PLAIN_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
QUANTIZED = ("BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
QUANTIZABLE = ("bf16", "q4_0", "q4_1", "q8_0")     # the types `quantize` writes
SUPPORTED = (*PLAIN_DTYPES, *QUANTIZED)

_BY_QTYPE = {t.name.lower(): t for t in GGML_TYPES.values() if t.name in QUANTIZED}


def check_supported(type_id: int, tensor: str) -> GGMLType:
    """The ggml type for `type_id`, or UnsupportedError naming the tensor and the type."""
    ggml_type = GGML_TYPES.get(type_id)
    if ggml_type is None:
        raise UnsupportedError(
            f"tensor {tensor} uses ggml type id {type_id}, which isthmus does not know; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    if ggml_type.name not in SUPPORTED:
        raise UnsupportedError(
            f"tensor {tensor} uses ggml type {ggml_type.name}, which isthmus does not support; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    return ggml_type


def _layout(qtype: str) -> GGMLType:
    try:
        return _BY_QTYPE[qtype]
    except KeyError:
        raise UnsupportedError(
            f"quantized type {qtype!r} is not supported; supported: {', '.join(sorted(_BY_QTYPE))}"
        ) from None


def storage_type(w) -> str:
    """The element type a weight is stored in: a QuantizedArray's qtype, else its numpy dtype's IR name."""
    qtype = getattr(w, "qtype", None)
    if qtype is not None:
        return qtype
    return {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.float64): "f64"}.get(
        np.dtype(w.dtype), str(np.dtype(w.dtype)))


_DENSE_FLOATS = ("f32", "f16", "f64", "bf16")


def packable_together(weights) -> bool:
    """Whether sibling weights (Q/K/V, gate/up) can be stacked by rows into one weight.

    They must have one column count and one storage: a single block format (whose blocks then
    concatenate as they are), or dense floats of any width (a backend converts those to one float
    type). The fusion pass asks this for every target, so numba and triton stack the same groups.
    """
    kinds = {storage_type(w) for w in weights}
    one_storage = len(kinds) == 1 or kinds <= set(_DENSE_FLOATS)
    return one_storage and len({w.shape[1] for w in weights}) == 1


class QuantizedArray:
    """A block-quantized tensor: raw ggml blocks plus the logical (numpy-order) shape.

    `raw` is uint8 of shape (rows, bytes_per_row), where rows is the product of all but the last
    dimension; it is never copied, so it may be a read-only view into a memory-mapped file.
    Instances are immutable: passes share them freely between graphs.
    """

    __slots__ = ("qtype", "shape", "raw")

    def __init__(self, qtype: str, shape: tuple[int, ...], raw: np.ndarray):
        layout = _layout(qtype)
        shape = tuple(int(d) for d in shape)
        if not shape or any(d < 0 for d in shape):
            raise ValueError(f"bad shape {shape} for a {qtype} tensor")
        if shape[-1] % layout.block_size:
            raise ValueError(f"last dimension {shape[-1]} is not a multiple of the {qtype} block size {layout.block_size}")
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        row_bytes = shape[-1] // layout.block_size * layout.type_size
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.size != rows * row_bytes:
            raise ValueError(f"{qtype} tensor of shape {shape} needs {rows * row_bytes} uint8 bytes, got {raw.size} {raw.dtype}")
        object.__setattr__(self, "qtype", qtype)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "raw", raw.reshape(rows, row_bytes))

    def __setattr__(self, name, value):
        raise AttributeError("QuantizedArray is immutable")

    def __reduce__(self):
        # Pickling (e.g. to a worker process) copies the bytes; the memmap itself cannot travel.
        return (QuantizedArray, (self.qtype, self.shape, np.ascontiguousarray(self.raw)))

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __repr__(self) -> str:
        return f"QuantizedArray({self.qtype}, shape={self.shape}, {self.nbytes} bytes)"

    def dequantize(self, rows=None) -> np.ndarray:
        """float32 values; all of them, or only `rows` (see `rows`)."""
        if rows is not None:
            return self.rows(rows)
        return _dequantize_rows(self.qtype, self.raw).reshape(self.shape)

    def rows(self, idx) -> np.ndarray:
        """float32 values of selected rows of the (rows, last-dim) matrix, as an embedding lookup.

        An int gives one row of shape (cols,); an array of ints gives shape idx.shape + (cols,).
        Only the selected blocks are read and dequantized.
        """
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"row indices must be integers, got {idx.dtype}")
        picked = self.raw[idx.reshape(-1)]
        return _dequantize_rows(self.qtype, picked).reshape(*idx.shape, self.shape[-1])


def _dequantize_rows(qtype: str, raw: np.ndarray) -> np.ndarray:
    """(rows, bytes_per_row) uint8 -> (rows, cols) float32, one vectorised pass over all blocks."""
    n_rows = raw.shape[0]
    if qtype == "bf16":
        # bf16 is the top half of an f32.
        bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(n_rows, raw.shape[1] // 2)
    layout = _BY_QTYPE[qtype]
    with np.errstate(invalid="ignore", over="ignore"):  # corrupt or inf scales give nan/inf, as in ggml
        return _dequantize_blocks(qtype, layout, raw)


def _dequantize_blocks(qtype: str, layout: GGMLType, raw: np.ndarray) -> np.ndarray:
    n_rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(-1, layout.type_size)
    if qtype in _KQUANT_DEQUANT:
        out = _KQUANT_DEQUANT[qtype](blocks)
        return out.reshape(n_rows, raw.shape[1] // layout.type_size * layout.block_size)
    d = _f16_at(blocks, 0)
    if qtype == "q8_0":
        out = blocks[:, 2:].view(np.int8).astype(np.float32) * d
    elif qtype == "iq4_nl":
        out = d * IQ4_NL_VALUES[_nibbles(blocks[:, 2:])].astype(np.float32)
    elif qtype in ("q5_0", "q5_1"):
        at = 2 if qtype == "q5_0" else 4
        qh = blocks[:, at:at + 4].copy().view("<u4")
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
        q = _nibbles(blocks[:, at + 4:]) | high
        if qtype == "q5_0":
            out = (q.astype(np.int8) - np.int8(16)).astype(np.float32) * d
        else:
            out = q.astype(np.float32) * d + _f16_at(blocks, 2)
    else:
        nibbles = blocks[:, 4:] if qtype == "q4_1" else blocks[:, 2:]
        q = _nibbles(nibbles)
        if qtype == "q4_0":
            out = (q.astype(np.int8) - np.int8(8)).astype(np.float32) * d
        else:
            out = q.astype(np.float32) * d + _f16_at(blocks, 2)
    return out.reshape(n_rows, raw.shape[1] // layout.type_size * layout.block_size)


# The 16 values of an iq4_nl nibble (kvalues_iq4nl in ggml-common.h).
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _f16_at(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 at byte `at` of every block, as an f32 column."""
    return blocks[:, at:at + 2].copy().view("<f2").astype(np.float32)


def _nibbles(b: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: low nibbles first, then high nibbles."""
    return np.concatenate([b & 0x0F, b >> 4], axis=1)


def _two_bit(qs: np.ndarray) -> np.ndarray:
    """(n, 64) bytes of 2-bit values -> (n, 256): each 32-byte half gives 128 values at shifts 0, 2, 4, 6."""
    halves = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (halves & 3).reshape(-1, 256)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q4_k / q5_k: 12 bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def _q3k_scales(s: np.ndarray) -> np.ndarray:
    """q3_k: 12 bytes -> 16 signed scales: low 4 bits from bytes 0-7 (low nibbles, then high
    nibbles), high 2 bits of scale i from byte 8 + i % 4 at shift 2 * (i // 4); minus 32."""
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    high = (s[:, 8:12][:, np.tile(np.arange(4), 4)] >> np.repeat(np.arange(0, 8, 2, dtype=np.uint8), 4)) & 3
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _dequant_q2_k(b: np.ndarray) -> np.ndarray:
    sc = b[:, 0:16]
    d, dmin = _f16_at(b, 80), _f16_at(b, 82)
    q = _two_bit(b[:, 16:80]).astype(np.float32).reshape(-1, 16, 16)
    dl = (d * (sc & 0x0F).astype(np.float32))[:, :, None]
    ml = (dmin * (sc >> 4).astype(np.float32))[:, :, None]
    return (dl * q - ml).reshape(-1, 256)


def _dequant_q3_k(b: np.ndarray) -> np.ndarray:
    hmask, d = b[:, 0:32], _f16_at(b, 108)
    # bit j of hmask byte l belongs to value 32 * j + l
    hbit = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = _two_bit(b[:, 32:96]).astype(np.int8) - np.where(hbit.reshape(-1, 256) != 0, 0, 4).astype(np.int8)
    dl = (d * _q3k_scales(b[:, 96:108]).astype(np.float32))[:, :, None]
    return (dl * q.astype(np.float32).reshape(-1, 16, 16)).reshape(-1, 256)


def _dequant_q45_k(b: np.ndarray, five: bool) -> np.ndarray:
    d, dmin = _f16_at(b, 0), _f16_at(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 48:176] if five else b[:, 16:144]
    q = np.stack([qs.reshape(-1, 4, 32) & 0x0F, qs.reshape(-1, 4, 32) >> 4], axis=2).reshape(-1, 8, 32)
    if five:   # bit k of qh byte l is bit 4 of value 32 * k + l
        qh = b[:, 16:48]
        q = q | (((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4)
    dl = (d * sc.astype(np.float32))[:, :, None]
    ml = (dmin * mn.astype(np.float32))[:, :, None]
    return (dl * q.astype(np.float32) - ml).reshape(-1, 256)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    ql, qh, sc, d = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 1, 32), b[:, 192:208], _f16_at(b, 208)
    low = np.concatenate([ql[:, :, 0:32] & 0x0F, ql[:, :, 32:64] & 0x0F, ql[:, :, 0:32] >> 4, ql[:, :, 32:64] >> 4],
                         axis=2).reshape(-1, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    dl = (d * sc.view(np.int8).astype(np.float32))[:, :, None]
    return (dl * q.astype(np.float32).reshape(-1, 16, 16)).reshape(-1, 256)


_KQUANT_DEQUANT = {
    "q2_k": _dequant_q2_k,
    "q3_k": _dequant_q3_k,
    "q4_k": lambda b: _dequant_q45_k(b, False),
    "q5_k": lambda b: _dequant_q45_k(b, True),
    "q6_k": _dequant_q6_k,
}


def _round_half_away(x: np.ndarray) -> np.ndarray:
    # C's roundf, which ggml's reference quantizer uses (numpy's round is half-to-even).
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize(array, qtype: str) -> QuantizedArray:
    """Quantize float values along the last axis into ggml blocks (ggml's reference rounding)."""
    layout = _layout(qtype)
    if qtype not in QUANTIZABLE:
        raise UnsupportedError(f"isthmus reads {qtype} but does not write it; quantize supports {', '.join(QUANTIZABLE)}")
    x = np.asarray(array, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % layout.block_size:
        raise ValueError(f"last dimension of shape {x.shape} is not a multiple of the {qtype} block size {layout.block_size}")
    if qtype == "bf16":
        bits = x.view(np.uint32).astype(np.uint64)
        # Round to nearest even on the dropped half; keep NaNs quiet, as ggml_compute_fp32_to_bf16.
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = np.where(nan, (bits >> 16) | 64, rounded).astype("<u2")
        return QuantizedArray(qtype, x.shape, _readonly(rounded.view(np.uint8)))
    blocks = x.reshape(-1, 32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # as C: inf/nan, then clipped
        if qtype == "q8_0":
            d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = _round_half_away(blocks * inv).astype(np.int8).view(np.uint8)
            parts = [_f16_bytes(d), q]
        elif qtype == "q4_0":
            # d is chosen so the value of largest magnitude maps exactly to -8.
            amax_at = np.abs(blocks).argmax(axis=1)[:, None]
            d = np.take_along_axis(blocks, amax_at, axis=1) / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
            parts = [_f16_bytes(d), _pack_nibbles(q)]
        else:  # q4_1
            lo = blocks.min(axis=1, keepdims=True)
            d = (blocks.max(axis=1, keepdims=True) - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc((blocks - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
            parts = [_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)]
    return QuantizedArray(qtype, x.shape, _readonly(np.concatenate(parts, axis=1)))


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:  # inverse of _nibbles
    return q[:, :16] | (q[:, 16:] << 4)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a

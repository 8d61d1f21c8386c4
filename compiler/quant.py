"""ggml tensor storage formats, defined once.

GGUF files store each tensor in one of ggml's types: plain floats, or blocks of 32 values that
share a scale. `GGML_TYPES` names every type id ggml has assigned, so a file using one isthmus
does not implement fails with the type's name rather than a bare number. `QuantizedArray` holds
a block-quantized tensor as its raw bytes (usually a read-only view into the memory-mapped file)
and dequantizes on demand; `quantize` makes such tensors, as ggml's reference quantizers do.

Block layouts (little-endian, one block = 32 consecutive values along the last axis):
    q8_0: f16 d, 32 x int8 q                 value = q * d
    q4_0: f16 d, 16 bytes of nibbles          value = (q - 8) * d
    q4_1: f16 d, f16 m, 16 bytes of nibbles   value = q * d + m
In both 4-bit types byte j holds value j in its low nibble and value j + 16 in its high nibble.
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
QUANTIZED = ("BF16", "Q4_0", "Q4_1", "Q8_0")
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
    d = blocks[:, 0:2].view("<f2").astype(np.float32)
    if qtype == "q8_0":
        out = blocks[:, 2:].view(np.int8).astype(np.float32) * d
    else:
        nibbles = blocks[:, 4:] if qtype == "q4_1" else blocks[:, 2:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)
        if qtype == "q4_0":
            out = (q.astype(np.int8) - np.int8(8)).astype(np.float32) * d
        else:
            m = blocks[:, 2:4].view("<f2").astype(np.float32)
            out = q.astype(np.float32) * d + m
    return out.reshape(n_rows, raw.shape[1] // layout.type_size * layout.block_size)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    # C's roundf, which ggml's reference quantizer uses (numpy's round is half-to-even).
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize(array, qtype: str) -> QuantizedArray:
    """Quantize float values along the last axis into ggml blocks (ggml's reference rounding)."""
    layout = _layout(qtype)
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


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return q[:, :16] | (q[:, 16:] << 4)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a

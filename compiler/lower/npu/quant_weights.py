"""Quantized weight storage for the NPU: what a weight is stored as in HBM and how it is made on the host.

The decoder streams every weight from HBM once per token, and on `core` HBM bounds a decode step,
so fewer bytes per weight make a step faster. A weight is stored in one of these *formats* and
turned back into bf16 stationary tiles on chip, by VECTOR or ACT, right after the DMA that brings
it into the weight ring (weights.WeightStream):

| format | HBM bytes / weight | stored | on chip |
|---|---|---|---|
| bf16  | 2      | bf16 values | none |
| int8  | 1 (+4 per output) | symmetric int8, one f32 scale per output feature (per channel) | cast to bf16 (exact); the scale multiplies the matmul's PSUM result, where each output feature is one partition |
| fp8   | 1 (+4 per output) | OCP fp8 e4m3, one f32 scale per output feature | cast to bf16 (exact); the scale as int8's |
| q4    | 0.625  | 4-bit values 0..15 packed two a byte, a bf16 scale and a bf16 zero per 32 weights | `dequant packed=1 group=32`: q * scale + zero |

q4 is GGUF's Q4_1 arithmetic (w = q * d + m over blocks of 32, with d and m in 16 bits) with the
blocks laid along the *outputs* of one input feature instead of the inputs of one output: the PE
array contracts over partitions, so an input feature is a partition and a block along the inputs
would span 32 partitions, whose scale no VECTOR/ACT lane could read without a copy per partition.
Along the outputs a block is 32 consecutive elements of one partition. The values are requantized
from the file's dequantized weights (the file's Q4_1 blocks run the other way), so q4 adds its own
rounding to the file's; int8 and fp8 likewise start from the dequantized weights.

`choose_format(data, option)` picks per layer: an explicit option ("int8", "fp8", "q4", "bf16"), or
"auto": from the file's own quantization (Q8_0, Q6_K, Q5_x: int8; Q4_x, Q4_K and smaller: q4;
float: bf16). q4 needs the number of outputs to be a multiple of 32; otherwise int8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMATS = ("bf16", "int8", "fp8", "q4")
OPTIONS = FORMATS + ("auto",)
Q4_GROUP = 32
STORAGE_DTYPE = {"int8": "i8", "fp8": "f8e4m3", "q4": "u8"}
# HBM (and staging) bytes per weight value, without the scales
STORED_BYTES = {"bf16": 2.0, "int8": 1.0, "fp8": 1.0, "q4": 0.5}
_AUTO = {"q8_0": "int8", "q8_1": "int8", "q6_k": "int8", "q5_0": "int8", "q5_1": "int8", "q5_k": "int8",
         "q4_0": "q4", "q4_1": "q4", "q4_k": "q4", "q3_k": "q4", "q2_k": "q4", "iq4_nl": "q4", "iq4_xs": "q4"}


def choose_format(data, n_out: int, option: str) -> str:
    """The storage format of one weight ([n_out, in] as the layer multiplies it)."""
    if option not in OPTIONS:
        from isthmus.errors import InputError
        raise InputError(f"NPU weight format must be one of {', '.join(OPTIONS)}, got {option!r}")
    fmt = option
    if option == "auto":
        fmt = _AUTO.get(str(getattr(data, "qtype", "") or "").lower(), "bf16")
    if fmt == "q4" and n_out % Q4_GROUP:
        fmt = "int8"
    return fmt


@dataclass
class Quantized:
    """A weight's quantized values, still [n_out, k] (packing for the PE array follows), and its scales."""

    fmt: str
    values: np.ndarray                 # f32 holding the stored values exactly (ints, fp8 grid points, 0..15)
    channel_scale: np.ndarray | None   # int8/fp8: [n_out] f32
    group_scale: np.ndarray | None     # q4: [n_out // 32, k] f32 (bf16-exact), one per block of 32 outputs
    group_zero: np.ndarray | None

    def dequantized(self) -> np.ndarray:
        """What the NPU multiplies by, [n_out, k] f32 (for accuracy checks): q4's `dequant` computes
        q * scale + zero in fp32 and writes the bf16 tile the matmuls read; int8/fp8 values are exact
        in bf16 and their scale multiplies the fp32 product."""
        if self.fmt == "q4":
            n, k = self.values.shape
            v = self.values.reshape(n // Q4_GROUP, Q4_GROUP, k)
            return _bf16(v * self.group_scale[:, None, :] + self.group_zero[:, None, :]).reshape(n, k)
        return self.values * self.channel_scale[:, None]


def _bf16(a: np.ndarray) -> np.ndarray:
    import ml_dtypes
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def quantize(w: np.ndarray, fmt: str) -> Quantized:
    """Quantize dense f32 W [n_out, k] (rows of zeros allowed: padding) to `fmt` (not bf16)."""
    w = np.asarray(w, np.float32)
    if fmt in ("int8", "fp8"):
        top = 127.0 if fmt == "int8" else 448.0           # int8's range; fp8 e4m3's largest finite value
        amax = np.abs(w).max(axis=1)
        scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
        x = w / scale[:, None]
        if fmt == "int8":
            vals = np.clip(np.rint(x), -127, 127).astype(np.float32)
        else:
            import ml_dtypes
            vals = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return Quantized(fmt, vals, scale, None, None)
    if fmt != "q4":
        raise ValueError(f"not a quantized format: {fmt}")
    n, k = w.shape
    blocks = w.reshape(n // Q4_GROUP, Q4_GROUP, k)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    zero = _bf16(lo)
    scale = _bf16(np.maximum(hi - zero, 0) / 15.0)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint((blocks - zero[:, None, :]) / safe[:, None, :]), 0, 15)
    return Quantized(fmt, q.reshape(n, k).astype(np.float32), None, scale, zero)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """0..15 values (1-D, even length) as bytes, two a byte, the first in the low nibble."""
    v = values.astype(np.uint8)
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8)

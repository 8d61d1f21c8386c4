"""Quantized weight storage for the NPU: what a weight is stored as in HBM and how it is made on the host.

The decoder streams every weight from HBM once per token, and on `core` HBM bounds a decode step,
so fewer bytes per weight make a step faster. A weight is stored in one of these *formats* and
turned back into bf16 stationary tiles on chip, by VECTOR or ACT, right after the DMA that brings
it into the weight ring (weights.WeightStream):

| format | HBM bytes / weight | stored | on chip |
|---|---|---|---|
| bf16  | 2      | bf16 values | none |
| int8  | 1.125  | 8-bit q (0..255, stored as q - 128), an f16 scale d and min m per block of 32 *inputs* of one output; a Q8_0 file's own q (-127..127) and d | q as bf16 (exact) |
| q4    | 0.625  | 4-bit q 0..15, two a byte, an f16 scale d and f16 min m per block of 32 inputs (Q4_1) | `dequant packed=1`: q as bf16 (exact) |
| fp8   | 1 (+4 per output) | OCP fp8 e4m3, one f32 scale per output feature | cast to bf16 (exact); the scale multiplies the PSUM result |

*Blocks along the inputs* (int8, q4), as GGUF's Q8_0, Q4_0, Q4_1 and Q4_K lay them: w = d[o, b] * q + m[o, b]
for input i in block b = i // 32 of output o. The PE array contracts over partitions and an input
feature is a partition, so a block spans 32 partitions and no VECTOR/ACT lane could apply its scale
to the weight tile. The scales are applied to the *products* instead (resident_kernels.linear): the
moving operand carries x once per block of its K tile, masked to that block's 32 partitions (a decode
step's 1 or 2 columns become 4 or 8, still under the 64 the array streams anyway), so one matmul of
the raw q tile gives each block's partial sum P[o, b] = sum over i in b of q[i, o] x[i] in its own
PSUM column; y[o] = sum_b d[o, b] P[o, b] + m[o, b] xs[b], with xs[b] the block sums of x (a ones
matmul), and d, m laid out with the outputs on partitions, where a scale per (partition, column) is
what `dequant` applies. The products are exact (q and x in bf16, fp32 accumulation) and the scales
multiply in fp32: unlike a dequantized bf16 weight, nothing rounds the weight to 8 bits.

Where the model file stores a weight in blocks the format can hold (Q8_0 for int8; Q4_0, Q4_1, Q4_K for
q4 and int8, whose byte holds a 4-bit q losslessly) its own q, d and m are used (`from_file`), so the
NPU multiplies by exactly the file's weights; otherwise
(or where the lowering permutes a weight's inputs across block boundaries) the dequantized values are
quantized again along the lowering's input order (`quantize`), int8 and q4 alike by Q4_1's min/max
rule (m = min, d = (max - min) / 255 or / 15): 255 levels between a block's extremes reproduce a Q4_1
block's 16 to within 1/34 of its step, where a symmetric int8 scale (Q8_0's rule) leaves the third test
prompt's greedy continuation diverging at token 16 (docs/npu-performance.md). fp8 keeps one scale per
output channel.

`choose_format(data, option)` picks per layer: an explicit option ("int8", "fp8", "q4", "bf16"), or
"auto": from the file's own quantization (Q8_0, Q6_K, Q5_x: int8; Q4_x, Q4_K and smaller: q4;
float: bf16). q4 needs an even number of outputs (a byte holds two neighbouring outputs); otherwise int8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMATS = ("bf16", "int8", "fp8", "q4")
OPTIONS = FORMATS + ("auto",)
BLOCK = 32                                   # inputs per block (int8, q4)
BLOCKED = ("int8", "q4")                     # formats with per-block scales along the inputs
STORAGE_DTYPE = {"int8": "i8", "fp8": "f8e4m3", "q4": "u8"}
# HBM (and staging) bytes per weight value, without the scales
STORED_BYTES = {"bf16": 2.0, "int8": 1.0, "fp8": 1.0, "q4": 0.5}
_AUTO = {"q8_0": "int8", "q8_1": "int8", "q6_k": "int8", "q5_0": "int8", "q5_1": "int8", "q5_k": "int8",
         "q4_0": "q4", "q4_1": "q4", "q4_k": "q4", "q3_k": "q4", "q2_k": "q4", "iq4_nl": "q4", "iq4_xs": "q4"}
# the GGUF block types whose own q, d, m a format holds exactly (int8 holds 4-bit q in a byte: lossless)
_FILE_BLOCKS = {"int8": ("q8_0", "q4_0", "q4_1", "q4_k"), "q4": ("q4_0", "q4_1", "q4_k")}


def choose_format(data, n_out: int, option: str) -> str:
    """The storage format of one weight ([n_out, in] as the layer multiplies it)."""
    if option not in OPTIONS:
        from isthmus.errors import InputError
        raise InputError(f"NPU weight format must be one of {', '.join(OPTIONS)}, got {option!r}")
    fmt = _AUTO.get(str(getattr(data, "qtype", "") or "").lower(), "bf16") if option == "auto" else option
    return "int8" if fmt == "q4" and n_out % 2 else fmt     # two 4-bit values a byte along the outputs


@dataclass
class Quantized:
    """A weight's quantized values, [n_out, k] (packing for the PE array follows), and its scales.
    int8/q4: `scale` and `zero` [n_out, ceil(k / 32)] per block of 32 inputs (`zero` None for int8);
    fp8: `scale` [n_out] per output. `from_file`: the values are the model file's own."""

    fmt: str
    values: np.ndarray                 # f32 holding the stored values exactly (ints, fp8 grid points, 0..15)
    scale: np.ndarray
    zero: np.ndarray | None = None
    from_file: bool = False
    offset: int = 0                    # HBM holds values - offset (int8 0..255 as a signed byte)

    @property
    def stored(self) -> np.ndarray:
        return self.values - self.offset

    @property
    def scale_dtype(self) -> str:
        """f16 where every scale and min is exact in it (the file's own, or chosen so), else f32."""
        arrs = [self.scale] + ([self.zero] if self.zero is not None else [])
        exact = all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in arrs)
        return "f16" if exact else "f32"

    def dequantized(self) -> np.ndarray:
        """What the NPU multiplies by, [n_out, k] f32, exactly (for the accuracy checks' reference)."""
        if self.fmt == "fp8":
            return self.values * self.scale[:, None]
        n, k = self.values.shape
        rep = lambda a: np.repeat(a, BLOCK, axis=1)[:, :k]             # noqa: E731
        out = self.values * rep(self.scale)
        return out + rep(self.zero) if self.zero is not None else out


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def quantize(w: np.ndarray, fmt: str) -> Quantized:
    """Quantize dense f32 W [n_out, k] (rows and columns of zeros allowed: padding) to `fmt` (not bf16)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if fmt == "fp8":
        import ml_dtypes
        amax = np.abs(w).max(axis=1)
        scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)   # e4m3's largest finite value
        vals = np.clip(w / scale[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return Quantized(fmt, vals, scale)
    if fmt not in BLOCKED:
        raise ValueError(f"not a quantized format: {fmt}")
    nb = -(-k // BLOCK)
    blocks = np.zeros((n, nb * BLOCK), np.float32)
    blocks[:, :k] = w
    blocks = blocks.reshape(n, nb, BLOCK)
    # min/max over the block (Q4_1's rule): m = min, d = (max - min) / levels, q = round((w - m) / d);
    # int8 stores q - 128 in HBM (`offset`: the unpacking adds it back). The scales are rounded to f16
    # first, so q uses the stored ones, as ggml's quantizers do.
    levels = 255 if fmt == "int8" else 15
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    m = _f16(lo)
    d = _f16(np.maximum(hi - m, 0) / levels)
    safe = np.where(d > 0, d, 1.0)
    q = np.clip(np.rint((blocks - m[:, :, None]) / safe[:, :, None]), 0, levels)
    return Quantized(fmt, q.reshape(n, -1)[:, :k], d, m, offset=128 if fmt == "int8" else 0)


def from_file(data, fmt: str) -> Quantized | None:
    """The file's own blocks of a GGUF weight, when `fmt` can hold them (Q8_0 -> int8; Q4_0, Q4_1, Q4_K
    -> q4 or int8: Q4_0's (q - 8) d is q d + m with m = -8 d, Q4_K's d sc q - dmin mn is q d' + m' per
    32); None otherwise. Values as compiler/quant.py's dequantizers read them."""
    from isthmus.compiler import quant as Q
    qtype = str(getattr(data, "qtype", "") or "").lower()
    if qtype not in _FILE_BLOCKS.get(fmt, ()) or len(data.shape) != 2:
        return None
    n, k = data.shape
    layout = Q._BY_QTYPE[qtype]
    b = np.ascontiguousarray(data.raw).reshape(-1, layout.type_size)
    if qtype == "q8_0":
        q = b[:, 2:].view(np.int8).astype(np.float32)
        return Quantized(fmt, q.reshape(n, k), Q._f16_at(b, 0).reshape(n, -1), None, True)
    if qtype in ("q4_0", "q4_1"):
        d = Q._f16_at(b, 0)
        q = Q._nibbles(b[:, 4:] if qtype == "q4_1" else b[:, 2:]).astype(np.float32)
        m = Q._f16_at(b, 2) if qtype == "q4_1" else -8.0 * d
        return Quantized(fmt, q.reshape(n, k), d.reshape(n, -1), m.reshape(n, -1), True)
    d, dmin = Q._f16_at(b, 0), Q._f16_at(b, 2)              # q4_k: 256 values, 8 blocks of 32
    sc, mn = Q._scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8 * 32).astype(np.float32)
    dd = (d * sc.astype(np.float32)).reshape(n, -1)
    mm = (-(dmin * mn.astype(np.float32))).reshape(n, -1)
    return Quantized(fmt, q.reshape(n, k), dd, mm, True)


def quantize_weight(data, fmt: str, rows=None, cols=None) -> Quantized:
    """Weight `data` [out, in] as stored (a GGUF QuantizedArray or an array) in `fmt`, with its rows
    (outputs) and columns (inputs) picked by `rows`/`cols` (-1: zeros), as the lowering packs it. The
    file's own blocks (`from_file`) are kept when the column map moves whole aligned blocks."""
    from isthmus.compiler.lower.npu.weights import dense_f32
    qz = from_file(data, fmt) if fmt in BLOCKED else None
    if qz is not None and cols is not None:
        qz = _pick_blocks(qz, np.asarray(cols))
    if qz is not None:
        if rows is not None:
            rows = np.asarray(rows)
            keep = (rows >= 0)[:, None]
            pick = lambda a: np.where(keep, a[np.maximum(rows, 0)], 0.0).astype(np.float32)   # noqa: E731
            qz = Quantized(fmt, pick(qz.values), pick(qz.scale), None if qz.zero is None else pick(qz.zero), True,
                           qz.offset)
        return qz
    w = dense_f32(data)
    if rows is not None:
        rows = np.asarray(rows)
        w = np.where((rows >= 0)[:, None], w[np.maximum(rows, 0)], 0.0).astype(np.float32)
    if cols is not None:
        cols = np.asarray(cols)
        w = np.where((cols >= 0)[None, :], w[:, np.maximum(cols, 0)], 0.0).astype(np.float32)
    return quantize(w, fmt)


def _pick_blocks(qz: Quantized, cols: np.ndarray) -> Quantized | None:
    """Columns `cols` of file blocks, if every new block of 32 is one whole old block in order or padding."""
    n, k = qz.values.shape
    nb = -(-len(cols) // BLOCK)
    src = np.full(nb, -1)
    for b in range(nb):
        c = cols[b * BLOCK:(b + 1) * BLOCK]
        if (c < 0).all():
            continue
        if c[0] < 0 or c[0] % BLOCK or not np.array_equal(c, c[0] + np.arange(len(c))) or \
                (len(c) < BLOCK and c[0] + len(c) != k):
            return None
        src[b] = c[0] // BLOCK
    vals = np.where((cols >= 0)[None, :], qz.values[:, np.maximum(cols, 0)], 0.0).astype(np.float32)
    pick = lambda a: np.where((src >= 0)[None, :], a[:, np.maximum(src, 0)], 0.0).astype(np.float32)  # noqa: E731
    return Quantized(qz.fmt, vals, pick(qz.scale), None if qz.zero is None else pick(qz.zero), True, qz.offset)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """0..15 values (1-D, even length) as bytes, two a byte, the first in the low nibble."""
    v = values.astype(np.uint8)
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8)

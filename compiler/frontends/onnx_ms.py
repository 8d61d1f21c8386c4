"""com.microsoft contrib ops as onnxruntime-genai's model builder emits them, mapped onto the IR's
fused ops (rmsnorm, rope, attention, linear, embedding), so every target runs them as it runs the
same ops from any other frontend.

- SkipSimplifiedLayerNormalization: s = input + skip (+ bias); rmsnorm(s); the sum is output 3.
- MatMulNBits / GatherBlockQuantized: blockwise-quantized weights (4 or 8 bits, a scale per block,
  optional packed zero points, default 2^(bits-1)): a `linear` / `embedding` on the weight. 4 bits
  in blocks of 32 are ggml's q4_1 (value = q * d + m, m = -zp * scale) when every scale and m is
  exactly an f16 (the genai builder's symmetric scales of a bf16 or f16 checkpoint are +-weight / 8)
  and the blocks fill the columns: the nibbles are reordered (two consecutive values a byte ->
  values j and j + 16 in byte j) and the weight stays 4-bit (`QuantizedArray`), the same numbers.
  Otherwise (f32 scales f16 would round, as from an f32 checkpoint; other bits or block sizes) it
  is dequantized exactly to f32 (f16 for an f16 gather) while importing.
- GroupQueryAttention (with packed or separate q/k/v, past caches, seqlens_k, total_sequence_length
  and, with do_rotary, its cos/sin caches): the new keys and values go where onnxruntime writes
  them, at row b's own past length past_b (the end of the cache unless the row is padded), zeros
  after them; the
  rotary becomes a `rope` whose frequencies are read back from the caches (checked against them);
  attention runs with a boolean mask built as onnxruntime does: batch row b holds
  seqlens_k[b] + 1 keys, of which query i sees those up to position past_b + i (past_b = 0 for
  the first prompt, seqlens_k[b] + 1 - seq after), and its positions are past_b + i.
Attributes and inputs that change the numbers and are not implemented (local windows, softcap,
smooth softmax, position_ids, attention bias, zero points as floats, g_idx) are errors naming them.
"""

from __future__ import annotations

import math

import numpy as np

from isthmus.compiler.frontends.onnx_ops import NodeContext, on
from isthmus.compiler.ir import Value, numpy_dtype
from isthmus.compiler.ops.attention import rope_angles
from isthmus.compiler.passes.canonicalize_rope import rope_attrs
from isthmus.compiler.quant import QuantizedArray

MS = ("com.microsoft",)


@on("SkipSimplifiedLayerNormalization", "SkipLayerNormalization", domains=MS)
def _skip_norm(n: NodeContext):
    x, skip, gamma = n.ins[:3]
    beta = n.input(3) if n.op == "SkipLayerNormalization" else None
    bias = n.input(4) if n.op == "SkipLayerNormalization" else n.input(3)
    out = n.node.output
    if any(len(out) > i and out[i] for i in (1, 2)):
        n.unsupported("the mean / inverse standard deviation outputs")
    s = n.emit("add", [x, skip], suffix="sum" if not bias else "skip")
    if bias is not None:
        s = n.emit("add", [s, bias], suffix="sum")
    eps = float(n.attr("epsilon", 1e-5))
    if n.op == "SkipSimplifiedLayerNormalization":
        y = n.emit("rmsnorm", [s, gamma], {"eps": eps}, suffix="norm")
    else:
        y = n.emit("layernorm", [s, gamma] + ([beta] if beta is not None else []), {"eps": eps}, suffix="norm")
    return [y, None, None, s]


def _blocks(n: NodeContext, q: Value, scales: Value, zero_points: Value | None, rows: int, cols: int,
            bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quantized values u8 [rows, blocks, block], scales f32 and zero points f32 [rows, blocks]
    of blockwise-quantized rows: element j of row r is (q - zp) * scale[r, j // block], with q
    packed little-end first in bytes (bits 4 or 8), the last block padded past `cols`."""
    for v, what in ((q, "quantized weight"), (scales, "scales")):
        if not v.is_constant or not isinstance(v.data, np.ndarray):
            n.unsupported(f"the {what} must be an initializer")
    if bits not in (4, 8):
        n.unsupported(f"{bits}-bit weights (isthmus reads 4 and 8)")
    blocks = -(-cols // block)
    per_byte = 8 // bits
    raw = np.ascontiguousarray(q.data).view(np.uint8).reshape(rows, -1)
    if raw.shape[1] * per_byte < blocks * block:
        n.unsupported(f"quantized weight {q.type} too small for [{rows}, {cols}] in blocks of {block}")
    vals = raw[:, : blocks * block // per_byte]
    if bits == 4:
        vals = np.stack([vals & 0x0F, vals >> 4], axis=-1).reshape(rows, -1)
    scale = np.asarray(scales.data, np.float32).reshape(rows, blocks)
    if zero_points is None:
        zp = np.full((rows, blocks), 2 ** (bits - 1), np.float32)
    else:
        if not zero_points.is_constant or zero_points.dtype != "u8":
            n.unsupported("zero points that are not packed uint8 initializers")
        zraw = np.ascontiguousarray(zero_points.data).reshape(rows, -1)
        if bits == 4:
            zraw = np.stack([zraw & 0x0F, zraw >> 4], axis=-1).reshape(rows, -1)
        zp = zraw[:, :blocks].astype(np.float32)
    return vals.reshape(rows, blocks, block), scale, zp


def _dequantize(vals: np.ndarray, scale: np.ndarray, zp: np.ndarray, cols: int) -> np.ndarray:
    """The f32 [rows, cols] matrix of `_blocks`' parts: (q - zp) * scale, exact."""
    w = (vals.astype(np.float32) - zp[..., None]) * scale[..., None]
    return np.ascontiguousarray(w.reshape(len(vals), -1)[:, :cols])


def _as_q4_1(vals: np.ndarray, scale: np.ndarray, zp: np.ndarray, cols: int, bits: int) -> QuantizedArray | None:
    """The same numbers as ggml q4_1 blocks (value = q * d + m), or None when they are not: 4 bits in
    blocks of 32 filling the columns, every scale d and m = -zp * d exactly an f16. Then q * d and
    the sum are exact in f32 (at most 15 significant bits, multiples of d's last bit), so q4_1
    dequantizes to (q - zp) * scale bit for bit (a zero may change its sign)."""
    rows, blocks, block = vals.shape
    if bits != 4 or block != 32 or cols != blocks * block:
        return None
    m = -zp * scale
    d16, m16 = scale.astype(np.float16), m.astype(np.float16)
    if not (np.isfinite(scale).all() and np.array_equal(d16.astype(np.float32), scale)
            and np.array_equal(m16.astype(np.float32), m)):
        return None
    nibbles = vals[..., :16] | (vals[..., 16:] << 4)      # byte j: value j low, value j + 16 high
    raw = np.concatenate([d16.astype("<f2")[..., None].view(np.uint8), m16.astype("<f2")[..., None].view(np.uint8),
                          nibbles], axis=-1)
    raw = np.ascontiguousarray(raw.reshape(rows, blocks * 20))
    raw.flags.writeable = False
    return QuantizedArray("q4_1", (rows, cols), raw)


def _weight(n: NodeContext, q: Value, scales: Value, zero_points: Value | None, rows: int, cols: int,
            bits: int, block: int, what: str):
    """The [rows, cols] weight of blockwise-quantized rows as a constant: q4_1 blocks where they
    hold the same numbers (one constant for every node reading the same blocks: the genai builder
    shares the tied lm_head's with the embedding), else None and the exact f32 matrix."""
    while not q.is_constant and q.producer is not None and q.producer.op == "reshape":
        q = q.producer.inputs[0]          # the builder shares MatMulNBits' blocks with a reshaped view
    vals, scale, zp = _blocks(n, q, scales, zero_points, rows, cols, bits, block)
    # the same bytes (a folded reshape is a view of them) with the same scales and zero points
    key = (_address(q), _address(scales), _address(zero_points), rows, cols, bits, block)
    shared = n.imp.__dict__.setdefault("_q4_1_weights", {})     # per import
    if key not in shared:
        blocks = _as_q4_1(vals, scale, zp, cols, bits)
        if blocks is None:
            return None, _dequantize(vals, scale, zp, cols)
        shared[key] = n.imp.g.add_constant(f"{n.name}/{what}", blocks)
    return shared[key], None


def _address(v: Value | None):
    if v is None:
        return None
    data = np.asarray(v.data)
    return data.__array_interface__["data"][0], data.nbytes, data.dtype.str


@on("MatMulNBits", domains=MS)
def _matmul_nbits(n: NodeContext):
    x, q, scales = n.ins[:3]
    zp, g_idx, bias = n.input(3), n.input(4), n.input(5)
    if g_idx is not None:
        n.unsupported("g_idx (act-order quantization)")
    rows, cols = int(n.attr("N")), int(n.attr("K"))
    weight, w = _weight(n, q, scales, zp, rows, cols, int(n.attr("bits", 4)), int(n.attr("block_size")), "weight")
    if weight is None:
        weight = n.const(w.astype(numpy_dtype(x.dtype)), "weight")
    return n.emit("linear", [x, weight] + ([bias] if bias is not None else []))


@on("GatherBlockQuantized", domains=MS)
def _gather_block_quantized(n: NodeContext):
    q, idx, scales = n.ins[:3]
    zp = n.input(3)
    if n.attr("gather_axis", 0) != 0 or n.attr("quantize_axis", 1) not in (1, -1) or q.type.rank != 2:
        n.unsupported("gathers other than rows of a [rows, cols] table quantized along its columns")
    bits = int(n.attr("bits", 4))
    rows = q.shape[0]
    cols = q.shape[1] * (2 if q.dtype == "u8" and bits == 4 else 1)
    table, w = _weight(n, q, scales, zp, rows, cols, bits, int(n.attr("block_size", 128)), "table")
    if table is None:
        table = n.const(w.astype(np.float32 if scales.dtype not in ("f16",) else np.float16), "table")
    out = n.emit("embedding", [table, idx])
    if scales.dtype == "f16" and out.dtype != "f16":     # onnxruntime's rows are f16, as the scales
        out = n.emit("cast", [out], {"to": "f16"}, suffix="f16")
    return out


def _rope_attrs(n: NodeContext, cos: Value, sin: Value, interleaved: bool) -> dict:
    """rope attributes reproducing cos_cache / sin_cache ([positions, rotary_dim / 2]) as
    cos(p * f_i) and sin(p * f_i): the frequencies are fitted from the caches and checked."""
    for v in (cos, sin):
        if not v.is_constant or not isinstance(v.data, np.ndarray) or v.type.rank != 2:
            n.unsupported("cos/sin caches that are not [positions, rotary_dim / 2] initializers")
    c, s = np.asarray(cos.data, np.float64), np.asarray(sin.data, np.float64)
    half = c.shape[1]
    dim = 2 * half
    p = np.arange(c.shape[0], dtype=np.float64)
    angles = np.unwrap(np.arctan2(s, c), axis=0)
    freqs = (p @ angles) / max(float(p @ p), 1.0)
    attrs = rope_attrs(freqs, dim, "interleaved" if interleaved else "half")
    got_c, got_s = rope_angles(np.arange(c.shape[0]), dim, attrs["theta"], attrs["factors"])
    if max(np.abs(got_c - c).max(), np.abs(got_s - s).max()) > 1e-4:
        n.unsupported("rotary caches that are not cos/sin(position * frequency) (a scaled rotary)")
    return attrs


@on("GroupQueryAttention", domains=MS)
def _gqa(n: NodeContext):
    query, key, value, past_k, past_v, seqlens_k, total = (n.input(i) for i in range(7))
    cos, sin = n.input(7), n.input(8)
    for i, what in ((9, "position_ids"), (10, "attention_bias"), (11, "head_sink")):
        if n.input(i) is not None:
            n.unsupported(f"the {what} input")
    if n.attr("local_window_size", -1) != -1:
        n.unsupported(f"local_window_size {n.attr('local_window_size')} (sliding-window attention)")
    if n.attr("softcap", 0.0) or n.attr("smooth_softmax", 0) or n.attr("qk_output", 0):
        n.unsupported("softcap / smooth_softmax / qk_output")
    if past_k is None or past_v is None or seqlens_k is None or total is None:
        n.unsupported("GroupQueryAttention without past caches, seqlens_k and total_sequence_length")
    hq, hkv = int(n.attr("num_heads")), int(n.attr("kv_num_heads"))
    b, s, width = query.shape
    if key is None:
        if not isinstance(width, int) or width % (hq + 2 * hkv):
            n.unsupported(f"packed qkv of width {width} for {hq} + 2 x {hkv} heads")
        d = width // (hq + 2 * hkv)
        query, key, value = n.emit("split", [query], {"axis": 2, "sizes": [hq * d, hkv * d, hkv * d]}, suffix="qkv")
    else:
        d = width // hq
    scale = float(n.attr("scale", 0.0)) or 1.0 / math.sqrt(d)

    def heads(x, h, what):
        x = n.emit("reshape", [x], {"shape": [0, 0, h, d]}, suffix=f"{what}.heads")
        return n.emit("transpose", [x], {"perm": [0, 2, 1, 3]}, suffix=f"{what}.t")
    q, k, v = heads(query, hq, "q"), heads(key, hkv, "k"), heads(value, hkv, "v")

    # positions and visibility, from seqlens_k [b] and total_sequence_length as onnxruntime reads them
    i64 = "i64"
    one, zero = n.const(np.asarray(1, np.int64), "one"), n.const(np.asarray(0, np.int64), "zero")
    lens = n.emit("add", [n.emit("cast", [seqlens_k], {"to": i64}, suffix="seqlens"), one], suffix="lens")
    tot = n.emit("cast", [n.emit("reshape", [total], {"shape": []}, suffix="total")], {"to": i64}, suffix="total64")
    seq = n.emit("squeeze", [n.emit("shape", [q], {"start": 2, "end": 3}, suffix="seq.shape")], {"axes": [0]},
                 suffix="seq")
    first = n.emit("equal", [seq, tot], suffix="first")
    past_b = n.emit("where", [first, zero, n.emit("sub", [lens, seq], suffix="past.later")], suffix="past")
    steps = n.emit("range", [zero, seq, one], {"length": s}, suffix="steps")
    pos = n.emit("add", [n.emit("unsqueeze", [past_b], {"axes": [1]}, suffix="past.col"),
                         n.emit("unsqueeze", [steps], {"axes": [0]}, suffix="steps.row")], suffix="positions")
    if n.attr("do_rotary", 0):
        if cos is None or sin is None:
            n.unsupported("do_rotary without cos_cache and sin_cache")
        attrs = _rope_attrs(n, cos, sin, bool(n.attr("rotary_interleaved", 0)))
        if attrs["dim"] > d:
            n.unsupported(f"a rotary dim {attrs['dim']} beyond the head dim {d}")
        q = n.emit("rope", [q, pos], attrs, suffix="q.rope")
        k = n.emit("rope", [k, pos], attrs, suffix="k.rope")

    def concat(past, new, what):
        if past.shape[-1] != d:      # the builder may leave the head dim symbolic ("head_size")
            past = n.emit("reshape", [past], {"shape": [0, 0, 0, d]}, suffix=f"{what}.past")
        return n.emit("concat", [past, new], {"axis": 2}, suffix=f"{what}.appended")
    appended_k, appended_v = concat(past_k, k, "present_key"), concat(past_v, v, "present_value")

    t = appended_k.shape[2]
    keys = n.emit("range", [zero, n.emit("squeeze", [n.emit("shape", [appended_k], {"start": 2, "end": 3},
                                                                suffix="t.shape")], {"axes": [0]}, suffix="t"), one],
                  {"length": t}, suffix="keys")
    # Row b's new keys go to slots past_b .. past_b + seq - 1 (the end of the cache unless the row was
    # padded): present[b, :, j] = new[b, :, j - past_b] there, the appended cache elsewhere.
    rel = n.emit("sub", [n.emit("unsqueeze", [keys], {"axes": [0]}, suffix="keys.b"),
                         n.emit("unsqueeze", [past_b], {"axes": [1]}, suffix="past.b")], suffix="rel")
    before = n.emit("less", [rel, zero], suffix="before")
    window = n.emit("and", [n.emit("not", [before], suffix="rel.nonneg"), n.emit("less", [rel, seq], suffix="rel.in")],
                    suffix="window")
    rows = n.emit("range", [zero, n.emit("squeeze", [n.emit("shape", [q], {"start": 0, "end": 1}, suffix="b.shape")],
                                         {"axes": [0]}, suffix="b"), one], {"length": b}, suffix="rows")
    rows = n.emit("add", [n.emit("unsqueeze", [rows], {"axes": [1]}, suffix="rows.col"),
                          n.emit("mul", [rel, zero], suffix="rows.zero")], suffix="rows.bt")
    at = n.emit("concat", [n.emit("unsqueeze", [rows], {"axes": [-1]}, suffix="at.b"),
                           n.emit("unsqueeze", [n.emit("where", [window, rel, zero], suffix="rel.in0")], {"axes": [-1]},
                                  suffix="at.s")], {"axis": -1}, suffix="at")
    in_window = n.emit("unsqueeze", [window], {"axes": [1, 3]}, suffix="window.bhtd")
    kept = n.emit("unsqueeze", [before], {"axes": [1, 3]}, suffix="before.bhtd")
    nothing = n.const(np.zeros((), numpy_dtype(q.dtype)), "nothing")

    def place(new, appended, what):
        picked = n.emit("gather_nd", [n.emit("transpose", [new], {"perm": [0, 2, 1, 3]}, suffix=f"{what}.bshd"), at],
                        suffix=f"{what}.placed")
        picked = n.emit("transpose", [picked], {"perm": [0, 2, 1, 3]}, suffix=f"{what}.placed.t")
        old = n.emit("where", [kept, appended, nothing], suffix=f"{what}.kept")   # slots after the row's end: 0
        return n.emit("where", [in_window, picked, old], suffix=what)
    present_k, present_v = place(k, appended_k, "present_key"), place(v, appended_v, "present_value")
    keys = n.emit("reshape", [keys], {"shape": [1, 1, -1]}, suffix="keys.row")
    seen = n.emit("not", [n.emit("greater", [keys, n.emit("unsqueeze", [pos], {"axes": [2]}, suffix="pos.col")],
                                 suffix="future")], suffix="causal")
    held = n.emit("less", [keys, n.emit("reshape", [lens], {"shape": [-1, 1, 1]}, suffix="lens.col")], suffix="held")
    mask = n.emit("unsqueeze", [n.emit("and", [seen, held], suffix="visible")], {"axes": [1]}, suffix="mask")
    o = n.emit("attention", [q, present_k, present_v, mask], {"causal": False, "scale": scale}, suffix="attn")
    o = n.emit("transpose", [o], {"perm": [0, 2, 1, 3]}, suffix="attn.t")
    out = n.emit("reshape", [o], {"shape": [0, 0, hq * d]})
    return [out, present_k, present_v]

"""Building blocks on SBUF-resident activations, shared by the decoder and the per-op lowering.

Layout. An activation of `features` x `rows` lives *feature-major* ("transposed") in one SBUF tile
`[P partitions, chunks, rows]`: feature `c*P + p` of row `r` is at partition p, free index (c, r).
That is what the PE array wants on both sides of a linear layer: with the weight tile W^T
[K=in, M=out] stationary and x^T [K=in, N=rows] moving, the output y^T [M=out, N=rows] comes out
feature-major again, so a chain of linears never transposes. A decode step (rows = 1) streams one
moving column per weight tile: the cheapest matmul the array has (docs/npu-performance.md). The
last chunk may be partial: its padding partitions hold garbage that nothing real ever reads
(matmuls contract over the real partitions only).

Fused epilogues: a linear's PSUM result is evacuated by one VECTOR/ACT instruction per group of
output chunks that also applies the epilogue: residual add (`x + W a` into x, in place), bias,
activation, or SwiGLU (`silu(gate) * up` from two PSUM tiles), so no intermediate makes a round
trip through HBM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isthmus.compiler.lower.npu.emitter import Emitter, Tile
from isthmus.compiler.lower.npu.quant_weights import BLOCKED
from isthmus.compiler.lower.npu.weights import PackedWeight, WeightStream
from isthmus.npu.isa import AP, DTYPES


@dataclass
class Act:
    """A feature-major activation: `tile` [P, chunks, rows]; a *split* one ("bf16x3") holds the bf16
    value in columns [0, rows) and the bf16 rounding of its remainder in [rows, 2*rows)."""

    tile: Tile
    features: int
    rows: int
    split: bool = False

    @property
    def dtype(self) -> str:
        return self.tile.dtype

    @property
    def chunks(self) -> int:
        return self.tile.shape[0]

    def parts(self, c: int) -> int:
        P = self.tile.parts
        return min(P, self.features - c * P)

    def chunk(self, c: int, r0: int = 0, r1: int | None = None) -> AP:
        return self.tile[0:self.parts(c), c, r0:self.rows if r1 is None else r1]

    def block(self, c0: int, c1: int, r0: int = 0, r1: int | None = None) -> AP:
        """Chunks c0:c1 on every partition (padding partitions included): for elementwise work."""
        return self.tile[:, c0:c1, r0:self.rows if r1 is None else r1]


def new_act(em: Emitter, features: int, rows: int, dtype: str, what: str = "", split: bool = False) -> Act:
    P = em.cfg.partitions
    return Act(em.sbuf((-(-features // P), rows * (2 if split else 1)), dtype, what=what), features, rows, split)


def store(em: Emitter, out: Act, c0: int, c1: int, r0: int, r1: int, compute) -> None:
    """Write chunks c0:c1, rows r0:r1 of `out` with `compute(dst_ap)` (one instruction writing an AP of
    that shape): straight into `out`, or, for a split `out`, into f32 and then as hi + lo."""
    if not out.split:
        compute(out.tile[:, c0:c1, r0:r1])
        return
    tmp = em.sbuf((c1 - c0, r1 - r0), "f32", what="split")
    compute(tmp[:, :, :])
    split_into(em, out, tmp[:, :, :], c0, c1, r0, r1)
    em.free(tmp)


def split_into(em: Emitter, out: Act, src, c0: int, c1: int, r0: int, r1: int) -> None:
    """hi = bf16(src); lo = bf16(src - hi)."""
    R = out.rows
    hi, lo = out.tile[:, c0:c1, r0:r1], out.tile[:, c0:c1, R + r0:R + r1]
    em.copy(hi, src)
    em.tt(lo, src, hi, "sub")


def bcast(t: Tile, c0: int, c1: int, r0: int, r1: int, over: str) -> AP:
    """A [P, (c1-c0), (r1-r0)] view of a smaller tile repeated along one axis:
    over="rows": t is [P, chunks] (one value per feature), repeated over rows;
    over="chunks": t is [P, rows] (one value per row and partition), repeated over chunks."""
    P = t.parts
    if over == "rows":
        return t.raw(0, P, c0, [(c1 - c0, 1), (r1 - r0, 0)])
    rows = t.shape[-1]
    return t.raw(0, P, r0, [(c1 - c0, 0), (r1 - r0, 1)]) if rows else None


class Consts:
    """Constant tiles a program builds once: ones, identity (for PE transposes) per dtype."""

    def __init__(self, em: Emitter):
        self.em = em
        self._ones: dict[str, Tile] = {}

    def ones(self, dtype: str) -> Tile:
        t = self._ones.get(dtype)
        if t is None:
            P = self.em.cfg.partitions
            t = self._ones[dtype] = self.em.sbuf((P,), dtype, what="ones")
            self.em.memset(t.ap(), 1.0)
        return t


def linear(em: Emitter, x: Act, w: PackedWeight, stream: WeightStream, out: Act, *, epilogue: str = "copy",
           residual: Act | None = None, bias: Tile | None = None, func: str = "identity",
           up: PackedWeight | None = None, evict=None, scale: "RowScale | None" = None,
           group: int | None = None, k_outer: bool = False) -> Act:
    """out^T = epilogue(W x^T) for every row of x. Epilogues: "copy", "bias" (per-feature bias tile
    [P, chunks]), "act" (func), "bias_act", "residual" (out = residual + W x; out may be residual),
    "swiglu" (out = silu(W x) * (U x), with U = `up`, a weight of the same shape).

    A split x and weight (bf16x3) compute W x as W_hi x_hi + W_hi x_lo + W_lo x_hi, accumulated in
    PSUM. When the hi and lo columns together fit the tensor engine's minimum moving width (decode),
    W_hi takes [x_hi | x_lo] in one matmul and the eviction adds the two halves, so the product
    costs two matmuls per weight tile instead of three.

    `evict(c0, c1, r0, r1, srcs)`, if given, takes each group of output chunks from PSUM instead of the
    epilogue (`out` is then unused: the decoder streams the logits to HBM a group at a time; a `scale`
    is then the evict's to apply, as `GateUp` does).

    `scale` (a RowScale: x's deferred 1/rms, one row): the product is W x * scale, applied by the
    eviction (the per-row scalar commutes with the matmul, so the matmuls need not wait for it); under
    "swiglu" only the gate's, out = silu(W x * s) * (U x), and the caller owes the up's s to the consumer
    (the down projection's `scale`).

    `group`: at most this many output chunks per eviction (default: a PSUM bank's worth), so the first
    chunks' epilogue runs beside the later chunks' matmuls; `k_outer`: the matmuls input chunk by input
    chunk (every output chunk's accumulation advanced by one K tile at a time), so they can start on
    x's first chunks while its last are still being evicted (a `group`ed linear before this one)."""
    if evict is None:
        def evict(c0, c1, r0, r1, srcs):
            _epilogue(em, out, c0, c1, r0, r1, epilogue, residual, bias, func, srcs,
                      None if scale is None else scale.ap())
    if w.fmt in BLOCKED:               # int8 / q4: scales per block of inputs (block_linear.py)
        from isthmus.compiler.lower.npu.block_linear import linear_blocked
        linear_blocked(em, x, [w] if up is None else [w, up], stream, out, evict)
        return out
    cfg = em.cfg
    P = cfg.partitions
    split = w.lo is not None           # a weight without a lo part (quantized: exact in bf16) may meet a
    if split and not x.split:          # split activation: W x_hi + W x_lo
        raise ValueError("a split weight needs a split activation")
    xsplit = x.split
    R = x.rows
    rb_max = cfg.moving_max
    paired = xsplit and 2 * R <= cfg.tensor_min_moving         # [hi | lo] in one moving operand
    width = 2 * R if paired else min(R, rb_max)
    pairs = [w] if up is None else [w, up]
    for pcs in zip(*(ww.pieces for ww in pairs)):
        for ww, pc in zip(pairs, pcs):
            stream.acquire(ww, pc)
            if ww.lo is not None:
                stream.acquire(ww.lo, ww.lo.pieces[ww.pieces.index(pc)])
        pc0 = pcs[0]
        for r0 in range(0, R, rb_max):
            r1 = min(R, r0 + rb_max)
            rn = r1 - r0
            cols = 2 * rn if paired else rn
            g = max(1, (cfg.psum_bank_bytes // 4) // cols)
            g = min(g, group or g)
            chunk_lo, chunk_hi = pc0.o0 // P, -(-pc0.o1 // P)
            for gc0 in range(chunk_lo, chunk_hi, g):
                gc1 = min(chunk_hi, gc0 + g)
                ps = [em.psum((gc1 - gc0, cols)) for _ in pairs]
                for ww, pc, pt in zip(pairs, pcs, ps):
                    lpc = ww.lo.pieces[ww.pieces.index(pc)] if ww.lo is not None else None
                    order = [(c, t) for c in range(gc0, gc1) for t in range(ww.kt)]
                    if k_outer:
                        order.sort(key=lambda ct: ct[1])
                    for i, (c, t) in enumerate(order):
                        m0, m1 = c * P, min(ww.n, (c + 1) * P)
                        dst = pt[0:m1 - m0, c - gc0, :]
                        kp = P if t < ww.kt - 1 else ww.kp
                        sta = ww.stationary(pc, t, m0, m1)
                        if not xsplit:
                            em.matmul(dst, sta, x.tile[0:kp, t, r0:r1], acc=t > 0)
                        elif paired:
                            em.matmul(dst, sta, x.tile[0:kp, t, 0:2 * R], acc=t > 0)
                            if lpc is not None:
                                em.matmul(pt[0:m1 - m0, c - gc0, 0:R], ww.lo.stationary(lpc, t, m0, m1),
                                          x.tile[0:kp, t, 0:R], acc=True)
                        elif lpc is None:
                            em.matmul(dst, sta, x.tile[0:kp, t, r0:r1], acc=t > 0)
                            em.matmul(dst, sta, x.tile[0:kp, t, R + r0:R + r1], acc=True)
                        else:
                            em.matmul(dst, sta, x.tile[0:kp, t, r0:r1], acc=t > 0)
                            em.matmul(dst, sta, x.tile[0:kp, t, R + r0:R + r1], acc=True)
                            em.matmul(dst, ww.lo.stationary(lpc, t, m0, m1), x.tile[0:kp, t, r0:r1], acc=True)
                        if scale is not None and i == ww.kt - 1:    # the 1/rms chain's matmul after one
                            scale.ap()                                  # chunk's worth, not after all
                for ww, pt in zip(pairs, ps):
                    if ww.scale_tile is not None:      # fp8: the per-output scale, one per partition
                        em.tt(pt[:, :, :], pt[:, :, :], bcast(ww.scale_tile, gc0, gc1, 0, cols, "rows"), "mul")
                srcs = []
                for pt in ps:
                    if paired:          # fold the x_lo half into the first
                        em.tt(pt[:, :, 0:R], pt[:, :, 0:R], pt[:, :, R:2 * R], "add")
                        srcs.append(pt[:, :, 0:R])
                    else:
                        srcs.append(pt[:, :, :])
                evict(gc0, gc1, r0, r1, srcs)
                em.free(*ps)
        for ww, pc in zip(pairs, pcs):
            stream.release(ww, pc)
            if ww.lo is not None:
                stream.release(ww.lo, ww.lo.pieces[ww.pieces.index(pc)])
    return out


def gate_up_rows(F: int, P: int) -> np.ndarray | None:
    """The row order of gate and up stacked as one weight ([gate; up], 2F rows) for `GateUp`, or None where
    stacking saves no output chunk. Each whole chunk of features takes two chunks (gate's, then up's);
    a remainder of r <= P/2 features shares one chunk, gate's r rows at partitions [0, r), up's at
    [r, 2r): ceil(2F/P) chunks where separate weights take 2 ceil(F/P) (SmolLM2 on 8 cores: 192
    features a core, 3 chunks of 128 instead of 4, so 15 decode matmuls instead of 20)."""
    full, r = divmod(F, P)
    if r == 0 or r > P // 2:
        return None
    rows = []
    for j in range(full):
        rows += [np.arange(j * P, (j + 1) * P), F + np.arange(j * P, (j + 1) * P)]
    rows += [np.arange(full * P, F), F + np.arange(full * P, F)]
    return np.concatenate(rows)


class GateUp:
    """linear's `evict` for gate and up stacked in one weight (`gate_up_rows`): out = silu(gate x * s) *
    (up x) into the feature-major `out` (F features), s the deferred 1/rms (`scale`) or 1. A gate chunk's
    silu waits in SBUF for its up chunk; the shared last chunk holds gate's r features at partitions
    [0, r) and up's at [r, 2r): VECTOR/ACT lanes do not cross partitions, so up's r values come down to
    [0, r) by two transposes (through [rows, r]) before the product."""

    def __init__(self, em: Emitter, out: Act, scale: "RowScale | None" = None):
        self.em, self.out, self.scale = em, out, scale
        self.full, self.r = divmod(out.features, em.cfg.partitions)
        self.silu = {}

    def _silu(self, dst: AP, src: AP) -> None:
        s = 1.0 if self.scale is None else self.scale.ap(dst.count)
        self.em.act(dst, src, func="silu", scale=s)

    def __call__(self, c0, c1, r0, r1, srcs):
        em, out, P, R = self.em, self.out, self.em.cfg.partitions, r1 - r0
        for c in range(c0, c1):
            src = _sub(srcs[0], 0, srcs[0].count, c - c0)          # [P, 1, R]
            j, up = divmod(c, 2)
            if j < self.full and not up:
                t = self.silu[j] = em.sbuf((1, R), "f32", what="silu(gate)")
                self._silu(t[:, :, :], src)
            elif j < self.full:
                t = self.silu.pop(j)
                store(em, out, j, j + 1, r0, r1, lambda d: em.tt(d, t[:, :, :], src, "mul"))
                em.free(t)
            else:
                r = self.r
                g = em.sbuf((1, R), "f32", what="silu(gate)")
                self._silu(g[0:r, :, :], _sub(src, 0, r))
                u = em.sbuf((1, R), "f32", what="up, moved down")
                for b0 in range(0, R, P):                   # rows in blocks of the partitions
                    b1 = min(R, b0 + P)
                    ut = em.sbuf((r,), "f32", what="up^T")
                    em.transpose(ut[0:b1 - b0, :], _rows(_sub(src, r, 2 * r), b0, b1))
                    em.transpose(u[0:r, 0, b0:b1], ut[0:b1 - b0, :])
                    em.free(ut)
                store(em, out, j, j + 1, r0, r1, lambda d: em.tt(_sub(d, 0, r), g[0:r, :, :], u[0:r, :, :], "mul"))
                em.free(g, u)


def _sub(ap: AP, p0: int, p1: int, chunk: int | None = None) -> AP:
    """Partitions [p0, p1) of a [parts, chunks, rows] AP, and only chunk `chunk` of it (kept as a dim of 1)."""
    import dataclasses
    a = dataclasses.replace(ap, start=ap.start + p0, count=p1 - p0)
    if chunk is not None:
        (_, s0), *rest = a.dims
        a = dataclasses.replace(a, offset=a.offset + chunk * s0 * DTYPES[a.dtype].size, dims=((1, s0), *rest))
    return a


def _rows(ap: AP, f0: int, f1: int) -> AP:
    """Rows [f0, f1) of a [parts, 1, rows] AP, as [parts, rows] (one free dim: a transpose's operand)."""
    import dataclasses
    _, (_, s1) = ap.dims
    return dataclasses.replace(ap, offset=ap.offset + f0 * s1 * DTYPES[ap.dtype].size, dims=((f1 - f0, s1),))


def _epilogue(em, out: Act, c0, c1, r0, r1, epilogue, residual, bias, func, srcs, s=None):
    src = srcs[0]
    if s is not None and epilogue not in ("copy", "residual", "swiglu"):
        raise ValueError(f"a row scale with epilogue {epilogue}")
    if epilogue == "copy":
        store(em, out, c0, c1, r0, r1, lambda d: em.copy(d, src) if s is None else em.ts(d, src, "mul", s))
    elif epilogue == "residual":
        res = residual.tile[:, c0:c1, r0:r1]
        if s is not None:
            tmp = em.sbuf((c1 - c0, r1 - r0), "f32", what="scaled")
            em.ts(tmp[:, :, :], src, "mul", s)
            src = tmp[:, :, :]
        store(em, out, c0, c1, r0, r1, lambda d: em.tt(d, src, res, "add"))
        if s is not None:
            em.free(tmp)
    elif epilogue == "bias":
        b = bcast(bias, c0, c1, r0, r1, "rows")
        store(em, out, c0, c1, r0, r1, lambda d: em.tt(d, src, b, "add"))
    elif epilogue == "bias_act":
        b = bcast(bias, c0, c1, r0, r1, "rows")
        tmp = em.sbuf((c1 - c0, r1 - r0), "f32", what="epilogue")
        em.tt(tmp[:, :, :], src, b, "add")
        store(em, out, c0, c1, r0, r1, lambda d: em.act(d, tmp[:, :, :], func=func))
        em.free(tmp)
    elif epilogue == "act":
        store(em, out, c0, c1, r0, r1, lambda d: em.act(d, src, func=func))
    elif epilogue == "swiglu":
        tmp = em.sbuf((c1 - c0, r1 - r0), "f32", what="swiglu")
        em.act(tmp[:, :, :], src, func="silu", scale=1.0 if s is None else s)
        store(em, out, c0, c1, r0, r1, lambda d: em.tt(d, tmp[:, :, :], srcs[1], "mul"))
        em.free(tmp)
    else:
        raise ValueError(f"unknown epilogue {epilogue}")


def linear_rows(em: Emitter, x: Act, w: PackedWeight, stream: WeightStream, dst: Tile, r0: int, r1: int,
                copy_engine: str | None = None, scale: "RowScale | None" = None) -> None:
    """Rows r0:r1 (at most P) of y = x W^T in *row-major* layout: dst [rows on partitions, outputs],
    with the weight as the moving operand (outputs up to one PSUM bank per matmul). `scale`: as
    linear's (one row: its value on partition 0)."""
    cfg = em.cfg
    P = cfg.partitions
    per = cfg.moving_max
    split = w.lo is not None
    R = x.rows
    for pc in w.pieces:
        stream.acquire(w, pc)
        lpc = w.lo.pieces[w.pieces.index(pc)] if split else None
        if split:
            stream.acquire(w.lo, lpc)
        for o0 in range(pc.o0, pc.o1, per):
            o1 = min(pc.o1, o0 + per)
            pt = em.psum((o1 - o0,))
            for t in range(w.kt):
                kp = P if t < w.kt - 1 else w.kp
                mov = pc.tile[0:kp, t, o0 - pc.o0:o1 - pc.o0]
                em.matmul(pt[0:r1 - r0, :], x.tile[0:kp, t, r0:r1], mov, acc=t > 0)
                if x.split:
                    em.matmul(pt[0:r1 - r0, :], x.tile[0:kp, t, R + r0:R + r1], mov, acc=True)
                if split:
                    em.matmul(pt[0:r1 - r0, :], x.tile[0:kp, t, r0:r1], lpc.tile[0:kp, t, o0 - pc.o0:o1 - pc.o0],
                              acc=True)
            if scale is None:
                em.copy(dst[0:r1 - r0, o0:o1], pt[0:r1 - r0, :], engine=copy_engine)
            else:
                em.act(dst[0:r1 - r0, o0:o1], pt[0:r1 - r0, :], scale=scale.ap(r1 - r0))   # (VECTOR: rope's)
            em.free(pt)
        stream.release(w, pc)
        if split:
            stream.release(w.lo, lpc)


def _rms_partial(em: Emitter, x: Act, r0: int, r1: int, mm_dtype: str) -> Tile:
    """Each partition's sum of squares of x[:, :, r0:r1] over the chunks ([P, rows], mm_dtype)."""
    P = em.cfg.partitions
    n, nc = r1 - r0, x.chunks
    sq = em.sbuf((nc, n), "f32", what="rmsnorm squares")
    em.act(sq[:, :, :], x.block(0, nc, r0, r1), func="square")
    last = x.parts(nc - 1)
    if last < P:                                  # the last chunk's padding partitions hold garbage
        em.memset(sq[last:P, nc - 1, :], 0.0)
    part = em.sbuf((n,), mm_dtype, what="rmsnorm partial sums")
    em.reduce(part[:, :], sq.raw(0, P, 0, [(n, 1), (nc, n)]), "sum")
    em.free(sq)
    return part


def _rms_rstd(em: Emitter, consts: Consts, part: Tile, rstd: Tile, features: int, eps: float, mm_dtype: str) -> None:
    """rstd[:, r] = 1 / sqrt(sum over partitions of part[:, r] / features + eps) on every partition: one
    ones-matrix matmul sums over the partitions and broadcasts the total to all of them."""
    P = em.cfg.partitions
    n = part.shape[-1]
    per_bank = em.cfg.psum_bank_bytes // 4
    ones = consts.ones(mm_dtype)
    for q0 in range(0, n, per_bank):
        q1 = min(n, q0 + per_bank)
        ss = em.psum((q1 - q0,))
        em.matmul(ss[:, :], ones[0:P, 0:P], part[:, q0:q1])
        em.act(rstd[:, q0:q1], ss[:, :], func="rsqrt", scale=1.0 / features, bias=eps)
        em.free(ss)
    em.free(part)


def rmsnorm(em: Emitter, consts: Consts, x: Act, g: Tile, eps: float, out: Act, r0: int = 0,
            r1: int | None = None, mm_dtype: str = "bf16") -> Act:
    """out[:, :, 0:n] = x[:, :, r0:r1] / sqrt(mean over features of x^2 + eps) * g (g: [P, chunks] f32).
    The sum over features crosses partitions: VECTOR sums each partition's squares over the chunks,
    then one ones-matrix matmul sums over the partitions and broadcasts the total to all of them."""
    r1 = x.rows if r1 is None else r1
    n = r1 - r0
    nc = x.chunks
    part = _rms_partial(em, x, r0, r1, mm_dtype)
    consts.ones(mm_dtype)                         # (built on first use: before rstd, as SBUF was laid out)
    rstd = em.sbuf((n,), "f32", what="rmsnorm rstd")
    _rms_rstd(em, consts, part, rstd, x.features, eps, mm_dtype)
    tmp = em.sbuf((nc, n), "f32", what="rmsnorm scaled")
    em.tt(tmp[:, :, :], x.block(0, nc, r0, r1), bcast(rstd, 0, nc, 0, n, "chunks"), "mul")
    store(em, out, 0, nc, 0, n, lambda d: em.tt(d, tmp[:, :, :], bcast(g, 0, nc, 0, n, "rows"), "mul"))
    em.free(tmp, rstd)
    return out


class RowScale:
    """rmsnorm with its 1/rms deferred past the matmuls it feeds (one row: a decode step). rmsnorm(x) W =
    ((x * g) W) / rms(x): the per-row scalar commutes with the matmul, so `out` = x * g (one VECTOR
    instruction after x lands) lets the linears start at once, while the 1/rms chain (squares, sum,
    ones-matmul, rsqrt) runs beside them and only their evictions wait for it (`linear(..., scale=)`).
    The ones-matmul and the rsqrt are emitted at the first `ap()`, which `linear` makes after its first
    output chunk's matmuls: the tensor engine meets that matmul when its input is long ready, and the
    rsqrt is done before the first eviction needs it.
    Rounding: out is x * g rounded to the matmul dtype (rmsnorm rounds x / rms * g), and 1/rms scales
    the fp32 product."""

    def __init__(self, em: Emitter, consts: Consts, x: Act, g: Tile, eps: float, out: Act, mm_dtype: str = "bf16"):
        if x.rows != 1:
            raise ValueError("a deferred rmsnorm scale is per row: one row (a decode step) only")
        self.em, self.consts, self.eps, self.mm_dtype, self.features = em, consts, eps, mm_dtype, x.features
        nc = x.chunks
        store(em, out, 0, nc, 0, 1, lambda d: em.tt(d, x.block(0, nc), bcast(g, 0, nc, 0, 1, "rows"), "mul"))
        self.part = _rms_partial(em, x, 0, 1, mm_dtype)
        self.rstd = em.sbuf((1,), "f32", what="rmsnorm rstd")
        self.ready = False

    def ap(self, parts: int | None = None, p0: int = 0):
        """1/rms(x) as a per-partition scalar (every partition holds it; `parts` of them from p0)."""
        if not self.ready:
            _rms_rstd(self.em, self.consts, self.part, self.rstd, self.features, self.eps, self.mm_dtype)
            self.ready = True
        P = self.em.cfg.partitions
        return self.rstd[p0:p0 + (parts or P - p0), 0:1]

    def free(self) -> None:
        self.ap()
        self.em.free(self.rstd)

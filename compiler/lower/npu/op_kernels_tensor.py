"""Node kernels of the per-op lowering for the tensor-engine ops: linear, matmul, rope, attention.

linear / matmul with a constant right operand: the weight is packed ahead of time (kernels/numba/weight_pack.py)
and
streamed through the program's weight ring; x^T is loaded feature-major by a transposing DMA, the
shared `resident_kernels.linear` runs (bias fused into the PSUM evacuation) and y^T is stored back
row-major by another transposing DMA. matmul of two activations: A^T tiles stationary, B tiles
moving, one PSUM bank per [128, 512] output block. rope gathers the cos/sin rows of each row's
position; attention loads K^T, V and Q^T per kv head and runs `attention.attend`.
"""

from __future__ import annotations

import math

import numpy as np

from isthmus.compiler.lower.npu.attention import Unit, attend
from isthmus.compiler.lower.npu.op_kernels import bstrides
from isthmus.compiler.lower.npu.op_runner import HV, Ctx
from isthmus.compiler.lower.npu.resident_kernels import Act, linear, new_act, split_into
from isthmus.compiler.lower.npu.weights import make_weight, piece_cols_for
from isthmus.errors import UnsupportedError


def _weight(ctx: Ctx, v, transposed: bool = False, label: str | None = None):
    """The packed weight of constant `v` ([out, in]; or [in, out] with `transposed`), declared once."""
    cache = ctx.__dict__.setdefault("weights", {})
    key = (id(v), transposed)
    w = cache.get(key)
    if w is None:
        P = ctx.em.cfg.partitions
        data = v.data
        if transposed and hasattr(data, "dequantize"):
            data = data.dequantize()
        n, k = (data.shape[::-1] if transposed else data.shape)
        budget = ctx.stream.capacity // (8 if ctx.split else 4)
        w = make_weight(f"w{len(cache)}.{v.name}"[:100], data, ctx.wdt, P, piece_cols_for(k, n, P, ctx.wdt, budget),
                        transposed=transposed, split=ctx.split, label=label or ctx.em.current_label)
        for part in (w, w.lo):
            if part is not None:
                part.hbm = ctx.em.tensor(part.name, part.data.shape, part.dtype, "input")
                ctx.consts[part.name] = part.data
        cache[key] = w
    return w


def _bias_tile(ctx: Ctx, v, n: int):
    """A bias [n] laid out per feature chunk, [P, chunks] f32, in SBUF."""
    P = ctx.em.cfg.partitions
    nc = -(-n // P)
    laid = np.zeros(nc * P, np.float32)
    laid[:n] = np.asarray(v.data.dequantize() if hasattr(v.data, "dequantize") else v.data, np.float32)
    name = f"b{len(ctx.consts)}.{v.name}"[:100]
    t = ctx.em.tensor(name, (P, nc), "f32", "input")
    ctx.consts[name] = laid.reshape(nc, P).T.copy()
    tile = ctx.em.sbuf((nc,), "f32", what="bias")
    ctx.em.dma(tile[:, :], t[0:P, 0:nc])
    return tile


def _load_xT(ctx: Ctx, x: HV, r0: int, rb: int, K: int) -> Act:
    """Rows r0:r0+rb of x [R, K] feature-major (split into hi/lo for bf16x3)."""
    em, P = ctx.em, ctx.em.cfg.partitions
    raw = new_act(em, K, rb, "f32" if ctx.split else ctx.wdt, "x^T")
    for c in range(raw.chunks):
        kp = raw.parts(c)
        em.dma(raw.tile[0:kp, c, 0:rb], x.ap(r0 * K + c * P, kp, 1, [(rb, K)]))
    if not ctx.split:
        return raw
    xs = new_act(em, K, rb, ctx.wdt, "x^T split", split=True)
    split_into(em, xs, raw.tile[:, :, :], 0, raw.chunks, 0, rb)
    em.free(raw.tile)
    return xs


def _linear_into(ctx: Ctx, x: HV, w, out: HV, R: int, K: int, N: int, bias=None):
    em, P = ctx.em, ctx.em.cfg.partitions
    from isthmus.npu.isa import DTYPES
    kt = -(-K // P)
    # per row of a block, bytes per partition: x^T (f32 staging + hi/lo for bf16x3) and y^T (f32)
    x_bytes = kt * (4 + 2 * DTYPES[ctx.wdt].size if ctx.split else DTYPES[ctx.wdt].size)
    per_row = x_bytes + -(-N // P) * 4
    free = max(hi - lo for lo, hi in em.sbuf_alloc.holes) - 16 * 1024
    rb_max = max(1, min(em.cfg.moving_max, free // per_row))
    for r0 in range(0, R, rb_max):
        rb = min(rb_max, R - r0)
        xT = _load_xT(ctx, x, r0, rb, K)
        yT = new_act(em, N, rb, "f32", "y^T")
        ctx.stream.add(w)
        linear(em, xT, w, ctx.stream, yT, epilogue="bias" if bias is not None else "copy", bias=bias)
        for c in range(yT.chunks):
            pm = yT.parts(c)
            em.dma(out.ap(r0 * N + c * P, pm, 1, [(rb, N)]), yT.tile[0:pm, c, 0:rb])
        em.free(xT.tile, yT.tile)


def _linear(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    K, N = x.shape[-1], out.shape[-1]
    R = math.prod(x.shape[:-1])
    if not node.inputs[1].is_constant:
        raise UnsupportedError("linear with a non-constant weight")
    w = _weight(ctx, node.inputs[1])
    bias = _bias_tile(ctx, node.inputs[2], N) if len(node.inputs) > 2 else None
    if R:
        _linear_into(ctx, x, w, out, R, K, N, bias)
    if bias is not None:
        ctx.em.free(bias)


def _matmul(ctx: Ctx, node):
    a, b = node.inputs
    out = ctx.new(node.outputs[0])
    sa, sb = ctx.shape(a), ctx.shape(b)
    if b.is_constant and len(sb) == 2 and len(sa) >= 1:
        K, N = sb
        R = math.prod(sa[:-1])
        w = _weight(ctx, b, transposed=True)
        if R:
            _linear_into(ctx, ctx.hv(a), w, out, R, K, N)
        return
    A, B = ctx.hv(a), ctx.hv(b)
    a2 = (1,) + tuple(sa) if len(sa) == 1 else tuple(sa)
    b2 = tuple(sb) + (1,) if len(sb) == 1 else tuple(sb)
    M, K, N = a2[-2], a2[-1], b2[-1]
    batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    sta, stb = bstrides(a2[:-2], batch), bstrides(b2[:-2], batch)
    em, P = ctx.em, ctx.em.cfg.partitions
    nb_max = em.cfg.moving_max
    dt = ctx.adt
    for bi, idx in enumerate(np.ndindex(*batch) if batch else [()]):
        oa = sum(i * s for i, s in zip(idx, sta)) * M * K
        ob = sum(i * s for i, s in zip(idx, stb)) * K * N
        oo = bi * M * N
        for m0 in range(0, M, P):
            mb = min(P, M - m0)
            for n0 in range(0, N, nb_max):
                nb = min(nb_max, N - n0)
                ps = em.psum((nb,), parts=mb)
                for t in range(-(-K // P)):
                    kp = min(P, K - t * P)
                    at = em.sbuf((mb,), dt, what="A^T")
                    bt = em.sbuf((nb,), dt, what="B")
                    em.dma(at[0:kp, :], A.ap(oa + m0 * K + t * P, kp, 1, [(mb, K)]))
                    em.dma(bt[0:kp, :], B.ap(ob + t * P * N + n0, kp, N, [(nb, 1)]))
                    em.matmul(ps[0:mb, :], at[0:kp, :], bt[0:kp, :], acc=t > 0)
                    em.free(at, bt)
                res = em.sbuf((nb,), out.dtype, what="product")
                em.copy(res[0:mb, :], ps[0:mb, :])
                em.dma(out.ap(oo + m0 * N + n0, mb, N, [(nb, 1)]), res[0:mb, :])
                em.free(ps, res)


def _rope(ctx: Ctx, node):
    from isthmus.compiler.ops.attention import rope_angles
    x, pos = ctx.hv(node.inputs[0]), ctx.hv(node.inputs[1])
    out = ctx.new(node.outputs[0])
    em, P = ctx.em, ctx.em.cfg.partitions
    B, H, S, D = x.shape
    d = node.attrs["dim"] or D
    half = d // 2
    max_pos = max(8192, ctx.exe._context())
    key = ("rope", max_pos, d, float(node.attrs["theta"]), tuple(node.attrs["factors"]))
    tab = ctx.__dict__.setdefault("tables", {}).get(key)
    if tab is None:
        cos, sin = rope_angles(np.arange(max_pos), d, node.attrs["theta"], node.attrs["factors"])
        name = f"rope{len(ctx.consts)}"
        tab = ctx.em.tensor(name, (max_pos, d), "f32", "input")
        ctx.consts[name] = np.concatenate([cos, sin], axis=1).astype(np.float32)
        ctx.tables[key] = tab
    inter = node.attrs["layout"] == "interleaved"
    for b in range(B):
        for h in range(H):
            for s0 in range(0, S, P):
                pn = min(P, S - s0)
                it = em.sbuf((1,), "i32", what="positions")
                poff = (b * S if len(pos.shape) == 2 else 0) + s0
                em.dma(it[0:pn, :], pos.ap(poff, pn, 1, [(1, 1)]))
                cs = em.sbuf((d,), "f32", what="cos, sin")
                em.gather(cs[0:pn, :], tab.ap(0, max_pos, d, [(d, 1)]), it[0:pn, :])
                xt = em.sbuf((D,), x.dtype, what="x")
                base = ((b * H + h) * S + s0) * D
                em.dma(xt[0:pn, :], x.ap(base, pn, D, [(D, 1)]))
                yt = em.sbuf((D,), out.dtype, what="roped")
                ea, eb = (slice(0, d, 2), slice(1, d, 2)) if inter else (slice(0, half), slice(half, d))
                cos, sin = cs[0:pn, 0:half], cs[0:pn, half:d]
                t1 = em.sbuf((half,), "f32", what="rope a")
                t2 = em.sbuf((half,), "f32", what="rope b")
                em.tt(t1[0:pn, :], xt[0:pn, ea], cos, "mul")
                em.tt(t2[0:pn, :], xt[0:pn, eb], sin, "mul")
                em.tt(yt[0:pn, ea], t1[0:pn, :], t2[0:pn, :], "sub")
                em.tt(t1[0:pn, :], xt[0:pn, ea], sin, "mul")
                em.tt(t2[0:pn, :], xt[0:pn, eb], cos, "mul")
                em.tt(yt[0:pn, eb], t1[0:pn, :], t2[0:pn, :], "add")
                if d < D:
                    em.copy(yt[0:pn, d:D], xt[0:pn, d:D])
                em.dma(out.ap(base, pn, D, [(D, 1)]), yt[0:pn, :])
                em.free(it, cs, xt, yt, t1, t2)


def _attention(ctx: Ctx, node):
    q, k, v = (ctx.hv(i) for i in node.inputs[:3])
    mask = ctx.hv(node.inputs[3]) if len(node.inputs) > 3 else None
    out = ctx.new(node.outputs[0])
    em, P = ctx.em, ctx.em.cfg.partitions
    B, H, S, hd = q.shape
    G, T = k.shape[1], k.shape[2]
    if hd > P and hd % P:
        raise UnsupportedError(f"attention head_dim {hd} exceeds the {P} partitions and is not a multiple of them")
    kp, nkt = min(hd, P), -(-hd // P)    # a wider head: nkt tiles of the partitions, scores accumulated in PSUM
    group = H // G
    scale = float(node.attrs["scale"]) or 1.0 / math.sqrt(hd)
    causal = bool(node.attrs["causal"])
    adt = ctx.adt
    nvc = -(-T // P)
    mst = bstrides(mask.shape, (B, H, S, T)) if mask is not None else None
    for b in range(B):
        for g in range(G):
            kv = (b * G + g) * T * hd
            Kw = em.sbuf((nkt, T), adt, what="K^T")
            for t in range(nkt):
                em.dma(Kw[0:kp, t, :], k.ap(kv + t * kp, kp, 1, [(T, hd)]))
            Vw = em.sbuf((nvc, hd), adt, what="V")
            if T // P:
                em.dma(Vw[:, 0:T // P, :], v.ap(kv, P, hd, [(T // P, P * hd), (hd, 1)]))
            if T % P:
                em.dma(Vw[0:T % P, T // P, :], v.ap(kv + (T // P) * P * hd, T % P, hd, [(hd, 1)]))
            for h in range(g * group, (g + 1) * group):
                for q0 in range(0, S, P):
                    M = min(P, S - q0)
                    qo = ((b * H + h) * S + q0) * hd
                    qt = em.sbuf((nkt, M), adt, what="Q^T")
                    for t in range(nkt):
                        em.dma(qt[0:kp, t, :], q.ap(qo + t * kp, kp, 1, [(M, hd)]))
                    bias = None
                    if mask is not None:
                        bias = _mask(em, mask, b * mst[0] + h * mst[1] + q0 * mst[2], M, mst[2], T, mst[3], scale)
                    u = Unit([qt[0:kp, t, :] for t in range(nkt)], None, list(range(nkt)), 0, 0, M, q0, True)
                    Of = attend(em, u, Kw, Vw, bias, hd, T, 0, scale, adt, offset=(T - S) if causal else None,
                                dead_below=None if mask is None else (FIN_MASK + INF_MASK) / (2 * scale))
                    em.dma(out.ap(qo, M, hd, [(hd, 1)]), Of[0:M, :])
                    em.free(Of, qt, bias)
            em.free(Kw, Vw)


FIN_MASK, INF_MASK = -1e24, -1e30   # a finite mask entry is clamped at FIN_MASK; -inf becomes INF_MASK


def _mask(em, mask: HV, off: int, rows: int, rstride: int, T: int, cstride: int, scale: float):
    """An additive mask as the scores' bias row block, divided by `scale` (attend multiplies by it).
    Finite entries are clamped at FIN_MASK, which swamps any score in fp32 (as float32.min does in
    the reference: a row masked with it averages its values), and -inf entries become the much
    lower INF_MASK, so a row of -inf can be told apart (the reference gives it zeros). -inf is found
    without a compare: -inf * 0 + 1 is NaN, which the conversion to i32 makes 0 (finite: 1)."""
    bias = em.sbuf((T,), "f32", what="mask")
    fin = em.sbuf((T,), "f32", what="mask finite")
    fi = em.sbuf((T,), "i32", what="mask finite")
    em.dma(bias[0:rows, :], mask.ap(off, rows, rstride, [(T, cstride)]))
    em.ts(fin[0:rows, :], bias[0:rows, :], "mul", 0.0)
    em.ts(fin[0:rows, :], fin[0:rows, :], "add", 1.0)
    em.copy(fi[0:rows, :], fin[0:rows, :])
    em.copy(fin[0:rows, :], fi[0:rows, :])
    em.ts(bias[0:rows, :], bias[0:rows, :], "max", FIN_MASK)          # bias = max(m, FIN) * f + INF * (1 - f)
    em.tt(bias[0:rows, :], bias[0:rows, :], fin[0:rows, :], "mul")
    em.ts(fin[0:rows, :], fin[0:rows, :], "mul", -INF_MASK)
    em.ts(fin[0:rows, :], fin[0:rows, :], "add", INF_MASK)
    em.tt(bias[0:rows, :], bias[0:rows, :], fin[0:rows, :], "add")
    em.ts(bias[0:rows, :], bias[0:rows, :], "mul", 1.0 / scale)
    em.free(fin, fi)
    return bias


KERNELS = {"linear": _linear, "matmul": _matmul, "rope": _rope, "attention": _attention}

"""Node kernels of the per-op lowering (op_runner): each reads its inputs from HBM and writes its
outputs to HBM, tiling its iteration space over the partitions.

The workhorse is `strided`: the output's index space is coalesced with every operand's strides
(0 along broadcast dims), its innermost dims (up to 3, at most FREE_MAX elements) become a tile's
free dims, the next dim out the partitions (blocks of P), and any others are looped over. Each
operand tile is one DMA whose access pattern does the strides, broadcasts or transposition, so
elementwise ops, casts, transpose, expand, slice, concat and split are all this one loop with a
different compute step. Reductions (softmax, norms, reduce_*) use the same loop with the reduced
axes as the free dims. Linear layers, matmul, attention, rope and gathers have their own kernels.
"""

from __future__ import annotations

import math

import numpy as np

from isthmus.compiler.lower.npu.op_runner import HV, Ctx
from isthmus.errors import UnsupportedError

FREE_MAX = 2048
RED_MAX = 8192


def _coalesce(shape, strides_list):
    """Dims [size, stride per operand...], size-1 dims dropped, contiguous neighbours merged."""
    dims = [[n] + [st[i] for st in strides_list] for i, n in enumerate(shape) if n != 1]
    if not dims:
        return [[1] + [0] * len(strides_list)]
    out = [dims[0]]
    for d in dims[1:]:
        prev = out[-1]
        if all(prev[1 + j] == d[1 + j] * d[0] for j in range(len(strides_list))):
            out[-1] = [prev[0] * d[0]] + d[1:]
        else:
            out.append(d)
    return out


def bstrides(shape, out_shape) -> list[int]:
    """Strides of a row-major `shape` in the index space of `out_shape` it broadcasts to."""
    st, s = [0] * len(out_shape), 1
    for i in range(1, len(shape) + 1):
        n = shape[-i]
        st[-i] = 0 if n == 1 and out_shape[-i] != 1 else s
        s *= n
    return st


def _tiles(dims, P, free_max=FREE_MAX, max_free_dims=3):
    """Yield (offsets per operand, rows, pstrides, free [(size, strides...)]) covering `dims`."""
    nops = len(dims[0]) - 1
    if len(dims) == 1 and max_free_dims and dims[0][0] > P and dims[0][0] % P == 0:
        n, st = dims[0][0], dims[0][1:]         # one long run: spread it over the partitions
        dims = [[P] + [x * (n // P) for x in st], [n // P] + list(st)]
    free, prod, i = [], 1, len(dims) - 1
    while i >= 1 and len(free) < max_free_dims and prod * dims[i][0] <= free_max:
        free.insert(0, dims[i])
        prod *= dims[i][0]
        i -= 1
    chunk = None
    if max_free_dims and not free and not (len(dims) == 1 and dims[0][0] <= P):
        chunk = dims[-1]                       # the innermost dim alone is too long: chunk it
        i = len(dims) - 2
    pdim = dims[i] if i >= 0 else [1] + [0] * nops
    loops = dims[:max(i, 0)]
    for idx in np.ndindex(*[d[0] for d in loops]) if loops else [()]:
        base = [sum(k * d[1 + j] for k, d in zip(idx, loops)) for j in range(nops)]
        for p0 in range(0, pdim[0], P):
            pn = min(P, pdim[0] - p0)
            off = [b + p0 * pdim[1 + j] for j, b in enumerate(base)]
            pst = pdim[1:]
            if chunk is None:
                yield off, pn, pst, free
            else:
                for c0 in range(0, chunk[0], free_max):
                    cn = min(free_max, chunk[0] - c0)
                    yield [o + c0 * chunk[1 + j] for j, o in enumerate(off)], pn, pst, [[cn] + chunk[1:]]


def strided(ctx: Ctx, out: HV, operands: list[HV], op_strides: list[list[int]], compute, tile_dtypes=None,
            out_shape=None):
    """For each tile: DMA every operand into SBUF, `compute(dst_ap, [src_aps], rows)`, DMA out."""
    em = ctx.em
    P = em.cfg.partitions
    shape = out_shape or out.shape
    dims = _coalesce(shape, [out.strides] + op_strides)
    tile_dtypes = tile_dtypes or [o.dtype for o in operands]
    for off, pn, pst, free in _tiles(dims, P):
        fshape = tuple(f[0] for f in free) or (1,)
        srcs, tiles = [], []
        for j, (o, dt) in enumerate(zip(operands, tile_dtypes)):
            t = em.sbuf(fshape, dt, what="operand")
            tiles.append(t)
            fd = [(f[0], f[2 + j]) for f in free] or [(1, 1)]
            em.dma(t[0:pn], o.ap(off[1 + j], pn, pst[1 + j], fd))
            srcs.append(t[0:pn])
        dst = em.sbuf(fshape, out.dtype, what="result")
        compute(dst[0:pn], srcs, pn)
        fd = [(f[0], f[1]) for f in free] or [(1, 1)]
        em.dma(out.ap(off[0], pn, pst[0], fd), dst[0:pn])
        em.free(dst, *tiles)


# -- elementwise -----------------------------------------------------------------------------------------

ALU = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "max": "max", "min": "min"}
ACT_UNARY = {"exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "reciprocal": "reciprocal",
             "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu"}


def _binary(ctx: Ctx, node):
    a, b = node.inputs
    out = ctx.new(node.outputs[0])
    shp = out.shape
    ha, hb = ctx.hv(a), ctx.hv(b)
    op = ALU[node.op]
    strided(ctx, out, [ha, hb], [bstrides(ha.shape, shp), bstrides(hb.shape, shp)],
            lambda d, s, n: ctx.em.tt(d, s[0], s[1], op))


def _unary(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    em = ctx.em

    def compute(d, s, n):
        if node.op in ACT_UNARY:
            em.act(d, s[0], ACT_UNARY[node.op])
        elif node.op == "gelu":
            em.act(d, s[0], "gelu" if node.attrs["approximate"] == "tanh" else "gelu_erf")
        elif node.op == "neg":
            em.ts(d, s[0], "mul", -1.0)
        elif node.op == "abs":
            em.ts(d, s[0], "mul", -1.0)
            em.tt(d, d, s[0], "max")
        elif node.op == "pow":
            e = float(np.asarray(node.inputs[1].data).reshape(-1)[0])
            f = {0.5: "sqrt", 1.0: "identity", 2.0: "square", -0.5: "rsqrt", -1.0: "reciprocal"}[e]
            em.act(d, s[0], f)
        elif node.op == "cast":
            em.copy(d, s[0])
        else:
            raise UnsupportedError(node.op)
    strided(ctx, out, [x], [bstrides(x.shape, out.shape)], compute)


def _swiglu(ctx: Ctx, node):
    g, u = (ctx.hv(v) for v in node.inputs)
    out = ctx.new(node.outputs[0])
    em = ctx.em

    def compute(d, s, n):
        em.act(d, s[0], "silu")
        em.tt(d, d, s[1], "mul")
    strided(ctx, out, [g, u], [bstrides(g.shape, out.shape), bstrides(u.shape, out.shape)], compute)


# -- data movement ------------------------------------------------------------------------------------------

def _alias(ctx: Ctx, node):
    src = ctx.hv(node.inputs[0])
    ctx.store[node.outputs[0]] = HV(src.hbm, ctx.shape(node.outputs[0]), src.offset)


def _row_major(shape):
    out, s = [], 1
    for n in reversed(shape):
        out.append(s)
        s *= n
    return out[::-1]


class _View(HV):
    """An HV whose index space is `shape` with explicit strides (a region of a bigger tensor)."""

    def __init__(self, hv: HV, shape, strides=None):
        super().__init__(hv.hbm, tuple(shape), hv.offset)
        self._strides = strides if strides is not None else _row_major(shape)

    @property
    def strides(self):
        return self._strides


def _transpose(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    perm = node.attrs["perm"] or list(reversed(range(len(x.shape))))
    st = x.strides
    strided(ctx, out, [x], [[st[p] for p in perm]], lambda d, s, n: ctx.em.copy(d, s[0]))


def _expand(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    strided(ctx, out, [x], [bstrides(x.shape, out.shape)], lambda d, s, n: ctx.em.copy(d, s[0]))


def _slice(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    a = node.attrs
    starts, ends = a["starts"], a["ends"]
    axes = a["axes"] or list(range(len(starts)))
    steps = a["steps"] or [1] * len(starts)
    st = list(x.strides)
    off = 0
    for s0, e0, ax, step in zip(starts, ends, axes, steps):
        ax %= len(x.shape)
        if step < 0:
            raise UnsupportedError("slice with a negative step on the NPU")
        first = range(*slice(s0, e0, step).indices(x.shape[ax]))
        off += (first.start if len(first) else 0) * st[ax]
        st[ax] *= step
    strided(ctx, out, [HV(x.hbm, x.shape, x.offset + off)], [st], lambda d, s, n: ctx.em.copy(d, s[0]))


def _concat(ctx: Ctx, node):
    out = ctx.new(node.outputs[0])
    axis = node.attrs["axis"] % len(out.shape)
    pos = 0
    ost = out.strides
    for v in node.inputs:
        x = ctx.hv(v)
        if x.shape[axis] == 0:
            continue
        region = _View(HV(out.hbm, out.shape, out.offset + pos * ost[axis]), x.shape, ost)
        strided(ctx, region, [x], [x.strides], lambda d, s, n: ctx.em.copy(d, s[0]))
        pos += x.shape[axis]


def _split(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    axis = node.attrs["axis"] % len(x.shape)
    pos = 0
    for v in node.outputs:
        out = ctx.new(v)
        src = HV(x.hbm, x.shape, x.offset + pos * x.strides[axis])
        strided(ctx, out, [src], [x.strides], lambda d, s, n: ctx.em.copy(d, s[0]))
        pos += out.shape[axis]


def _trilu(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    em, P = ctx.em, ctx.em.cfg.partitions
    *lead, n, m = x.shape
    k, upper = node.attrs["k"], node.attrs["upper"]
    for b in range(math.prod(lead)):
        for r0 in range(0, n, P):
            pn = min(P, n - r0)
            t = em.sbuf((m,), out.dtype, what="trilu")
            em.dma(t[0:pn], x.ap(b * n * m + r0 * m, pn, m, [(m, 1)]))
            # keep upper: j - i - k >= 0; lower: i - j + k >= 0 (i = r0 + p)
            if upper:
                em.select(t[0:pn], t[0:pn], "ge", 0.0, base=-k - r0, pcoef=-1, c0=1)
            else:
                em.select(t[0:pn], t[0:pn], "ge", 0.0, base=k + r0, pcoef=1, c0=-1)
            em.dma(out.ap(b * n * m + r0 * m, pn, m, [(m, 1)]), t[0:pn])
            em.free(t)


# -- reductions -----------------------------------------------------------------------------------------------

def _reduce_loop(ctx: Ctx, x: HV, axes, out: HV | None, body, out_full: bool):
    """Tiles with the reduced `axes` flattened in the free dim (<= RED_MAX elements): calls
    `body(tile_ap [pn, red], pn, store)` where store(src_ap) writes the result tile: [pn, red] when
    `out_full` (same shape as x), else [pn, 1]."""
    em, P = ctx.em, ctx.em.cfg.partitions
    axes = sorted(a % len(x.shape) for a in axes)
    kept = [i for i in range(len(x.shape)) if i not in axes]
    xs = x.strides
    red = _coalesce([x.shape[a] for a in axes], [[xs[a] for a in axes]])
    nred = math.prod(x.shape[a] for a in axes)
    if len(red) > 3 or nred > RED_MAX:
        raise UnsupportedError(f"reduction over {nred} elements in {len(red)} runs")
    if out_full:
        ost = [xs[i] for i in kept]
    else:
        ost = _row_major([x.shape[i] for i in kept])
    kdims = _coalesce([x.shape[i] for i in kept], [[xs[i] for i in kept], ost])
    for off, pn, pst, free in _tiles(kdims, P, free_max=1, max_free_dims=0):
        t = em.sbuf((nred,), x.dtype if x.dtype != "i32" else "f32", what="reduce in")
        em.dma(t[0:pn, :], x.ap(off[0], pn, pst[0], [(d[0], d[1]) for d in red]))

        def store(src, off=off, pn=pn, pst=pst):
            if out_full:
                em.dma(out.ap(off[0], pn, pst[0], [(d[0], d[1]) for d in red]), src)
            else:
                em.dma(out.ap(off[1], pn, pst[1], [(1, 1)]), src)
        body(t, pn, nred, store)
        em.free(t)


def _reduce(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    em = ctx.em
    axes = node.attrs["axes"]
    axes = list(range(len(x.shape))) if axes is None else axes
    kind = {"reduce_sum": "sum", "reduce_mean": "sum", "reduce_max": "max"}[node.op]

    def body(t, pn, nred, store):
        r = em.sbuf((1,), "f32", what="reduced")
        em.reduce(r[0:pn, :], t[0:pn, :], kind)
        if node.op == "reduce_mean":
            em.ts(r[0:pn, :], r[0:pn, :], "mul", 1.0 / nred)
        store(r[0:pn, :])
        em.free(r)
    _reduce_loop(ctx, x, axes, out, body, False)


def _softmax(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    em = ctx.em

    def body(t, pn, nred, store):
        m = em.sbuf((1,), "f32", what="max")
        em.reduce(m[0:pn, :], t[0:pn, :], "max")
        em.ts(m[0:pn, :], m[0:pn, :], "mul", -1.0)
        e = em.sbuf((nred,), "f32", what="exp")
        s = em.sbuf((1,), "f32", what="sum")
        em.act(e[0:pn, :], t[0:pn, :], "exp", bias=m[0:pn, 0:1], accum=s[0:pn, 0:1])
        em.act(s[0:pn, :], s[0:pn, :], "reciprocal")
        y = em.sbuf((nred,), out.dtype, what="softmax")
        em.ts(y[0:pn, :], e[0:pn, :], "mul", s[0:pn, 0:1])
        store(y[0:pn, :])
        em.free(m, e, s, y)
    _reduce_loop(ctx, x, [node.attrs["axis"]], out, body, True)


def _norm(ctx: Ctx, node):
    x = ctx.hv(node.inputs[0])
    out = ctx.new(node.outputs[0])
    em, P = ctx.em, ctx.em.cfg.partitions
    C = x.shape[-1]
    w = ctx.constant(node.inputs[1]) if node.inputs[1].is_constant else ctx.hv(node.inputs[1])
    b = None
    if len(node.inputs) > 2:
        b = ctx.constant(node.inputs[2]) if node.inputs[2].is_constant else ctx.hv(node.inputs[2])
    wt = em.sbuf((C,), "f32", what="norm weight")
    em.dma(wt[:, :], w.ap(0, P, 0, [(C, 1)]))
    bt = None
    if b is not None:
        bt = em.sbuf((C,), "f32", what="norm bias")
        em.dma(bt[:, :], b.ap(0, P, 0, [(C, 1)]))
    eps = float(node.attrs["eps"])

    def body(t, pn, nred, store):
        src = t[0:pn, :]
        xc = None
        if node.op == "layernorm":
            mu = em.sbuf((1,), "f32", what="mean")
            em.reduce(mu[0:pn, :], src, "sum")
            em.ts(mu[0:pn, :], mu[0:pn, :], "mul", -1.0 / C)
            xc = em.sbuf((C,), "f32", what="centred")
            em.ts(xc[0:pn, :], src, "add", mu[0:pn, 0:1])
            src = xc[0:pn, :]
            em.free(mu)
        sq = em.sbuf((C,), "f32", what="squares")
        ss = em.sbuf((1,), "f32", what="sum of squares")
        em.act(sq[0:pn, :], src, "square", accum=ss[0:pn, 0:1])
        em.act(ss[0:pn, :], ss[0:pn, :], "rsqrt", scale=1.0 / C, bias=eps)
        y = em.sbuf((C,), out.dtype, what="normed")
        em.ts(sq[0:pn, :], src, "mul", ss[0:pn, 0:1])
        em.tt(y[0:pn, :] if bt is None else sq[0:pn, :], sq[0:pn, :], wt[0:pn, :], "mul")
        if bt is not None:
            em.tt(y[0:pn, :], sq[0:pn, :], bt[0:pn, :], "add")
        store(y[0:pn, :])
        em.free(sq, ss, y, xc)
    _reduce_loop(ctx, x, [len(x.shape) - 1], out, body, True)
    em.free(wt, bt)


# -- gathers -------------------------------------------------------------------------------------------------------

def _gather_rows(ctx: Ctx, table: HV, rows: int, inner: int, table_off: int, idx: HV, idx_off: int, n_idx: int,
                 out: HV, out_off: int, wrap: bool):
    """out rows [out_off/inner ...] = table rows idx[idx_off : idx_off + n_idx] (rows of `inner`)."""
    em, P = ctx.em, ctx.em.cfg.partitions
    for j0 in range(0, n_idx, P):
        pn = min(P, n_idx - j0)
        it = em.sbuf((1,), "i32", what="indices")
        em.dma(it[0:pn, :], idx.ap(idx_off + j0, pn, 1, [(1, 1)]))
        if wrap:       # negative indices count from the end: i + rows * min(max(-i, 0), 1)
            f = em.sbuf((2,), "f32", what="index fix")
            em.copy(f[0:pn, 0:1], it[0:pn, :])
            em.ts(f[0:pn, 1:2], f[0:pn, 0:1], "mul", -1.0)
            em.ts(f[0:pn, 1:2], f[0:pn, 1:2], "max", 0.0)
            em.ts(f[0:pn, 1:2], f[0:pn, 1:2], "min", 1.0)
            em.ts(f[0:pn, 1:2], f[0:pn, 1:2], "mul", float(rows))
            em.tt(f[0:pn, 0:1], f[0:pn, 0:1], f[0:pn, 1:2], "add")
            em.copy(it[0:pn, :], f[0:pn, 0:1])
            em.free(f)
        for c0 in range(0, inner, FREE_MAX * 4):
            cn = min(FREE_MAX * 4, inner - c0)
            t = em.sbuf((cn,), out.dtype, what="gathered")
            em.gather(t[0:pn, :], table.ap(table_off + c0, rows, inner, [(cn, 1)]), it[0:pn, :])
            em.dma(out.ap(out_off + j0 * inner + c0, pn, inner, [(cn, 1)]), t[0:pn, :])
            em.free(t)
        em.free(it)


def _embedding(ctx: Ctx, node):
    table, ids = node.inputs
    tb = ctx.constant(table) if table.is_constant else ctx.hv(table)
    out = ctx.new(node.outputs[0])
    V, D = tb.shape
    _gather_rows(ctx, tb, V, D, 0, ctx.hv(ids), 0, math.prod(ctx.shape(ids)), out, 0, False)


def _gather(ctx: Ctx, node):
    data, idx = node.inputs
    x = ctx.hv(data)
    iv = ctx.hv(idx)
    out = ctx.new(node.outputs[0])
    axis = node.attrs["axis"] % len(x.shape)
    outer = math.prod(x.shape[:axis])
    n = x.shape[axis]
    inner = math.prod(x.shape[axis + 1:])
    ni = math.prod(iv.shape)
    for o in range(outer):
        _gather_rows(ctx, x, n, inner, o * n * inner, iv, 0, ni, out, o * ni * inner, True)


KERNELS = {}
for _op in ALU:
    KERNELS[_op] = _binary
for _op in list(ACT_UNARY) + ["gelu", "neg", "abs", "pow", "cast"]:
    KERNELS[_op] = _unary
KERNELS.update({
    "swiglu": _swiglu, "reshape": _alias, "squeeze": _alias, "unsqueeze": _alias, "transpose": _transpose,
    "expand": _expand, "slice": _slice, "concat": _concat, "split": _split, "trilu": _trilu,
    "reduce_sum": _reduce, "reduce_mean": _reduce, "reduce_max": _reduce, "softmax": _softmax,
    "rmsnorm": _norm, "layernorm": _norm, "embedding": _embedding, "gather": _gather,
})


def _register_nn():
    from isthmus.compiler.lower.npu import op_kernels_tensor
    KERNELS.update(op_kernels_tensor.KERNELS)


_register_nn()

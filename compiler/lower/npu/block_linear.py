"""Linear layers whose weights carry a scale per block of 32 *inputs* (int8 and q4: quant_weights.py).

W^T's K tile t holds inputs t*P + p at partition p, so its block b = t*P/32 + j spans partitions
[32j, 32j + 32): a scale per (block, output) varies along the partitions of the weight tile and no
VECTOR/ACT lane can apply it there. The scales go on the products instead:

    y[o] = sum_b d[o, b] * P[o, b] + m[o, b] * xs[b],   P[o, b] = sum_{i in b} q[i, o] x[i],  xs[b] = sum_{i in b} x[i]

- `Xm` is x with its columns repeated once per block of the K tile, each copy zero outside that
  block's 32 partitions ([P, kt, (j, columns)]); one matmul of the raw q tile (stationary, bf16,
  exact) with Xm's tile t writes P[o, t*P/32 + j] for every j into its own PSUM column. A decode
  step's moving operand grows from 1 (2 at bf16x3: x_hi, x_lo) to 4 (8) columns, under the
  `tensor_min_moving` the array streams anyway: the matmuls cost what they did.
- `dequant` (VECTOR or ACT) multiplies the PSUM columns by d (outputs on partitions, blocks along the
  free dim: one scale per element, group = the columns of one block); with mins (q4, int8 from Q4
  blocks) it adds m[o, b] * xs[b], with xs broadcast to every partition by a ones matmul on Xm (once
  per linear layer): those terms need no products, so another `dequant` makes them in SBUF while the
  matmuls run (where SBUF has room, EARLY_MINS_SHARE; else it writes them next to the products in
  PSUM after the matmuls); one VECTOR `tensor_reduce` sums the blocks into y [o, columns], which the
  layer's epilogue then reads as a plain linear's PSUM result.
- The matmuls of a piece run by K tile, then weight (gate, up), then output chunk: the order in which
  the weight stream converts the piece, so the first matmul waits for one unit of it only.

Everything after the matmul is fp32, so unlike a weight dequantized to bf16 nothing rounds the
weight. The cost: the moving operand is P/32 times wider, so prefill (many rows) takes up to 4x the
tensor work of a bf16 weight on `core` (1x on `edge`, whose 32 partitions are one block).
"""

from __future__ import annotations

import contextlib

from isthmus.compiler.lower.npu.emitter import Emitter
from isthmus.compiler.lower.npu.quant_weights import BLOCK
from isthmus.compiler.lower.npu.weights import PackedWeight, WeightStream

EARLY_MINS_SHARE = 64    # the min terms made early may take up to this share of SBUF (1/64: 3 KB on core)


def _ones(em: Emitter, dtype: str):
    cache = em.__dict__.setdefault("_block_ones", {})
    t = cache.get(dtype)
    if t is None:
        P = em.cfg.partitions
        t = cache[dtype] = em.sbuf((P,), dtype, what="ones (block sums)")
        em.memset(t.ap(), 1.0)
    return t


@contextlib.contextmanager
def shared_input(em: Emitter, x):
    """Blocked linears of the same input `x` inside this block (q and k of a layer) build x per block
    (Xm) and its block sums once, for the first of them: the later ones start their matmuls at once."""
    shared = em.__dict__.setdefault("_shared_xm", {})
    cache = shared[id(x)] = {}
    try:
        yield
    finally:
        del shared[id(x)]
        for tiles in cache.values():
            em.free(*tiles)


def linear_blocked(em: Emitter, x, pairs: list[PackedWeight], stream: WeightStream, out, epilogue_fn) -> None:
    """out^T = epilogue(W x^T) for blocked weights `pairs` (one, or gate and up); `epilogue_fn(gc0, gc1,
    r0, r1, srcs)` evacuates output chunks gc0:gc1, rows r0:r1 from the fp32 results `srcs`."""
    cfg = em.cfg
    P = cfg.partitions
    bpt = P // BLOCK
    w0 = pairs[0]
    kt = w0.kt
    if any(w.kt != kt or w.lo is not None for w in pairs):
        raise ValueError("blocked weights of one linear must share their input size (and have no lo part)")
    R = x.rows
    halves = 2 if x.split else 1                 # bf16x3: x_hi and x_lo, each times the exact q
    bank = cfg.psum_bank_bytes // 4
    minned = any(w.minned for w in pairs)
    per_row = kt * bpt * halves * (2 if minned else 1)
    rb_max = max(1, min(R, bank // per_row, cfg.moving_max // (bpt * halves)))
    ones = _ones(em, x.dtype) if minned else None
    nbp = kt * bpt

    def masked(r0: int, r1: int):
        """Xm (x per block) for rows r0:r1, and for q4 the block sums xs on every partition."""
        rn = r1 - r0
        wc = halves * rn                         # columns per block
        # Xm[p, t, j*wc + h*rn + r] = x[p, t, h*R + r0 + r] if p // 32 == j else 0
        xm = em.sbuf((kt, bpt * wc), x.dtype, what="x per block")
        if bpt > 1 or w0.kp < P:
            em.memset(xm[:, :, :], 0.0)
        kp = w0.kp
        for j in range(bpt):                     # (the last K tile only up to its kp rows: Xm's other rows
            lo, hi = j * BLOCK, (j + 1) * BLOCK  # stay zero, so one matmul can sum every tile's blocks)
            spans = [(0, kt, hi)] if kp >= hi else [(0, kt - 1, hi)] * (kt > 1) + [(kt - 1, kt, kp)] * (kp > lo)
            for t0, t1, top in spans:
                for h in range(halves):
                    em.copy(xm[lo:top, t0:t1, j * wc + h * rn:j * wc + (h + 1) * rn],
                            x.tile[lo:top, t0:t1, h * R + r0:h * R + r1])
        xsb = None
        if minned:                               # xs[b] on every partition: [P, (t, j, column)], one matmul
            ps = em.psum((nbp * wc,))
            em.matmul(ps[:, :], ones[0:P, 0:P], xm[:, :, :])
            xsb = em.sbuf((nbp * wc,), "f32", what="block sums of x")
            em.copy(xsb[:, :], ps[:, :])
            em.free(ps)
        return xm, xsb

    blocks = [(r0, min(R, r0 + rb_max)) for r0 in range(0, R, rb_max)]
    shared = em.__dict__.get("_shared_xm", {}).get(id(x)) if len(blocks) == 1 else None
    key = (kt, w0.kp, minned)
    once = shared.get(key) if shared is not None else None
    if once is None and len(blocks) == 1:
        once = masked(*blocks[0])
        if shared is not None:
            shared[key] = once
    for pcs in zip(*(w.pieces for w in pairs)):
        for w, pc in zip(pairs, pcs):
            stream.acquire(w, pc, convert=False)
        pc0 = pcs[0]
        for r0, r1 in blocks:
            rn = r1 - r0
            wc = halves * rn
            cc = nbp * wc                        # PSUM columns of one output chunk's products
            xm, xsb = once or masked(r0, r1)
            ch_lo, ch_hi = pc0.o0 // P, -(-pc0.o1 // P)

            def plan(width):
                """Jobs (an output group of one PSUM bank, a weight) in batches whose matmuls interleave
                by K tile, then weight, then output chunk (the order the weight stream unpacks in, so the
                first waits for one unit only): every job at once where PSUM has room, else one by one."""
                g = max(1, bank // width)
                jobs = [((gc0, min(ch_hi, gc0 + g)), i) for gc0 in range(ch_lo, ch_hi, g) for i in range(len(pairs))]
                if len(pairs) * (ch_hi - ch_lo) * width * 4 <= cfg.psum_bytes_per_partition // 2:
                    return [jobs]
                return [[j] for j in jobs]

            # where SBUF has room the min terms m[o, b] xs[b] (they need no products) are made in SBUF
            # while the matmuls run, and added with the scaling: after the matmuls, one `dequant` and a
            # sum over the blocks; else they follow the products in PSUM (a second `dequant`, twice the sum)
            batches = plan(cc)
            early = minned and sum(pairs[i].minned * (gr[1] - gr[0]) for gr, i in max(batches, key=len)) * cc * 4 \
                <= cfg.sbuf_bytes_per_partition // EARLY_MINS_SHARE
            width = cc * (2 if minned and not early else 1)
            if not early:
                batches = plan(width)
            reds: dict = {}                      # group -> the block sums of each weight, for the epilogue
            for batch in batches:
                pts = {j: em.psum((j[0][1] - j[0][0], width)) for j in batch}
                zs = {(gr, i): _mins(em, pcs[i], gr, P, cc, wc, xsb) for gr, i in batch if early and pairs[i].minned}
                for t in range(kt):
                    kp = P if t < kt - 1 else w0.kp
                    for (gc0, gc1), i in sorted(batch, key=lambda j: j[1]):
                        w, pc, pt = pairs[i], pcs[i], pts[(gc0, gc1), i]
                        for c in range(gc0, gc1):
                            m0, m1 = c * P, min(w.n, (c + 1) * P)
                            stream.need(w, pc, t, m0 - pc.o0, m1 - pc.o0)
                            em.matmul(pt[0:m1 - m0, c - gc0, t * bpt * wc:(t + 1) * bpt * wc],
                                      w.stationary(pc, t, m0, m1), xm[0:kp, t, :])
                for (gc0, gc1), i in batch:
                    w, pc, pt = pairs[i], pcs[i], pts[(gc0, gc1), i]
                    ng = gc1 - gc0
                    lc0 = gc0 - pc.o0 // P                       # chunks within the piece's tables
                    z = zs.get(((gc0, gc1), i))
                    if z is not None:                            # d[o, b] P[o, b] + m[o, b] xs[b]
                        d = pc.dtile.raw(0, P, lc0 * nbp, [(ng, nbp), (nbp, 1), (wc, 0)] if wc > 1 else
                                         [(ng, nbp), (nbp, 1)])
                        em.dequant(pt[:, :, :], pt[:, :, :], d, z[:, :, :], group=1, packed=0)
                        em.free(z)
                    else:
                        _scale(em, pt[:, :, 0:cc], pc.dtile[:, lc0:lc0 + ng, :], wc)
                        if w.minned:
                            _scale(em, pt[:, :, cc:2 * cc], pc.mtile[:, lc0:lc0 + ng, :], wc,
                                   src=xsb.raw(0, P, 0, [(ng, 0), (cc, 1)]))
                    nsum = width // wc if w.minned else nbp            # products (and mins) to sum
                    red = em.sbuf((ng, wc), "f32", what="block sums")
                    em.reduce(red[:, :, :], pt.raw(0, P, 0, [(ng, width), (wc, 1), (nsum, wc)]), "sum")
                    em.free(pt)
                    if halves == 2:                              # x_hi's products + x_lo's
                        em.tt(red[:, :, 0:rn], red[:, :, 0:rn], red[:, :, rn:2 * rn], "add")
                    reds.setdefault((gc0, gc1), {})[i] = red
                    if len(reds[gc0, gc1]) == len(pairs):
                        done = reds.pop((gc0, gc1))
                        epilogue_fn(gc0, gc1, r0, r1, [done[k][:, :, 0:rn] for k in range(len(pairs))])
                        em.free(*done.values())
            if once is None:
                em.free(xm, xsb)
        for w, pc in zip(pairs, pcs):
            stream.release(w, pc)
    if once is not None and shared is None:
        em.free(*once)


def _mins(em: Emitter, pc, gr, P: int, cc: int, wc: int, xsb):
    """[P, chunks, cc] f32: m[o, b] * xs[b] for output chunks gr of piece `pc` (cc = blocks x columns)."""
    ng = gr[1] - gr[0]
    lc0 = gr[0] - pc.o0 // P
    z = em.sbuf((ng, cc), "f32", what="block mins")
    _scale(em, z[:, :, :], pc.mtile[:, lc0:lc0 + ng, :], wc, src=xsb.raw(0, P, 0, [(ng, 0), (cc, 1)]))
    return z


def _scale(em: Emitter, dst, table, group: int, src=None) -> None:
    """dst = (src or dst) * table, one table value per `group` consecutive elements: a `dequant` whose
    offset is a zero read at stride 0."""
    zero = _zero(em)
    n = dst.free_elems // group
    em.dequant(dst, dst if src is None else src, table, zero.raw(0, em.cfg.partitions, 0, [(n, 0)]),
               group=group, packed=0)


def _zero(em: Emitter):
    cache = em.__dict__.setdefault("_block_ones", {})
    t = cache.get("zero")
    if t is None:
        t = cache["zero"] = em.sbuf((1,), "f32", what="zero")
        em.memset(t.ap(), 0.0)
    return t

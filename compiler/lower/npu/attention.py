"""Attention on the NPU: rotary embedding by a rotation matmul, and a flash-attention-style loop
over key blocks with an online softmax, reading a KV window resident in SBUF.

Shapes (feature-major, see resident_kernels): q^T and k^T hold one head per *slot*, a partition range
[s, s+hd) of a chunk (s a multiple of the PE partition alignment), so a head's q^T and its kv
head's k^T start at the same partition, as the PE array requires of its two operands.

One *unit* of work is a set of query rows of one kv head: several query heads of the group
(decode: one row each, M = heads) or a block of up to 128 queries of one head (prefill). Per key
block of up to one PSUM bank (512 keys):

    S = q_unit^T . K_block                 TENSOR    [M, kb] in PSUM
    L = S + bias_row                       VECTOR    (the window's validity mask, pre-divided by scale)
    L = select(causal)                     VECTOR    (new keys only: key j visible to query i iff j <= i)
    m = max(L); p = exp(scale*L - scale*m)  VECTOR, ACT (with the row sums accumulated on the fly)
    p^T per 128 keys                        VECTOR    transpose
    O += p . V                              TENSOR    [M, hd] accumulated in PSUM over the block
    (later blocks rescale O and the sums by exp(scale*(m_old - m_new)): the online softmax)

then O / sum is transposed back into the head's slot of attn^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isthmus.compiler.lower.npu.emitter import Emitter, Tile
from isthmus.compiler.lower.npu.resident_kernels import Act, bcast

NEG = -30000.0          # a masked logit: exp(scale * (NEG - max)) is exactly 0 in fp32


def head_perm(hd: int, parts: int, layout: str) -> np.ndarray:
    """The order in which a head's dims sit on the partitions. A head no wider than the partitions keeps
    its own order. A wider one spans hd/parts whole chunks (*sub-heads*), and in the "half" layout its
    rotation pairs (i, i + hd/2) would land on different chunks; so sub-head j takes dims
    [j*parts/2, (j+1)*parts/2) and their partners, and is itself a "half"-layout head of width `parts`
    (scores are sums over dims, indifferent to their order as long as q and k share it)."""
    if hd <= parts or layout == "interleaved":
        return np.arange(hd)
    h2, p2 = hd // 2, parts // 2
    return np.concatenate([np.r_[j * p2:(j + 1) * p2, h2 + j * p2:h2 + (j + 1) * p2] for j in range(hd // parts)])


def rotation_matrix(parts: int, stride: int, hd: int, layout: str) -> np.ndarray:
    """The stationary operand R^T [K=parts, M=parts] with (R x)[f] = -x[pair] or +x[pair] per slot, so
    rope(x) = x * cos + (R x) * sin (cos/sin repeated per pair). A head wider than the partitions is
    rotated per sub-head (`head_perm`): the same matrix as a head of width `parts`."""
    hd = min(hd, parts)
    r = np.zeros((parts, parts), np.float32)          # r[out, in]
    for s in range(0, parts - hd + 1, stride):
        for i in range(hd // 2):
            if layout == "interleaved":
                a, b = s + 2 * i, s + 2 * i + 1
            else:
                a, b = s + i, s + i + hd // 2
            r[a, b] = -1.0
            r[b, a] = 1.0
    return np.ascontiguousarray(r.T)


def rope_table(max_pos: int, parts: int, stride: int, hd: int, theta: float, layout: str) -> np.ndarray:
    """[max_pos, 2, phases, parts] f32: cos and sin of each partition's pair angle, per slot, as the
    reference computes them (rope_angles in compiler/ops/attention.py). A head wider than the
    partitions has one phase per sub-head (its chunk j of every head: `head_perm`); others one."""
    from isthmus.compiler.ops.attention import rope_angles
    cos, sin = rope_angles(np.arange(max_pos), hd, theta)             # [max_pos, hd/2]
    per = head_perm(hd, parts, layout)
    pair = per // 2 if layout == "interleaved" else per % (hd // 2)
    if hd > parts:
        return np.stack([cos[:, pair], sin[:, pair]], axis=1).reshape(max_pos, 2, hd // parts, parts)
    t = np.zeros((max_pos, 2, 1, parts), np.float32)
    for s in range(0, parts - hd + 1, stride):
        t[:, 0, 0, s:s + hd] = cos[:, pair]
        t[:, 1, 0, s:s + hd] = sin[:, pair]
    return t


def rope(em: Emitter, src: Act, dst: Tile, rot: Tile, cos: Tile, sin: Tile) -> None:
    """dst[:, c, :] = src * cos + (R src) * sin for every chunk; cos/sin are [P, phases, rows] f32, the
    chunks in `phases` equal runs (sub-head j of every head, for heads wider than the partitions)."""
    R = src.rows
    phases = cos.shape[0]
    per = src.chunks // phases
    g = max(1, (em.cfg.psum_bank_bytes // 4) // R)
    for ph in range(phases):
        cph = Tile(cos.space, cos.dtype, cos.start, cos.parts, cos.offset + 4 * ph * cos.shape[-1], cos.shape[-1:])
        sph = Tile(sin.space, sin.dtype, sin.start, sin.parts, sin.offset + 4 * ph * sin.shape[-1], sin.shape[-1:])
        for c0 in range(ph * per, (ph + 1) * per, g):
            c1 = min((ph + 1) * per, c0 + g)
            ps = em.psum((c1 - c0, R))
            for c in range(c0, c1):
                kp = src.parts(c)
                em.matmul(ps[0:kp, c - c0, :], rot[0:kp, 0:kp], src.tile[0:kp, c, :])
            t1 = em.sbuf((c1 - c0, R), "f32", what="rope")
            t2 = em.sbuf((c1 - c0, R), "f32", what="rope")
            em.tt(t1[:, :, :], src.block(c0, c1), bcast(cph, c0, c1, 0, R, "chunks"), "mul")
            em.tt(t2[:, :, :], ps[:, :, :], bcast(sph, c0, c1, 0, R, "chunks"), "mul")
            em.tt(dst[:, c0:c1, 0:R], t1[:, :, :], t2[:, :, :], "add")
            em.free(t1, t2, ps)


def rope_pair(em: Emitter, qk: Tile, rows: int, qdst: Tile, kdst: Tile, rot: Tile, cos: Tile, sin: Tile,
              qouts: dict | None = None, fma: bool = True) -> None:
    """rope of one row's q and k held side by side ([P, chunks, 2]: q in column 0, k in 1, the same rows
    in every chunk, `rows` in all): one rotary matmul a chunk turns both (a decode matmul costs the same for 1 column as
    for 2), and the products with cos and sin take both columns at once; q's result to qdst[:, c, 0],
    k's to kdst[:, c, 0]; `qouts` {chunk: [(p0, p1, dst)]}: that chunk's q rows p0:p1 to `dst` instead (the
    columns of a merged decode unit's q tile: chunk_program._merge then copies nothing). `fma`: each
    result as one multiply-add on VECTOR or ACT, whichever finishes it first (SmolLM2 chip step, bf16:
    207,831 -> 206,925 cycles); off, products and adds on VECTOR (quantized weights, whose conversion
    keeps ACT busy: with the multiply-adds int8 went 271,927 -> 283,976, VECTOR-only 272,105)."""
    nch = qk.shape[0]
    g = max(1, (em.cfg.psum_bank_bytes // 4) // 2)
    P = qk.parts
    for c0 in range(0, nch, g):
        c1 = min(nch, c0 + g)
        ps = em.psum((c1 - c0, 2))
        for c in range(c0, c1):
            kp = min(P, rows - c * P)              # (padding partitions hold garbage: contract over the rows)
            em.matmul(ps[0:kp, c - c0, :], rot[0:kp, 0:kp], qk[0:kp, c, :])
        t1 = em.sbuf((c1 - c0, 2), "f32", what="rope")
        em.tt(t1[:, :, :], qk[:, c0:c1, :], cos.raw(0, cos.parts, 0, [(c1 - c0, 0), (2, 0)]), "mul")
        t2 = None
        if not fma:
            t2 = em.sbuf((c1 - c0, 2), "f32", what="rope")
            em.tt(t2[:, :, :], ps[:, :, :], sin.raw(0, sin.parts, 0, [(c1 - c0, 0), (2, 0)]), "mul")
        for c in range(c0, c1):
            j = c - c0
            outs = [(0, P, kdst[:, c:c + 1, 0:1], 1)]
            outs += [(p0, p1, dst, 0) for p0, p1, dst in (qouts or {}).get(c, [(0, P, qdst[:, c:c + 1, 0:1])])]
            for p0, p1, dst, col in outs:
                if fma:         # (R x) * sin + x * cos in one multiply-add (`dequant`: src * scale + zero,
                    em.dequant(dst, ps[p0:p1, j:j + 1, col:col + 1],   # group 1) on VECTOR or ACT
                               sin.raw(p0, p1 - p0, 0, [(1, 0), (1, 0)]), t1[p0:p1, j:j + 1, col:col + 1],
                               group=1, packed=0)
                else:
                    em.tt(dst, t1[p0:p1, j:j + 1, col:col + 1], t2[p0:p1, j:j + 1, col:col + 1], "add")
        em.free(t1, ps)
        if t2 is not None:
            em.free(t2)


@dataclass
class Unit:
    """Query rows of one kv head. `q`: the stationary [kp, M] APs, one per partition tile of the head
    (kp = hd, or the partitions for a head wider than them: its sub-heads' scores accumulate in PSUM,
    as a matmul over K tiles does); `kchunks`: the K window chunk each one meets, at partitions
    [start, start + kp); `out`: the [kp, M] APs of attn^T to write, one per tile of hd (or None:
    `attend` returns O [M, hd] in SBUF)."""

    q: list
    out: list | None
    kchunks: list
    start: int
    group: int
    m: int
    query0: int          # the first query's index among this step's new tokens
    per_query: bool      # rows are queries (pcoef 1 in the causal mask) rather than heads
    row0: int = 0        # first row in a batch of units (a multiple of the PE partition alignment)
    kparts: int | None = None   # partitions a score matmul contracts over (default: min(hd, partitions))
    row_out: bool = False       # `out` holds one [hd, 1] AP per row (head) instead of one per tile of hd
    chunks: tuple[int, int] = (0, 0)    # (decode) the q chunks [ca, cb) its heads sit in


def o_transposed_pays(cfg, units, hd: int, C: int) -> bool:
    """Whether `attend(..., transposed=True)` shortens the chain after exp by the cost formulas: 1/sum, p *
    1/sum and a copy against O * 1/sum and a transpose an output (SmolLM2 on the chip: core 0's two heads
    of 64, not the one-head cores)."""
    vec = lambda e: -(-e // cfg.vector_elems_per_cycle) + cfg.vector_fixed_cycles
    old = vec(hd) + sum(vec(max(1 if u.row_out else u.m, hd)) for u in units for _ in u.out)
    return -(-1 // cfg.act_elems_per_cycle) + cfg.act_fixed_cycles + vec(C) + vec(1) < old


def attend(em: Emitter, units, Kw: Tile, Vw: Tile, bias: Tile | None, hd: int, C: int, new: int, scale: float,
           mm_dtype: str, offset: int | None = None, dead_below: float | None = None, transposed: bool = False):
    """Units (one, or several decode units batched: each at its own `row0`, a multiple of the PE
    alignment) over C keys; see the module docstring. The softmax work runs once over all the rows;
    only the two matmuls are per unit. Causality: with `offset` None (the decoder's window
    [new keys 0:new | older keys]), query i sees new key j <= i and every older key; with an `offset`,
    query i sees key j <= i + offset (the reference's rule, offset = keys - queries); `new` = 0 and
    `offset` None: no causal mask. `dead_below`: a row whose largest (bias-added) score is below it
    gives zeros, as the reference's softmax does for a row of -inf (see op_kernels_tensor._mask).
    `transposed` (the chip's decode steps; one key block, hd <= partitions, `out` given): p is scaled by
    1/sum before its transpose and the p.V matmul takes V as the stationary side, so it writes O^T, the
    layout `out` wants, and copies replace the output transposes, where that is the shorter chain by the
    cost formulas (SmolLM2 chip step: core 0's two heads, ~90 cycles a layer)."""
    units = [units] if isinstance(units, Unit) else list(units)
    P = em.cfg.partitions
    kp = min(hd, P)                                      # contraction partitions of one tile of a head
    kb_max = em.cfg.moving_max
    M = max(u.row0 + u.m for u in units)
    u0 = units[0]
    transposed = transposed and C <= kb_max and hd <= P and dead_below is None and u0.out is not None \
        and o_transposed_pays(em.cfg, units, hd, C)
    state = None          # (max, sum, O) after the previous key block
    for k0 in range(0, C, kb_max):
        k1 = min(C, k0 + kb_max)
        kb = k1 - k0
        S = em.psum((kb,), parts=M)
        for u in units:
            kq = u.kparts or kp
            for t, (q, kc) in enumerate(zip(u.q, u.kchunks)):
                em.matmul(S[u.row0:u.row0 + u.m, :], q, Kw[u.start:u.start + kq, kc, k0:k1], acc=t > 0)
        L = em.sbuf((kb,), "f32", parts=M, what="scores")
        if bias is not None:
            em.tt(L[0:M, :], S[0:M, :], bias[0:M, k0:k1], "add")
        else:
            em.copy(L[0:M, :], S[0:M, :])
        em.free(S)
        if offset is None and k0 < new and new > 1:          # causal among this step's tokens
            n1 = min(k1, new)
            em.select(L[0:M, 0:n1 - k0], L[0:M, 0:n1 - k0], "ge", NEG, base=u0.query0 - k0,
                      pcoef=1 if u0.per_query else 0, c0=-1)
        elif offset is not None and k1 - 1 > u0.query0 + offset:   # some key of the block is in the future
            em.select(L[0:M, :], L[0:M, :], "ge", NEG, base=u0.query0 + offset - k0,
                      pcoef=1 if u0.per_query else 0, c0=-1)
        mx = em.sbuf((1,), "f32", parts=M, what="max")
        em.reduce(mx[0:M, :], L[0:M, :], "max")
        if state is not None:
            em.tt(mx[0:M, :], mx[0:M, :], state[0][0:M, :], "max")
        negm = em.sbuf((1,), "f32", parts=M, what="-max")
        em.ts(negm[0:M, :], mx[0:M, :], "mul", -scale)
        p = em.sbuf((kb,), mm_dtype, parts=M, what="probabilities")
        lsum = em.sbuf((1,), "f32", parts=M, what="sum")
        em.act(p[0:M, :], L[0:M, :], "exp", scale=scale, bias=negm[0:M, 0:1], accum=lsum[0:M, 0:1])
        em.free(L)
        if transposed:
            rl = em.sbuf((1,), "f32", parts=M, what="1/sum")
            em.act(rl[0:M, :], lsum[0:M, :], "reciprocal")
            em.ts(p[0:M, :], p[0:M, :], "mul", rl[0:M, 0:1])
            em.free(rl)
        nkc = -(-kb // P)
        pT = em.sbuf((nkc, M), mm_dtype, what="p^T")
        for j in range(nkc):
            a, z = j * P, min(kb, (j + 1) * P)
            em.transpose(pT[0:z - a, j, :], p[0:M, a:z])
        em.free(p)
        if transposed:
            OT = em.psum((M,), parts=hd)
            for u in units:
                for j in range(nkc):
                    a, z = k0 + j * P, min(k1, k0 + (j + 1) * P)
                    em.matmul(OT[0:hd, u.row0:u.row0 + u.m], Vw[0:z - a, a // P, u.group * hd:(u.group + 1) * hd],
                              pT[0:z - a, j, u.row0:u.row0 + u.m], acc=j > 0)
            em.free(pT, negm, mx, lsum)
            for u in units:
                for t, out in enumerate(u.out):
                    em.copy(out, OT[0:hd, u.row0 + t:u.row0 + t + 1] if u.row_out else OT[0:hd, u.row0:u.row0 + u.m])
            em.free(OT)
            return None
        O = em.psum((hd,), parts=M)
        for u in units:
            for j in range(nkc):
                a, z = k0 + j * P, min(k1, k0 + (j + 1) * P)
                em.matmul(O[u.row0:u.row0 + u.m, :], pT[0:z - a, j, u.row0:u.row0 + u.m],
                          Vw[0:z - a, a // P, u.group * hd:(u.group + 1) * hd], acc=j > 0)
        em.free(pT)
        if state is None:
            em.free(negm)
            state = (mx, lsum, O)
            continue
        # the online softmax: alpha = exp(scale*(m_old - m_new)); sum = sum*alpha + s_b; O = O*alpha + O_b
        m_old, l_old, O_old = state
        alpha = em.sbuf((1,), "f32", parts=M, what="alpha")
        em.act(alpha[0:M, :], m_old[0:M, :], "exp", scale=scale, bias=negm[0:M, 0:1])
        em.ts(l_old[0:M, :], l_old[0:M, :], "mul", alpha[0:M, 0:1])
        em.tt(lsum[0:M, :], lsum[0:M, :], l_old[0:M, :], "add")
        acc = em.sbuf((hd,), "f32", parts=M, what="O")
        em.ts(acc[0:M, :], O_old[0:M, :], "mul", alpha[0:M, 0:1])
        em.tt(acc[0:M, :], acc[0:M, :], O[0:M, :], "add")
        em.free(O, alpha, m_old, l_old, negm, O_old)
        state = (mx, lsum, acc)
    mx, lsum, O = state
    rl = em.sbuf((1,), "f32", parts=M, what="1/sum")
    em.act(rl[0:M, :], lsum[0:M, :], "reciprocal")
    if dead_below is not None:      # live = clamp(max - dead_below, 0, 1)
        live = em.sbuf((1,), "f32", parts=M, what="live row")
        em.ts(live[0:M, :], mx[0:M, :], "sub", dead_below)
        em.ts(live[0:M, :], live[0:M, :], "max", 0.0)
        em.ts(live[0:M, :], live[0:M, :], "min", 1.0)
        em.tt(rl[0:M, :], rl[0:M, :], live[0:M, :], "mul")
        em.free(live)
    Of = em.sbuf((hd,), "f32", parts=M, what="O/sum")
    em.ts(Of[0:M, :], O[0:M, :], "mul", rl[0:M, 0:1])
    em.free(rl, O, mx, lsum)
    if u0.out is None:
        return Of
    for u in units:
        for t, out in enumerate(u.out):
            if u.row_out:
                em.transpose(out, Of[u.row0 + t:u.row0 + t + 1, 0:hd])
            else:
                em.transpose(out, Of[u.row0:u.row0 + u.m, t * kp:(t + 1) * kp])
    em.free(Of)

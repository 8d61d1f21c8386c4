"""Scaled dot-product attention: causal, grouped-query, over a KV cache, in one kernel.

q [batch, heads, seq, hd]; k, v [batch, kv_heads, capacity, hd] of which rows 0 .. past + seq
are valid (the cache, this step's keys included); query i sits at position past + i and, when
causal, sees keys 0 .. past + i (with a sliding `window` w > 0, keys past + i - w + 1 .. past + i).
Scores are q.k * scale, squashed to softcap * tanh(s / softcap) when `softcap` > 0 (Gemma 2). The
output is written as [batch, seq, heads * hd], i.e. with the transpose + reshape that always follows
attention in a decoder folded in.

Decode: one kernel over (batch, head, query) work items, each computing its scores, softmax and
weighted sum of values in a row of `scratch` (no allocation). A prompt part: sixteen query rows
in the vector lanes (attention_tiles.py); BLAS for head dimensions the tiles cannot take
(`attention_kv` holds the dispatch rule, `row_kernel`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from isthmus.kernels.numba import JIT, PJIT
from isthmus.kernels.numba.attention_tiles import LANES, TILES_MIN_SEQ, attention_tiles
from isthmus.kernels.numba.kv_rows import batch_addresses, cache_at
from isthmus.kernels.numba.simd import exp_f32
from isthmus.kernels.numba.softmax import softmax_row
from isthmus.kernels.numba.threads import pool_size, serial_blas


@njit(inline="always", **JIT)
def _keys(past, i, seq, causal, window):
    """The keys query i sees: lo .. n - 1."""
    n = past + i + 1 if causal else past + seq
    lo = max(0, n - window) if window > 0 else 0
    return lo, n


@njit(inline="always", **JIT)
def _score(s, scale, softcap):
    s = s * scale
    if softcap > 0:
        s = np.float32(np.tanh(s / softcap)) * softcap
    return s


TILE = 64        # keys per tile: a tile of K (or V) rows stays in L1 while each head of the group reads it


@njit(inline="always", **JIT)
def _attend_one(q, k, v, past, causal, scale, out, scratch, row0, job, softcap, window):
    """Query i of the `group` query heads that share KV head kh (job = kh * seq + i) of one
    sequence: q [heads, seq, hd], k, v [kv_heads, capacity, hd], out [seq, heads * hd]. Keys and
    values are read in tiles of TILE rows, each tile once from memory for the whole group (then
    from L1 for each head, whose dot products and sums then run along hd without a gather). Head
    h's scores and weights are in scratch row row0 + h * seq + i."""
    hq, seq, hd = q.shape
    group = hq // k.shape[0]
    kh, i = job // seq, job % seq
    h0 = kh * group
    r0 = row0 + h0 * seq + i
    lo, n = _keys(past, i, seq, causal, window)
    for t0 in range(lo, n, TILE):
        t1 = min(n, t0 + TILE)
        for g in range(group):
            qg = q[h0 + g, i]
            r = r0 + g * seq
            for t in range(t0, t1):
                scratch[r, t - lo] = _score(_dot(qg, k[kh, t], hd), scale, softcap)
    for g in range(group):
        softmax_row(scratch, scratch, r0 + g * seq, n - lo)
        out[i, (h0 + g) * hd:(h0 + g + 1) * hd] = 0.0
    for t0 in range(lo, n, TILE):
        t1 = min(n, t0 + TILE)
        for g in range(group):
            acc = out[i, (h0 + g) * hd:(h0 + g + 1) * hd]
            r = r0 + g * seq
            t = t0
            while t + 4 <= t1:      # four values per pass over acc: four times fewer loads and stores of it
                p0, p1, p2, p3 = (scratch[r, t - lo], scratch[r, t + 1 - lo], scratch[r, t + 2 - lo],
                                  scratch[r, t + 3 - lo])
                v0, v1, v2, v3 = v[kh, t], v[kh, t + 1], v[kh, t + 2], v[kh, t + 3]
                for j in range(hd):
                    acc[j] += p0 * v0[j] + p1 * v1[j] + p2 * v2[j] + p3 * v3[j]
                t += 4
            for t in range(t, t1):
                _axpy(scratch[r, t - lo], v[kh, t], acc, hd)


@njit(inline="always", **JIT)
def _dot(a, b, n):
    s = np.float32(0.0)
    for j in range(n):
        s += a[j] * b[j]
    return s


@njit(inline="always", **JIT)
def _axpy(p, x, y, n):
    for j in range(n):
        y[j] += p * x[j]


@njit(**PJIT)
def attention_rows(q, k_addr, v_addr, kvh, capacity, pasts, causal, scale, out, scratch, softcap, window):
    """Attention of a few queries a sequence (a decode step, batched or not; a prompt part read
    row by row): q [batch, heads, seq, hd], sequence b's caches at addresses k_addr[b], v_addr[b]
    ([kvh, capacity, hd] each, kv_rows.py) holding pasts[b] positions before this step. One work
    item per (sequence, KV head, query), each computed by the same machine code whatever the
    batch: this one kernel serves every such call, since two compilations of the same item (a
    serial loop and this parallel one) rounded differently in 46 % of random cases (fast-math
    reductions vectorised each their own way), which made a sequence's batched step differ
    from its step alone."""
    nb, hq, seq, hd = q.shape
    for job in prange(nb * kvh * seq):
        b = job // (kvh * seq)
        k = cache_at(k_addr[b], kvh, capacity, hd)
        v = cache_at(v_addr[b], kvh, capacity, hd)
        _attend_one(q[b], k, v, pasts[b], causal, scale, out[b], scratch, b * hq * seq, job % (kvh * seq),
                    softcap, window)


@njit(**JIT)
def causal_softmax(scores, past, seq, causal):
    """Row i of scores [group * seq, total] (query i % seq) keeps keys 0 .. past + i % seq."""
    for r in range(scores.shape[0]):
        n = past + r % seq + 1 if causal else scores.shape[1]
        softmax_row(scores, scores, r, n)
        for t in range(n, scores.shape[1]):
            scores[r, t] = 0.0


@njit(inline="always", **JIT)
def _softmax_visible(sc, r, lo, n, scale, softcap):
    """Row r of scores sc [rows, total] (C order, raw q.k): scaled (and soft-capped), softmax over
    the visible keys lo .. n - 1, zero elsewhere. Direct row indexing, the capped and uncapped
    loops apart, so that each pass vectorises."""
    total = sc.shape[1]
    mx = np.float32(-np.inf)
    if softcap > 0:
        for t in range(lo, n):
            x = np.float32(np.tanh(sc[r, t] * scale / softcap)) * softcap
            sc[r, t] = x
            mx = max(mx, x)
    else:
        for t in range(lo, n):
            x = sc[r, t] * scale
            sc[r, t] = x
            mx = max(mx, x)
    if mx == np.float32(-np.inf):
        mx = np.float32(0.0)
    s = np.float32(0.0)
    for t in range(lo, n):
        e = exp_f32(sc[r, t] - mx)
        sc[r, t] = e
        s += e
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    for t in range(lo, n):
        sc[r, t] *= inv
    for t in range(lo):
        sc[r, t] = 0.0
    for t in range(n, total):
        sc[r, t] = 0.0


@njit(**PJIT)
def attention_blas(q4, k, v, past, causal, scale, out, row_chunk, softcap, window):
    """Prefill: for each KV head, its group's queries (q4 [batch, kv_heads, group * seq, hd], query
    row r being head r // seq, position r % seq) in chunks of `row_chunk` rows, one work item per
    chunk: scores and values through BLAS, single-threaded on the item's thread (threads.py)."""
    nb, kvh, rows, hd = q4.shape
    seq = out.shape[1]
    total = past + seq
    chunks = (rows + row_chunk - 1) // row_chunk
    for job in prange(nb * kvh * chunks):
        b = job // (kvh * chunks)
        h = (job // chunks) % kvh
        r0 = (job % chunks) * row_chunk
        r1 = min(rows, r0 + row_chunk)
        sc = np.dot(q4[b, h, r0:r1], k[b, h, :total].T)
        for r in range(r1 - r0):
            lo, n = _keys(past, (r0 + r) % seq, seq, causal, window)
            _softmax_visible(sc, r, lo, n, scale, softcap)
        o = np.dot(sc, v[b, h, :total])
        for r in range(r1 - r0):
            g, i = (r0 + r) // seq, (r0 + r) % seq
            col = (h * (rows // seq) + g) * hd
            for j in range(hd):
                out[b, i, col + j] = o[r, j]


BLAS_MIN_SEQ = 16          # queries from which BLAS wins over the row kernel (head dims the tiles cannot take)


def row_kernel(seq: int, hd: int, row_wise: bool) -> bool:
    """Whether attention of `seq` queries a sequence takes `attention_rows`: a decode step (fewer
    than TILES_MIN_SEQ queries) or `row_wise`; else the tile kernel (attention_tiles.py), or BLAS
    for a head dimension not a multiple of 16."""
    return row_wise or seq < TILES_MIN_SEQ or (hd % LANES and seq < BLAS_MIN_SEQ)


def attention_kv(q, k, v, past, causal, scale, out, scratch, softcap=0.0, window=0, row_wise=False):
    """Dispatch rule (`row_kernel`): the row kernel for a decode step, or for every call when
    `row_wise` (each query's output then what it is alone, in a batch of decode steps or in a
    prompt part of any size); the tile kernel for prompt parts; BLAS where the tiles do not fit.
    k and v: C-contiguous f32."""
    nb, hq, seq, hd = q.shape
    if not row_kernel(seq, hd, row_wise):
        if hd % LANES == 0:
            attention_tiles(q, k, v, past, causal, scale, out, np.float32(softcap), np.int64(window))
            return
        kvh = k.shape[1]
        rows = hq // kvh * seq
        # enough work items for every thread, each a whole number of rows
        row_chunk = -(-rows // max(1, -(-2 * pool_size() // (nb * kvh))))
        with serial_blas():
            attention_blas(q.reshape(nb, kvh, rows, hd), k, v, past, causal, scale, out, row_chunk,
                           np.float32(softcap), np.int64(window))
        return
    attention_rows(q, batch_addresses(k), batch_addresses(v), k.shape[1], k.shape[2], np.full(nb, past, np.int64),
                   causal, scale, out, scratch, np.float32(softcap), np.int64(window))


def attention(q, k, v, past, causal=True, scale=0.0, out=None, scratch=None, softcap=0.0, window=0):
    """Reference-compatible entry: returns [batch, seq, heads * hd] (reshape for the op's layout)."""
    nb, hq, seq, hd = q.shape
    scale = np.float32(scale or 1.0 / np.sqrt(hd))
    if out is None:
        out = np.empty((nb, seq, hq * hd), np.float32)
    need = (nb * hq * seq, past + seq)
    if scratch is None or scratch.shape[0] < need[0] or scratch.shape[1] < need[1]:
        scratch = np.empty(need, np.float32)
    attention_kv(np.ascontiguousarray(q, np.float32), np.ascontiguousarray(k, np.float32),
                 np.ascontiguousarray(v, np.float32), past, causal, scale, out, scratch, softcap, window)
    return out

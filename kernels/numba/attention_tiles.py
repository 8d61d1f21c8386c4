"""Attention for a prompt part after a long cache: sixteen query rows in the vector lanes.

The row kernel (attention.py, `attention_rows`) computes one query at a time: each key's score is
a dot product along the head dimension that ends in a horizontal sum, and each value is added to
the query's output through memory; for a decode step (one query a head) nothing else fits. A
prompt part has many queries over the same keys: here a KV head's query rows (its group of heads
times the part's tokens) go sixteen to a vector, and both products are tiles of 8 x 16 kept in
registers over their whole contraction (`_tile`):

    scores  S[t, r] = sum_j K[t, j] * (scale * Q[r, j])      8 keys x 16 rows, along j
    output  O[r, d] = sum_t P[t, r] * V[t, d]                8 rows x 16 dims, along t

one broadcast, one vector load and one FMA per 16 multiply-adds, no horizontal sums. The softmax
runs down the keys with the rows in lanes (no reductions across lanes either), and its 1 / sum
scales the output rows at the end.

Every query's numbers come from the same instructions in the same order whatever the part it is
in: its scores are FMA chains along j (the 8 x 16 tiles and the tail's scalar chains alike), its
softmax and weighted sum run along the keys 0 .. past + seq in order, and keys it cannot see add
exact zeros. So a prompt read in parts gives the same bits as read whole, as long as every part
takes this kernel (attention.py's dispatch rule: parts of `TILES_MIN_SEQ` tokens or more). Only
the keys some row of a block sees are read (for a causal prompt from position 0 about half).

One work item per (sequence, KV head, block of 16 rows); each reads its head's keys once for its
scores and its values once for its output (from L2 for the other blocks of the head).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from isthmus.kernels.numba import JIT, PJIT
from isthmus.kernels.numba.simd import _array_parts, _fma, exp_f32, fma_f32

LANES = 16           # query rows (scores) or head dimensions (output) per vector
TILE_ROWS = 8        # keys (scores) or query rows (output) per tile: 8 accumulators (4: 1.3x slower)
# queries a sequence from which the tiles take a call: below it, one block a KV head leaves the
# row kernel's (KV head, query) items better spread over the threads (2 queries after 1,000
# positions: 3.7 ms against 2.5 for the row kernel, 4: 2.7 against 6.6-8.7, whole model)
TILES_MIN_SEQ = 4


@intrinsic
def _tile(typingctx, a, b, c, a0, ak0, bk0, kc, b_col, c_row, c_col, a_by_row):
    """C[c_row + i, c_col : c_col + 16] = sum over k < kc of A_i(ak0 + k) * B[bk0 + k, b_col : b_col + 16]
    for i < TILE_ROWS, each an FMA chain in k order from 0.0; A_i(k) = A[a0 + i, k] if `a_by_row` else
    A[k, a0 + i]. f32 2-d arrays with unit inner stride."""
    f32arr = types.Array(types.float32, 2, "C")
    i64 = types.int64
    sig = types.void(f32arr, f32arr, f32arr, i64, i64, i64, i64, i64, i64, i64, types.boolean)

    def codegen(context, builder, signature, args):
        a, b, c, a0, ak0, bk0, kc, b_col, c_row, c_col, by_row = args
        f32, i64 = ir.FloatType(), ir.IntType(64)
        vec = ir.VectorType(f32, LANES)
        i8p = ir.IntType(8).as_pointer()
        a_data, a_strides, _ = _array_parts(context, builder, signature.args[0], a)
        b_data, b_strides, _ = _array_parts(context, builder, signature.args[1], b)
        c_data, c_strides, _ = _array_parts(context, builder, signature.args[2], c)
        four = ir.Constant(i64, 4)
        # A's element (i, k) at byte (a0 + i) * sa + k * sk
        sa = builder.select(by_row, a_strides[0], four)
        sk = builder.select(by_row, four, a_strides[0])
        a_base = builder.gep(builder.bitcast(a_data, i8p), [builder.add(builder.mul(a0, sa), builder.mul(ak0, sk))])
        b_base = builder.gep(builder.bitcast(b_data, i8p), [builder.add(builder.mul(bk0, b_strides[0]),
                                                                        builder.mul(b_col, four))])

        entry = builder.block
        loop = builder.append_basic_block("tile_k")
        done = builder.append_basic_block("tile_done")
        zero = ir.Constant(vec, [0.0] * LANES)
        builder.cbranch(builder.icmp_signed(">", kc, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(i64)
        accs = [builder.phi(vec) for _ in range(TILE_ROWS)]
        bp = builder.bitcast(builder.gep(b_base, [builder.mul(k, b_strides[0])]), vec.as_pointer())
        bv = builder.load(bp, align=4)
        ak = builder.gep(a_base, [builder.mul(k, sk)])
        new = []
        for i, acc in enumerate(accs):
            ap = builder.bitcast(builder.gep(ak, [builder.mul(ir.Constant(i64, i), sa)]), f32.as_pointer())
            s = builder.load(ap, align=4)
            splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), s,
                                                                  ir.Constant(ir.IntType(32), 0)),
                                           ir.Constant(vec, ir.Undefined),
                                           ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))
            new.append(_fma(builder, splat, bv, acc))
        k2 = builder.add(k, ir.Constant(i64, 1))
        k.add_incoming(ir.Constant(i64, 0), entry)
        k.add_incoming(k2, loop)
        for acc, n in zip(accs, new):
            acc.add_incoming(zero, entry)
            acc.add_incoming(n, loop)
        builder.cbranch(builder.icmp_signed("<", k2, kc), loop, done)

        builder.position_at_end(done)
        finals = []
        for n in new:                 # the phis first: LLVM wants them at the top of the block
            fin = builder.phi(vec)
            fin.add_incoming(zero, entry)
            fin.add_incoming(n, loop)
            finals.append(fin)
        c_base = builder.gep(builder.bitcast(c_data, i8p), [builder.add(builder.mul(c_row, c_strides[0]),
                                                                        builder.mul(c_col, four))])
        for i, fin in enumerate(finals):
            cp = builder.bitcast(builder.gep(c_base, [builder.mul(ir.Constant(i64, i), c_strides[0])]),
                                 vec.as_pointer())
            builder.store(fin, cp, align=4)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always", **JIT)
def _fma_chain(k, t, qt, lane, hd):
    """The score of key t for lane `lane` as `_tile` computes it (for the keys after the last tile of 4)."""
    s = np.float32(0.0)
    for j in range(hd):
        s = fma_f32(k[t, j], qt[j, lane], s)
    return s


@njit(**PJIT)
def attention_tiles(q, k, v, past, causal, scale, out, softcap, window):
    """q [batch, heads, seq, hd] (query i at position past + i), k, v [batch, kv_heads, capacity, hd]
    (C order, hd a multiple of 16, rows 0 .. past + seq valid), out [batch, seq, heads * hd]."""
    nb, hq, seq, hd = q.shape
    kvh = k.shape[1]
    group = hq // kvh
    rows = group * seq                    # a KV head's query rows: row r = head g * seq + query i
    blocks = (rows + LANES - 1) // LANES
    total = past + seq
    for job in prange(nb * kvh * blocks):
        b = job // (kvh * blocks)
        h = (job // blocks) % kvh
        r0 = (job % blocks) * LANES
        kb, vb = k[b, h], v[b, h]
        qt = np.zeros((hd, LANES), np.float32)
        lo = np.zeros(LANES, np.int64)
        hi = np.zeros(LANES, np.int64)            # lane l sees keys lo[l] .. hi[l] - 1 (none when padding)
        used = min(LANES, rows - r0)
        for lane in range(used):
            g, i = (r0 + lane) // seq, (r0 + lane) % seq
            for j in range(hd):
                qt[j, lane] = q[b, h * group + g, i, j] * scale
            n = past + i + 1 if causal else total
            lo[lane] = max(0, n - window) if window > 0 else 0
            hi[lane] = n
        # the keys some lane sees; the others would add exact zeros to every lane's sums
        klo, khi = lo[:used].min(), hi[:used].max()
        nk = khi - klo
        tiled = nk // TILE_ROWS * TILE_ROWS
        s = np.empty((nk, LANES), np.float32)
        for t0 in range(0, tiled, TILE_ROWS):
            _tile(kb, qt, s, klo + t0, 0, 0, hd, 0, t0, 0, True)
        for t in range(tiled, nk):
            for lane in range(LANES):
                s[t, lane] = _fma_chain(kb, klo + t, qt, lane, hd)
        mx = np.full(LANES, -np.inf, np.float32)
        for t in range(nk):
            for lane in range(LANES):
                x = s[t, lane]
                if softcap > 0:
                    x = np.float32(np.tanh(x / softcap)) * softcap
                x = x if lo[lane] <= klo + t < hi[lane] else np.float32(-np.inf)
                s[t, lane] = x
                mx[lane] = max(mx[lane], x)
        for lane in range(LANES):
            if mx[lane] == np.float32(-np.inf):
                mx[lane] = 0.0
        sums = np.zeros(LANES, np.float32)
        for t in range(nk):
            for lane in range(LANES):
                e = exp_f32(s[t, lane] - mx[lane])
                s[t, lane] = e
                sums[lane] += e
        o = np.empty((LANES, hd), np.float32)
        for a0 in range(0, used, TILE_ROWS):
            for d0 in range(0, hd, LANES):
                _tile(s, vb, o, a0, 0, klo, nk, d0, a0, d0, False)
        for lane in range(used):
            g, i = (r0 + lane) // seq, (r0 + lane) % seq
            inv = np.float32(1.0) / sums[lane] if sums[lane] > 0 else np.float32(0.0)
            col = (h * group + g) * hd
            for j in range(hd):
                out[b, i, col + j] = o[lane, j] * inv

"""q4 and q8 weights with sixteen rows in the vector lanes: the decode and batched-decode kernels.

The row layout (linear.py) takes one weight row at a time: a block's 32 products land in one
vector, which must then be converted, scaled and summed across its lanes, a dozen instructions
for 32 multiply-adds. Here a vector lane is a weight row: 16 rows of a block are interleaved two
weights at a time, so that one i16 multiply-add of pairs (vpdpwssd, 512 bits) takes weights
2k, 2k + 1 of all 16 rows against the same two activations, broadcast. A block is 16 of them into
one <16 x i32> (exact), then one conversion and two FMAs give the 16 rows' block terms: about 20
instructions for 512 multiply-adds. One token, one thread, 1536 x 576 q4_1: 7.6 us against 30.6 on
the row layout; eight tokens (two passes of four) 39 against 145 (`python
benchmarks/bench_kquant_decode.py --matvec` compares the layouts).

Layouts (`group`): G = rows / 16 groups, nb = cols / 32 blocks.

    q4: qs u8[G, nb, 8, 32]  chunk c, byte 2i + e: the GGUF byte 2c + e of row 16g + i's block b:
                             low nibble weight 2c + e, high nibble weight 16 + 2c + e
    q8: qs i8[G, nb, 16, 32] chunk c, byte 2i + e: weight 2c + e of row 16g + i
    d, m: u16 (f16 bits) [G, nb, 16]: row 16g + i's block scale (and q4's offset m) in lane i

So a chunk widened to <32 x i16> is the pair vector of 16 rows (q4: its low nibbles one pair,
its high nibbles the pair eight further on), and the activations' pair (2k, 2k + 1), read as one
i32 and broadcast, is the other operand.

Every token's dots are computed by the same instructions in the same order whichever kernel
(one or four tokens a pass; eight a pass measured no faster than two passes of four, 39.3 against
2 x 19.5 us, and cost compile time) and whichever group and batch it is in: the integer sums are
exact, and each row's float terms accumulate in its own lane block after block. So a sequence's
logits are bitwise the same alone, batched, or read in prompt parts of any size.

Hosts: vpdpwssd with AVX-512 VNNI; vpmaddwd + add with AVX-512BW; two 256-bit vpmaddwd with AVX2
(the same values: the sums are exact). Grouped only where linear.INT_ACTIVATIONS (AVX2) holds and
the rows are a multiple of 16; otherwise the row layout.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from isthmus.kernels.numba import JIT
from isthmus.kernels.numba.kquant_simd import WIDE
from isthmus.kernels.numba.simd import HAVE_VNNI, StrictFloats, _array_parts, _fma, _row_ptr, _x86, f16_to_f32

GROUP = 16           # weight rows per group: the lanes of a <16 x i32>
MAX_TOKENS = 4       # tokens a pass at most (the scratch a caller gives holds this many)


def group(kind: str, qs: np.ndarray, d: np.ndarray, m: np.ndarray):
    """The row layout's (qs, d, m) of a q4 or q8 weight (linear.py) in the grouped layout."""
    rows, nb = d.shape
    g = rows // GROUP
    if kind == "q4":
        q = qs.reshape(g, GROUP, nb, 8, 2).transpose(0, 2, 3, 1, 4).reshape(g, nb, 8, 2 * GROUP)
    else:
        q = qs.reshape(g, GROUP, nb, 16, 2).transpose(0, 2, 3, 1, 4).reshape(g, nb, 16, 2 * GROUP)

    def lanes(a):      # q8's empty m becomes an empty 3-d array: one type for both kernels' m
        return np.ascontiguousarray(a.reshape(g, GROUP, nb).transpose(0, 2, 1)) if a.size else a.reshape(0, 0, 0)
    return np.ascontiguousarray(q), lanes(d), lanes(m)


def _pairs_dot(builder, acc, w, x):
    """acc (<16 x i32>) + the pairwise sums of w (<32 x i16>, as <16 x i32>) times x's pairs."""
    i16, i32 = ir.IntType(16), ir.IntType(32)
    v16i32, v8i32, v16i16 = ir.VectorType(i32, 16), ir.VectorType(i32, 8), ir.VectorType(i16, 16)
    if HAVE_VNNI:
        return _x86(builder, "llvm.x86.avx512.vpdpwssd.512", v16i32, [acc, w, x])
    v32i16 = ir.VectorType(i16, 32)
    if WIDE:
        p = _x86(builder, "llvm.x86.avx512.pmaddw.d.512", v16i32,
                 [builder.bitcast(w, v32i16), builder.bitcast(x, v32i16)])
        return builder.add(acc, p)
    halves = []
    for h in range(2):
        pick = ir.Constant(ir.VectorType(i32, 8), list(range(8 * h, 8 * h + 8)))
        wh = builder.bitcast(builder.shuffle_vector(w, w, pick), v16i16)
        xh = builder.bitcast(builder.shuffle_vector(x, x, pick), v16i16)
        halves.append(_x86(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [wh, xh]))
    return builder.add(acc, builder.shuffle_vector(halves[0], halves[1], ir.Constant(v16i32, list(range(16)))))


def _make(bits: int, tokens: int, chains: int):
    """An intrinsic (qs, d, m, g, xq, xd, xs, t, dst, at): dst[at + 16 k + i] = the dot of weight
    row 16 g + i with token t + k's activations (quantize_rows_i16: xq, xd, xs), k < tokens. Each
    token's 16 multiply-adds a block are split over `chains` i32 accumulators (a multiply-add waits
    on the one before it in its chain): fewer tokens, more chains."""
    chunks = 8 if bits == 4 else 16

    def typer(typingctx, qs, d, m, g, xq, xd, xs, t, dst, at):
        return types.none(qs, d, m, g, xq, xd, xs, t, dst, at), codegen

    def codegen(context, builder, sig, args):
        builder = StrictFloats(builder)
        qs_t, d_t, m_t, _, xq_t, xd_t, xs_t, _, dst_t, _ = sig.args
        qs, d, m, g, xq, xd, xs, t, dst, at = args
        f32, i64, i32, i16, i8 = ir.FloatType(), ir.IntType(64), ir.IntType(32), ir.IntType(16), ir.IntType(8)
        v32i8, v32i16, v16i32, v16f, v16i16 = (ir.VectorType(i8, 32), ir.VectorType(i16, 32),
                                               ir.VectorType(i32, 16), ir.VectorType(f32, 16),
                                               ir.VectorType(i16, 16))
        v16h = ir.VectorType(ir.HalfType(), 16)
        qdata, qstr, qshape = _array_parts(context, builder, qs_t, qs)
        ddata, dstr, _ = _array_parts(context, builder, d_t, d)
        mdata, mstr, _ = _array_parts(context, builder, m_t, m)
        xqdata, xqstr, _ = _array_parts(context, builder, xq_t, xq)
        xddata, xdstr, _ = _array_parts(context, builder, xd_t, xd)
        xsdata, xsstr, _ = _array_parts(context, builder, xs_t, xs)
        dsdata, _, _ = _array_parts(context, builder, dst_t, dst)
        g = context.cast(builder, g, sig.args[3], types.int64)
        t = context.cast(builder, t, sig.args[7], types.int64)
        at = context.cast(builder, at, sig.args[9], types.int64)
        nb = qshape[1]
        qgroup = _row_ptr(builder, qdata, qstr[0], g, i8)
        dgroup = _row_ptr(builder, ddata, dstr[0], g, i16)
        mgroup = _row_ptr(builder, mdata, mstr[0], g, i16) if bits == 4 else None
        toks = [builder.add(t, ir.Constant(i64, k)) for k in range(tokens)]
        xpairs = [builder.bitcast(_row_ptr(builder, xqdata, xqstr[0], tk, i16), i32.as_pointer()) for tk in toks]
        xdrows = [_row_ptr(builder, xddata, xdstr[0], tk, f32) for tk in toks]
        xsrows = [_row_ptr(builder, xsdata, xsstr[0], tk, f32) for tk in toks] if bits == 4 else None

        def splat(v, vty):
            one = builder.insert_element(ir.Constant(vty, ir.Undefined), v, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, one, ir.Constant(v16i32, [0] * 16))

        def lanes_f32(rowp, b):
            p = builder.bitcast(builder.gep(rowp, [builder.mul(b, ir.Constant(i64, GROUP))]), v16i16.as_pointer())
            return builder.fpext(builder.bitcast(builder.load(p, align=2), v16h), v16f)

        entry = builder.block
        loop = builder.append_basic_block("groups_blocks")
        done = builder.append_basic_block("groups_done")
        zero_f = ir.Constant(v16f, [0.0] * 16)
        zero_i = ir.Constant(v16i32, [0] * 16)
        builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        b = builder.phi(i64)
        accs = [builder.phi(v16f) for _ in range(tokens)]
        dv = lanes_f32(dgroup, b)
        mv = lanes_f32(mgroup, b) if bits == 4 else None
        qb = builder.gep(qgroup, [builder.mul(b, ir.Constant(i64, 32 * chunks))])
        xo = builder.mul(b, ir.Constant(i64, 16))        # the block's first activation pair
        sums = [[zero_i] * chains for _ in range(tokens)]
        used = 0
        for c in range(chunks):
            raw = builder.load(builder.bitcast(builder.gep(qb, [ir.Constant(i64, 32 * c)]), v32i8.as_pointer()),
                               align=1)
            if bits == 4:
                wide = builder.zext(raw, v32i16)
                pairs = [(builder.and_(wide, ir.Constant(v32i16, [15] * 32)), c),
                         (builder.lshr(wide, ir.Constant(v32i16, [4] * 32)), c + 8)]
            else:
                pairs = [(builder.sext(raw, v32i16), c)]
            for w, pair in pairs:
                w = builder.bitcast(w, v16i32)
                k = used % chains
                used += 1
                for tk in range(tokens):
                    x = splat(builder.load(builder.gep(xpairs[tk], [builder.add(xo, ir.Constant(i64, pair))]),
                                           align=2), v16i32)
                    sums[tk][k] = _pairs_dot(builder, sums[tk][k], w, x)
        outs = []
        for tk in range(tokens):
            s = sums[tk]
            while len(s) > 1:              # exact: any order gives the same i32 sums
                s = [builder.add(s[i], s[i + 1]) if i + 1 < len(s) else s[i] for i in range(0, len(s), 2)]
            scale = builder.fmul(dv, splat(builder.load(builder.gep(xdrows[tk], [b])), v16f))
            acc = _fma(builder, builder.sitofp(s[0], v16f), scale, accs[tk])
            if bits == 4:                  # the offsets: m times the block's activation sum
                acc = _fma(builder, mv, splat(builder.load(builder.gep(xsrows[tk], [b])), v16f), acc)
            outs.append(acc)
        b2 = builder.add(b, ir.Constant(i64, 1))
        b.add_incoming(ir.Constant(i64, 0), entry)
        b.add_incoming(b2, builder.block)
        for acc, acc2 in zip(accs, outs):
            acc.add_incoming(zero_f, entry)
            acc.add_incoming(acc2, builder.block)
        latch = builder.block
        builder.cbranch(builder.icmp_signed("<", b2, nb), loop, done)

        builder.position_at_end(done)
        finals = []
        for acc2 in outs:                  # the phis first: LLVM wants them at the top of the block
            f = builder.phi(v16f)
            f.add_incoming(zero_f, entry)
            f.add_incoming(acc2, latch)
            finals.append(f)
        base = builder.gep(builder.bitcast(dsdata, f32.as_pointer()), [at])
        for tk, f in enumerate(finals):
            builder.store(f, builder.bitcast(builder.gep(base, [ir.Constant(i64, GROUP * tk)]), v16f.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return intrinsic(typer)


q4_dots1, q4_dots4 = _make(4, 1, 4), _make(4, 4, 2)
q8_dots1, q8_dots4 = _make(8, 1, 4), _make(8, 4, 2)


@njit(inline="always", **JIT)
def dequant_row(qs, d, m, r, out, t):
    """out[t] = row r of a grouped weight, in f32."""
    g, i = r // GROUP, r % GROUP
    q4 = qs.shape[2] == 8
    for b in range(qs.shape[1]):
        db = f16_to_f32(d[g, b, i])
        if q4:
            mb = f16_to_f32(m[g, b, i])
            for c in range(8):
                for e in range(2):
                    v = qs[g, b, c, 2 * i + e]
                    out[t, 32 * b + 2 * c + e] = np.float32(v & 15) * db + mb
                    out[t, 32 * b + 16 + 2 * c + e] = np.float32(v >> 4) * db + mb
        else:
            for c in range(16):
                for e in range(2):
                    out[t, 32 * b + 2 * c + e] = np.float32(qs[g, b, c, 2 * i + e]) * db


def dots1(qs, d, m, g, xq, xd, xs, t, dst, at):
    """One token's dots of a group's 16 rows into dst[at:at + 16] (q4 or q8 by qs's type)."""


def dots4(qs, d, m, g, xq, xd, xs, t, dst, at):
    """`dots1` of tokens t .. t + 3 into dst[at:at + 64], each bitwise its one-token dots."""



def _by_type(q4, q8):
    def impl(qs, d, m, g, xq, xd, xs, t, dst, at):
        kernel = q4 if qs.dtype == types.uint8 else q8
        return lambda qs, d, m, g, xq, xd, xs, t, dst, at: kernel(qs, d, m, g, xq, xd, xs, t, dst, at)
    return impl


overload(dots1)(_by_type(q4_dots1, q8_dots1))
overload(dots4)(_by_type(q4_dots4, q8_dots4))

"""Decode dot products on raw GGUF blocks with i16 activations, written as LLVM vector IR (as
simd.py's q4/q8 ones, whose helpers they use): q4_k, q5_k, q6_k, q5_0 and q5_1 on every AVX2 host,
q2_k and q3_k on AVX-512 hosts. These are the decode hot path of llama.cpp's K-quant files (q5_0 is
where a Q4_K_M file puts the q4_k rows whose width is not a multiple of 256).

Numba loops over these blocks vectorise too (kquant.py), but every 16- or 32-value run then ends
in a horizontal sum before its scale is applied. Here each run's i16 multiply-adds (vpmaddwd)
stay a vector of i32 that is converted and multiplied by the run's scale into one float vector
accumulator kept across the whole row (<8 x float> with AVX2, <16 x float> with AVX-512BW, where
one 512-bit vpmaddwd takes a whole 32-value run): one horizontal sum per row. The block's
sub-block loop is unrolled while the IR is generated, so every byte offset and scale-unpacking
mask is a constant; with AVX-512 a block's scales (and mins) are unpacked and multiplied by d and
the activation scales as one vector, each run taking its lane by a shuffle.

Layouts (compiler/quant.py): q4_k 144 bytes = f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128
bytes of nibbles (32 bytes per 64 values: low nibbles the first 32, high the next); q5_k the same
with 32 bytes of fifth bits after the scales; q6_k 210 bytes = 128 bytes low nibbles, 64 bytes of
2-bit high parts, 16 int8 scales, f16 d; q2_k 84 bytes = 16 scale/min nibble pairs, 64 bytes of
2-bit q, f16 d, f16 dmin; q3_k 110 bytes = 32 bytes hmask, 64 bytes of 2-bit q, 12 bytes of 6-bit
scales, f16 d; q5_0 22 bytes = f16 d, u32 qh, 16 bytes of nibbles (q5_1: f16 d, f16 m first).
"""

from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from isthmus.kernels.numba.simd import (HAVE_VNNI, StrictFloats, _array_parts, _block_loop_multi, _fma,
                                        _half, _row_ptr, _span_rows, _x86)


def _host_has_avx512bw() -> bool:
    try:
        from llvmlite import binding as llb
        return "+avx512bw" in llb.get_host_cpu_features().flatten().split(",")
    except Exception:        # pragma: no cover - llvmlite without the query
        return False


# With AVX-512BW each 32-value run is one 512-bit vpmaddwd (<32 x i16> pairs -> <16 x i32>) into a
# <16 x float> accumulator: half the instructions of two 256-bit ones. ISTHMUS_NUMBA_AVX512=0 keeps
# the 256-bit code (for comparison; it changes generated code, which Numba's cache does not key on:
# use a fresh NUMBA_CACHE_DIR with it).
WIDE = _host_has_avx512bw() and os.environ.get("ISTHMUS_NUMBA_AVX512", "1") != "0"


def _i8_columns(builder, xqrow, nb):
    """Pointers to a row's i8 activations, its f32 scale per 256-value block and its i16 sums per 16
    values (simd.i8_columns), for rows of nb 256-value blocks."""
    i64 = ir.IntType(64)
    at = builder.mul(nb, ir.Constant(i64, 256))
    x8 = builder.bitcast(builder.gep(xqrow, [at]), ir.IntType(8).as_pointer())
    at = builder.add(at, builder.mul(nb, ir.Constant(i64, 128)))
    d8 = builder.bitcast(builder.gep(xqrow, [at]), ir.FloatType().as_pointer())
    sums = builder.gep(xqrow, [builder.add(at, builder.mul(nb, ir.Constant(i64, 2)))])
    return x8, d8, sums


def _i8_block_dot(builder, acc_i, w, x8, xo, scales):
    """acc_i + the 64 products w[i] * x8[xo + i] (u8 x i8) in pairs (vpmaddubsw: no saturation for
    weights below 64 and |x| <= 127), each pair multiplied by its lane of the i16 `scales` and
    added in pairs into acc_i's 16 i32 lanes (vpdpwssd)."""
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    v64i8, v32i16, v16i32 = ir.VectorType(i8, 64), ir.VectorType(i16, 32), ir.VectorType(i32, 16)
    xv = builder.load(builder.bitcast(builder.gep(x8, [xo]), v64i8.as_pointer()), align=1)
    p = _x86(builder, "llvm.x86.avx512.pmaddubs.w.512", v32i16, [w, xv])
    return _x86(builder, "llvm.x86.avx512.vpdpwssd.512", v16i32,
                [acc_i, builder.bitcast(p, v16i32), builder.bitcast(scales, v16i32)])


def _i8_block_offsets(builder, per16, sums, b):
    """<16 x i32>: lanes 0-7 the pairwise sums of per16[i] x the block's 16 activation sums (one per
    16 values), lanes 8-15 zero."""
    i16, i32 = ir.IntType(16), ir.IntType(32)
    v16i16 = ir.VectorType(i16, 16)
    bs = builder.load(builder.bitcast(builder.gep(sums, [builder.mul(b, ir.Constant(ir.IntType(64), 16))]),
                                      v16i16.as_pointer()), align=2)
    p = _x86(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(i32, 8), [per16, bs])
    return builder.shuffle_vector(p, ir.Constant(ir.VectorType(i32, 8), [0] * 8),
                                  ir.Constant(ir.VectorType(i32, 16), list(range(16))))


class _Partials:
    """A block's scaled runs summed in independent chains, added to the row's accumulator once: one
    chain through a block's eight FMAs waits 4 cycles on each, longer than the block's own work."""

    def __init__(self, builder, chains: int = 4):
        self.builder, self.chains, self.sums, self.n = builder, chains, [], 0

    def add(self, a, b):
        k = self.n % self.chains
        self.n += 1
        if k == len(self.sums):
            self.sums.append(self.builder.fmul(a, b))
        else:
            self.sums[k] = _fma(self.builder, a, b, self.sums[k])

    def into(self, acc):
        sums = self.sums
        while len(sums) > 1:
            sums = [self.builder.fadd(sums[i], sums[i + 1]) if i + 1 < len(sums) else sums[i]
                    for i in range(0, len(sums), 2)]
        return self.builder.fadd(acc, sums[0])


def _make(fmt: str, wide: bool = WIDE, vnni: bool = HAVE_VNNI, tokens: int = 1, span: bool = False):
    """The row dot product of `fmt` blocks: dot(W[r], x[t]) as f32; with `tokens` > 1, the dots of
    x[t], ..., x[t + tokens - 1] as a tuple, each computed by exactly the instructions of the
    one-token dot (so bitwise equal to it), the weight bytes loaded and unpacked once for all.

    With `span` (one token): rows r0 .. r1 - 1, dst[i] = dot(W[r0 + i], x[t]), each row the one-row
    instructions, in a loop of their own: a row of few blocks (1,024 values are four q4_k blocks)
    otherwise pays, per row, the call's dispatch on the format, its constants' loads and its
    pointers, which cost about as much as its blocks (a 1-thread q4_k matvec: 11264x256 190 us,
    704x4096 54 us for the same bytes)."""
    size = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210, "q5_0": 22, "q5_1": 24}[fmt]
    assert tokens == 1 or not span

    def typer(typingctx, qs, r, xq, xd, xs, t):
        ret = types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens)
        return ret(qs, r, xq, xd, xs, t), codegen

    def span_typer(typingctx, qs, r, xq, xd, xs, t, r1, dst):
        return types.none(qs, r, xq, xd, xs, t, r1, dst), codegen

    def codegen(context, builder, sig, args):
        builder = StrictFloats(builder)
        qs_t, _, xq_t, xd_t, xs_t = sig.args[:5]
        if span:        # (qs, r0, xq, xd, xs, t, r1, dst)
            qs, r, xq, xd, xs, t, r1, dst = args
        else:
            qs, r, xq, xd, xs, t = args
        f32, i64, i32, i16, i8 = ir.FloatType(), ir.IntType(64), ir.IntType(32), ir.IntType(16), ir.IntType(8)
        v16i8, v16i16, v8i32, v8f = (ir.VectorType(i8, 16), ir.VectorType(i16, 16), ir.VectorType(i32, 8),
                                     ir.VectorType(f32, 8))
        qdata, qstr, qshape = _array_parts(context, builder, qs_t, qs)
        xqdata, xqstr, _ = _array_parts(context, builder, xq_t, xq)
        xddata, xdstr, _ = _array_parts(context, builder, xd_t, xd)
        xsdata, xsstr, _ = _array_parts(context, builder, xs_t, xs)
        r = context.cast(builder, r, sig.args[1], types.int64)
        t = context.cast(builder, t, sig.args[5], types.int64)
        nb = qshape[1]
        vtype = ir.VectorType(ir.FloatType(), 16 if wide else 8)

        def body_for(qrow, xqrow, xdrow, xsrow):
            """One token's block body (its activation rows); every token's body loads and unpacks
            the same weight bytes, which LLVM's common-subexpression elimination then does once."""
            def c64(v):
                return ir.Constant(i64, v)

            def splat16(v):
                return ir.Constant(v16i16, [v] * 16)

            def byte(bp, off):                      # one block byte as i32
                return builder.zext(builder.load(builder.gep(bp, [c64(off)])), i32)

            def bytes16(bp, off):
                return builder.load(builder.bitcast(builder.gep(bp, [c64(off)]), v16i8.as_pointer()), align=1)

            def f16(bp, off):
                return _half(builder, builder.load(builder.bitcast(builder.gep(bp, [c64(off)]), i16.as_pointer())))

            def madd(w16, xo):
                """<8 x i32> pairwise sums of w16 * xq[xo : xo + 16]."""
                xv = builder.load(builder.bitcast(builder.gep(xqrow, [xo]), v16i16.as_pointer()), align=2)
                return _x86(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [w16, xv])

            def scaled(acc, p32, scale):
                sv = builder.insert_element(ir.Constant(v8f, ir.Undefined), scale, ir.Constant(i32, 0))
                sv = builder.shuffle_vector(sv, sv, ir.Constant(v8i32, [0] * 8))
                return _fma(builder, builder.sitofp(p32, v8f), sv, acc)

            v32i8, v32i16, v16i32, v16f = (ir.VectorType(i8, 32), ir.VectorType(i16, 32), ir.VectorType(i32, 16),
                                           ir.VectorType(f32, 16))

            def splat32(v):
                return ir.Constant(v32i16, [v] * 32)

            def bytes32(bp, off):
                return builder.load(builder.bitcast(builder.gep(bp, [c64(off)]), v32i8.as_pointer()), align=1)

            def madd32(w32, xo):
                """<16 x i32> pairwise sums of w32 * xq[xo : xo + 32] (one 512-bit vpmaddwd)."""
                xv = builder.load(builder.bitcast(builder.gep(xqrow, [xo]), v32i16.as_pointer()), align=2)
                return _x86(builder, "llvm.x86.avx512.pmaddw.d.512", v16i32, [w32, xv])

            def scales16(s0, s1=None):
                """<16 x float>: s0 in every lane, or s0 in lanes 0-7 and s1 in lanes 8-15."""
                v = builder.insert_element(ir.Constant(v16f, ir.Undefined), s0, ir.Constant(i32, 0))
                if s1 is None:
                    return builder.shuffle_vector(v, v, ir.Constant(v16i32, [0] * 16))
                v = builder.insert_element(v, s1, ir.Constant(i32, 1))
                return builder.shuffle_vector(v, v, ir.Constant(v16i32, [0] * 8 + [1] * 8))

            def scale_min_k4(bp, j):
                """q4_k / q5_k sub-block j's 6-bit scale and min as i32 (get_scale_min_k4, scales at byte 4)."""
                if j < 4:
                    return (builder.and_(byte(bp, 4 + j), ir.Constant(i32, 63)),
                            builder.and_(byte(bp, 8 + j), ir.Constant(i32, 63)))
                top = byte(bp, 8 + j)
                sc = builder.or_(builder.and_(top, ir.Constant(i32, 15)),
                                 builder.shl(builder.lshr(byte(bp, j), ir.Constant(i32, 6)), ir.Constant(i32, 4)))
                mn = builder.or_(builder.lshr(top, ir.Constant(i32, 4)),
                                 builder.shl(builder.lshr(byte(bp, 4 + j), ir.Constant(i32, 6)), ir.Constant(i32, 4)))
                return sc, mn

            def block_wide(b, acc, macc):
                bp = builder.gep(qrow, [builder.mul(b, c64(size))])
                if fmt in ("q5_0", "q5_1"):
                    one = fmt == "q5_1"
                    at = 4 if one else 2
                    nib = builder.zext(bytes16(bp, at + 4), v16i16)
                    q = builder.shuffle_vector(builder.and_(nib, splat16(15)), builder.lshr(nib, splat16(4)),
                                               ir.Constant(ir.VectorType(i32, 32), list(range(32))))
                    qh = builder.load(builder.bitcast(builder.gep(bp, [c64(at)]), i32.as_pointer()), align=1)
                    set_ = builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32))     # bit j -> lane j: a k-mask
                    q = builder.add(q, builder.select(set_, splat32(16 if one else 0), splat32(0 if one else -16)))
                    p = madd32(q, builder.mul(b, c64(32)))
                    scale = builder.fmul(f16(bp, 0), builder.load(builder.gep(xdrow, [b])))
                    acc = _fma(builder, builder.sitofp(p, v16f), scales16(scale), acc)
                    if one:
                        macc = _fma(builder, f16(bp, 2), builder.load(builder.gep(xsrow, [b])), macc)
                    return acc, macc
                x0 = builder.mul(b, c64(256))
                k0 = builder.mul(b, c64(8))

                def xd_at(k):
                    return builder.load(builder.gep(xdrow, [builder.add(k0, c64(k))]))

                if fmt in ("q4_k", "q5_k"):
                    five = fmt == "q5_k"
                    q0 = 48 if five else 16
                    i8_acts = vnni and not five
                    # the 8 scales and 8 mins as one vector (get_scale_min_k4 lane by lane; s = the 12
                    # scale bytes at 4): lanes j < 4 sc = s[j] & 63, j in 4..7 sc = (s[j + 4] & 15) |
                    # (s[j - 4] >> 6) << 4; lanes 8 + j: mn = s[j + 4] & 63, or (s[j + 4] >> 4) | (s[j] >> 6) << 4
                    sb = bytes16(bp, 4)

                    def pick16(idx):
                        return builder.zext(builder.shuffle_vector(sb, sb, ir.Constant(v16i32, idx)), v16i16)

                    def k16(vals):
                        return ir.Constant(v16i16, vals)

                    low = builder.and_(builder.lshr(pick16([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]),
                                                    k16([0] * 12 + [4] * 4)), k16(([63] * 4 + [15] * 4) * 2))
                    top = builder.and_(builder.lshr(pick16([0] * 4 + [0, 1, 2, 3] + [0] * 4 + [4, 5, 6, 7]), k16([2] * 16)),
                                       k16(([0] * 4 + [48] * 4) * 2))
                    scmn16 = builder.or_(low, top)
                    v2f = ir.VectorType(f32, 2)
                    dm = builder.fpext(builder.load(builder.bitcast(bp, ir.VectorType(ir.HalfType(), 2).as_pointer()),
                                                    align=1), v2f)
                    if i8_acts:
                        # i8 activations, one scale a block (simd.i8_columns): each 64-byte vector holds
                        # runs 2c (low nibbles) and 2c + 1 (high); their products meet the runs' 6-bit
                        # scales in i32 (vpmaddubsw, vpdpwssd), the mins the activations' sums per 16
                        # (vpmaddwd); two conversions and multiply-adds a block
                        x8, d8p, sums = _i8_columns(builder, xqrow, nb)
                        v64i8 = ir.VectorType(i8, 64)
                        acc_i = ir.Constant(v16i32, [0] * 16)
                        for c in range(4):
                            q32 = bytes32(bp, q0 + 32 * c)
                            w = builder.shuffle_vector(q32, q32, ir.Constant(ir.VectorType(i32, 64), list(range(32)) * 2))
                            w = builder.lshr(builder.bitcast(w, v32i16), ir.Constant(v32i16, [0] * 16 + [4] * 16))
                            w = builder.and_(builder.bitcast(w, v64i8), ir.Constant(v64i8, [15] * 64))
                            sc = builder.shuffle_vector(scmn16, scmn16, ir.Constant(ir.VectorType(i32, 32),
                                                                                    [2 * c] * 16 + [2 * c + 1] * 16))
                            acc_i = _i8_block_dot(builder, acc_i, w, x8, builder.add(x0, c64(64 * c)), sc)
                        mins = builder.shuffle_vector(scmn16, scmn16, ir.Constant(v16i32, [8 + i // 2 for i in range(16)]))
                        off = _i8_block_offsets(builder, mins, sums, b)
                        d8 = builder.load(builder.gep(d8p, [b]))
                        dx = builder.fmul(builder.extract_element(dm, ir.Constant(i32, 0)), d8)
                        mx = builder.fneg(builder.fmul(builder.extract_element(dm, ir.Constant(i32, 1)), d8))
                        acc = _fma(builder, builder.sitofp(acc_i, v16f), scales16(dx), acc)
                        return _fma(builder, builder.sitofp(off, v16f), scales16(mx), acc), macc
                    scmn = builder.uitofp(scmn16, v16f)
                    # x d (lanes 0-7) and x -dmin (8-15), the f16 pair at the block's start converted at once
                    dm = builder.fmul(builder.shuffle_vector(dm, dm, ir.Constant(v16i32, [0] * 8 + [1] * 8)),
                                      ir.Constant(v16f, [1.0] * 8 + [-1.0] * 8))
                    # x the activations' scale per run (lanes 0-7) and sum per run (8-15)
                    v8f = ir.VectorType(f32, 8)
                    xd8 = builder.load(builder.bitcast(builder.gep(xdrow, [k0]), v8f.as_pointer()), align=4)
                    xs8 = builder.load(builder.bitcast(builder.gep(xsrow, [k0]), v8f.as_pointer()), align=4)
                    xx = builder.shuffle_vector(xd8, xs8, ir.Constant(v16i32, list(range(16))))
                    scales = builder.fmul(builder.fmul(scmn, dm), xx)      # d sc xd per run, then -dmin mn xs
                    # the mins enter the accumulator as lanes 8-15 of one extra term per block
                    mins = ir.Constant(ir.VectorType(ir.IntType(1), 16), [0] * 8 + [1] * 8)
                    acc = builder.select(mins, builder.fadd(acc, scales), acc)      # a masked add
                    hbits = builder.zext(bytes32(bp, 16), v32i16) if five else None
                    parts = _Partials(builder)
                    for c in range(4):
                        qv = builder.zext(bytes32(bp, q0 + 32 * c), v32i16)
                        for j in (2 * c, 2 * c + 1):
                            q = builder.lshr(qv, splat32(4)) if j & 1 else builder.and_(qv, splat32(15))
                            if five:
                                h = builder.and_(builder.lshr(hbits, splat32(j)), splat32(1))
                                q = builder.or_(q, builder.shl(h, splat32(4)))
                            p = madd32(q, builder.add(x0, c64(32 * j)))
                            sv = builder.shuffle_vector(scales, scales, ir.Constant(v16i32, [j] * 16))
                            parts.add(builder.sitofp(p, v16f), sv)
                    return parts.into(acc), macc

                if fmt in ("q2_k", "q3_k"):
                    # 2-bit q: run k of half h is (qs[32 h + l] >> 2k) & 3; its 16-value sub-runs have a scale each
                    three = fmt == "q3_k"
                    qoff = 32 if three else 16
                    d = f16(bp, 108) if three else f16(bp, 80)
                    ones = splat32(1)
                    for h in range(2):
                        qb = builder.zext(bytes32(bp, qoff + 32 * h), v32i16)
                        for k in range(4):
                            q = builder.and_(builder.lshr(qb, splat32(2 * k)), splat32(3))
                            if three:       # minus 4 where bit 4h + k of hmask[l] is clear
                                hm = builder.zext(bytes32(bp, 0), v32i16)
                                hb = builder.and_(builder.lshr(hm, splat32(4 * h + k)), ones)
                                q = builder.sub(q, builder.shl(builder.xor(hb, ones), splat32(2)))
                            xo = builder.add(x0, c64(128 * h + 32 * k))
                            p = madd32(q, xo)                   # lanes 0-7: sub-run 0, 8-15: sub-run 1
                            dx = builder.fmul(d, xd_at(4 * h + k))
                            sc, mn = [], []
                            for i in (0, 1):
                                si = 8 * h + 2 * k + i
                                if three:
                                    low = byte(bp, 96 + si) if si < 8 else builder.lshr(byte(bp, 96 + si - 8), ir.Constant(i32, 4))
                                    low = builder.and_(low, ir.Constant(i32, 15))
                                    high = builder.and_(builder.lshr(byte(bp, 104 + (si & 3)), ir.Constant(i32, 2 * (si >> 2))),
                                                        ir.Constant(i32, 3))
                                    v = builder.sub(builder.or_(low, builder.shl(high, ir.Constant(i32, 4))), ir.Constant(i32, 32))
                                    sc.append(builder.fmul(dx, builder.sitofp(v, f32)))
                                else:
                                    v = byte(bp, si)
                                    sc.append(builder.fmul(dx, builder.uitofp(builder.and_(v, ir.Constant(i32, 15)), f32)))
                                    mn.append(builder.uitofp(builder.lshr(v, ir.Constant(i32, 4)), f32))
                            acc = _fma(builder, builder.sitofp(p, v16f), scales16(*sc), acc)
                            if not three:   # - dmin * mn * sum(x) per sub-run: the x sums by a multiply-add with ones
                                psum = madd32(ones, xo)
                                ndx = builder.fmul(builder.fneg(f16(bp, 82)), xd_at(4 * h + k))
                                acc = _fma(builder, builder.sitofp(psum, v16f),
                                           scales16(*(builder.fmul(ndx, m_) for m_ in mn)), acc)
                    return acc, macc

                d = f16(bp, 208)                    # q6_k
                if vnni:
                    # i8 activations, one scale a block (simd.i8_columns): runs k = 2kk, 2kk + 1 of half
                    # h are 64 contiguous values, their u8 q (0..63) multiplied in pairs (vpmaddubsw)
                    # and by the sub-runs' int8 scales into i32 (vpdpwssd); the offset of 32 through
                    # the activations' sums per 16 values; one conversion and multiply-add a block
                    x8, d8p, sums = _i8_columns(builder, xqrow, nb)
                    v64i8 = ir.VectorType(i8, 64)
                    sc = builder.sext(bytes16(bp, 192), v16i16)
                    acc_i = ir.Constant(v16i32, [0] * 16)
                    for h in range(2):
                        lo64 = builder.load(builder.bitcast(builder.gep(bp, [c64(64 * h)]), v64i8.as_pointer()), align=1)
                        hb32 = bytes32(bp, 128 + 32 * h)
                        hb64 = builder.bitcast(builder.shuffle_vector(hb32, hb32, ir.Constant(ir.VectorType(i32, 64),
                                                                                              list(range(32)) * 2)), v32i16)
                        for kk in range(2):
                            lo = lo64 if kk == 0 else builder.bitcast(
                                builder.lshr(builder.bitcast(lo64, v32i16), splat32(4)), v64i8)
                            hb = builder.lshr(hb64, ir.Constant(v32i16, [4 * kk] * 16 + [4 * kk + 2] * 16))
                            hb = builder.shl(builder.and_(builder.bitcast(hb, v64i8), ir.Constant(v64i8, [3] * 64)),
                                             ir.Constant(v64i8, [4] * 64))
                            q = builder.or_(builder.and_(lo, ir.Constant(v64i8, [15] * 64)), hb)
                            m = 8 * h + 4 * kk          # the first of its four 16-value sub-runs (8 lanes each)
                            scv = builder.shuffle_vector(sc, sc, ir.Constant(ir.VectorType(i32, 32),
                                                                             [m + i // 8 for i in range(32)]))
                            acc_i = _i8_block_dot(builder, acc_i, q, x8, builder.add(x0, c64(128 * h + 64 * kk)), scv)
                    off = _i8_block_offsets(builder, sc, sums, b)
                    acc_i = builder.sub(acc_i, builder.shl(off, ir.Constant(v16i32, [5] * 16)))
                    dx = builder.fmul(d, builder.load(builder.gep(d8p, [b])))
                    return _fma(builder, builder.sitofp(acc_i, v16f), scales16(dx), acc), macc
                # the 16 scales x d x xd (two 16-value runs per 32-block) as one vector
                v8f = ir.VectorType(f32, 8)
                sc16 = builder.sitofp(bytes16(bp, 192), v16f)
                xd8 = builder.load(builder.bitcast(builder.gep(xdrow, [k0]), v8f.as_pointer()), align=4)
                xd16 = builder.shuffle_vector(xd8, xd8, ir.Constant(v16i32, [i // 2 for i in range(16)]))
                scale16 = builder.fmul(builder.fmul(scales16(d), sc16), xd16)
                for h in range(2):
                    hb_all = builder.zext(bytes32(bp, 128 + 32 * h), v32i16)
                    for k in range(4):
                        lo = builder.zext(bytes32(bp, 64 * h + 32 * (k & 1)), v32i16)
                        lo = builder.lshr(lo, splat32(4)) if k >= 2 else builder.and_(lo, splat32(15))
                        hb = builder.shl(builder.and_(builder.lshr(hb_all, splat32(2 * k)), splat32(3)), splat32(4))
                        q = builder.sub(builder.or_(lo, hb), splat32(32))
                        p = madd32(q, builder.add(x0, c64(128 * h + 32 * k)))     # lanes 0-7: run 0, 8-15: run 1
                        m = 8 * h + 2 * k
                        sv = builder.shuffle_vector(scale16, scale16, ir.Constant(v16i32, [m] * 8 + [m + 1] * 8))
                        acc = _fma(builder, builder.sitofp(p, v16f), sv, acc)
                return acc, macc


            def block(b, acc, macc):
                bp = builder.gep(qrow, [builder.mul(b, c64(size))])
                x0 = builder.mul(b, c64(256))       # first value of the block
                k0 = builder.mul(b, c64(8))         # first 32-block of the block (xd, xs)

                def xd_at(k):
                    return builder.load(builder.gep(xdrow, [builder.add(k0, c64(k))]))

                if fmt in ("q5_0", "q5_1"):
                    # 32 values: nibbles at `at` (value j low, j + 16 high), bit j of the u32 qh is bit 4 of value j
                    one = fmt == "q5_1"
                    at = 4 if one else 2
                    d = f16(bp, 0)
                    x32 = builder.mul(b, c64(32))
                    qh = builder.load(builder.bitcast(builder.gep(bp, [c64(at)]), i32.as_pointer()), align=1)
                    nib = builder.zext(bytes16(bp, at + 4), v16i16)
                    masks = ir.Constant(v16i16, [1 << j for j in range(16)])
                    p32 = None
                    for half in (0, 1):
                        q = builder.and_(nib, splat16(15)) if half == 0 else builder.lshr(nib, splat16(4))
                        h16 = builder.trunc(builder.lshr(qh, ir.Constant(i32, 16 * half)), i16)
                        hv = builder.insert_element(ir.Constant(v16i16, ir.Undefined), h16, ir.Constant(i32, 0))
                        hv = builder.shuffle_vector(hv, hv, ir.Constant(ir.VectorType(i32, 16), [0] * 16))
                        set_ = builder.icmp_unsigned("!=", builder.and_(hv, masks), ir.Constant(v16i16, [0] * 16))
                        # bit 4 of the value; q5_0 also subtracts 16: q - 16 = nibble - (bit ? 0 : 16)
                        add = builder.select(set_, splat16(0 if not one else 16), splat16(-16 if not one else 0))
                        q = builder.add(q, add)
                        m = madd(q, builder.add(x32, c64(16 * half)))
                        p32 = m if p32 is None else builder.add(p32, m)
                    acc = scaled(acc, p32, builder.fmul(d, builder.load(builder.gep(xdrow, [b]))))
                    if one:
                        macc = _fma(builder, f16(bp, 2), builder.load(builder.gep(xsrow, [b])), macc)
                    return acc, macc

                if fmt in ("q4_k", "q5_k"):    # q5_k: 32 bytes qh at 16 (bit j of byte l: bit 4 of value 32 j + l)
                    five = fmt == "q5_k"
                    q0 = 48 if five else 16
                    d, dmin = f16(bp, 0), f16(bp, 2)
                    msum = ir.Constant(f32, 0.0)
                    for c in range(4):
                        for j in (2 * c, 2 * c + 1):
                            sc, mn = scale_min_k4(bp, j)
                            high = j & 1
                            p32 = None
                            for half in (0, 1):
                                q = builder.zext(bytes16(bp, q0 + 32 * c + 16 * half), v16i16)
                                q = builder.lshr(q, splat16(4)) if high else builder.and_(q, splat16(15))
                                if five:
                                    h = builder.zext(bytes16(bp, 16 + 16 * half), v16i16)
                                    h = builder.shl(builder.and_(builder.lshr(h, splat16(j)), splat16(1)), splat16(4))
                                    q = builder.or_(q, h)
                                m = madd(q, builder.add(x0, c64(64 * c + 32 * high + 16 * half)))
                                p32 = m if p32 is None else builder.add(p32, m)
                            scale = builder.fmul(builder.fmul(d, builder.uitofp(sc, f32)), xd_at(j))
                            acc = scaled(acc, p32, scale)
                            xs_j = builder.load(builder.gep(xsrow, [builder.add(k0, c64(j))]))
                            msum = _fma(builder, builder.uitofp(mn, f32), xs_j, msum)
                    macc = _fma(builder, builder.fneg(dmin), msum, macc)
                    return acc, macc

                # q6_k: value = d * sc * (q - 32), q = low nibble | high 2 bits << 4
                d = f16(bp, 208)
                for h in range(2):
                    for k in range(4):
                        for half in (0, 1):
                            lo = builder.zext(bytes16(bp, 64 * h + 32 * (k & 1) + 16 * half), v16i16)
                            lo = builder.lshr(lo, splat16(4)) if k >= 2 else builder.and_(lo, splat16(15))
                            hb = builder.zext(bytes16(bp, 128 + 32 * h + 16 * half), v16i16)
                            hb = builder.shl(builder.and_(builder.lshr(hb, splat16(2 * k)), splat16(3)), splat16(4))
                            q = builder.sub(builder.or_(lo, hb), splat16(32))
                            p32 = madd(q, builder.add(x0, c64(128 * h + 32 * k + 16 * half)))
                            sc = builder.sitofp(builder.load(builder.gep(bp, [c64(192 + 8 * h + 2 * k + half)])), f32)
                            acc = scaled(acc, p32, builder.fmul(builder.fmul(d, sc), xd_at(4 * h + k)))
                return acc, macc

            return block_wide if wide else block

        def token_rows(k):             # token t + k: its rows of the quantized activations
            tk = builder.add(t, ir.Constant(i64, k))
            return (_row_ptr(builder, xqdata, xqstr[0], tk, i16), _row_ptr(builder, xddata, xdstr[0], tk, f32),
                    _row_ptr(builder, xsdata, xsstr[0], tk, f32))

        if not span:
            qrow = _row_ptr(builder, qdata, qstr[0], r, i8)
            bodies = [body_for(qrow, *token_rows(k)) for k in range(tokens)]
            dots = _block_loop_multi(builder, nb, vtype, bodies)
            return dots[0] if tokens == 1 else context.make_tuple(builder, sig.return_type, dots)

        acts = token_rows(0)
        r1 = context.cast(builder, r1, sig.args[6], types.int64)
        return _span_rows(context, builder, r, r1, sig.args[7], dst,
                          lambda row: _block_loop_multi(builder, nb, vtype,
                                                        [body_for(_row_ptr(builder, qdata, qstr[0], row, i8), *acts)])[0])

    return intrinsic(span_typer if span else typer)


# the formats whose decode dot products take i8 activations on this host (the rest: i16)
I8_FORMATS = ("q4_k", "q6_k") if HAVE_VNNI else ()
row_dot_q4k_i16 = _make("q4_k")
row_dot_q5k_i16 = _make("q5_k")
row_dot_q6k_i16 = _make("q6_k")
row_dot_q50_i16 = _make("q5_0")
row_dot_q51_i16 = _make("q5_1")
# q2_k and q3_k have vector-IR versions for AVX-512 hosts only (kquant.py's Numba loops elsewhere)
row_dot_q2k_i16 = _make("q2_k", True) if WIDE else None
row_dot_q3k_i16 = _make("q3_k", True) if WIDE else None

# four tokens at a time (batched decode, prefill): the weights unpacked once for the four
TOKENS = 4
rows4_q4k_i16 = _make("q4_k", tokens=TOKENS)
rows4_q5k_i16 = _make("q5_k", tokens=TOKENS)
rows4_q6k_i16 = _make("q6_k", tokens=TOKENS)
rows4_q50_i16 = _make("q5_0", tokens=TOKENS)
rows4_q51_i16 = _make("q5_1", tokens=TOKENS)
rows4_q2k_i16 = _make("q2_k", True, tokens=TOKENS) if WIDE else None
rows4_q3k_i16 = _make("q3_k", True, tokens=TOKENS) if WIDE else None

# a span of rows for one token (decode): the per-row dispatch and set-up paid once a span
span_q4k_i16, span_q5k_i16, span_q6k_i16, span_q50_i16, span_q51_i16 = (
    _make(f, span=True) for f in ("q4_k", "q5_k", "q6_k", "q5_0", "q5_1"))
span_q2k_i16 = _make("q2_k", True, span=True) if WIDE else None
span_q3k_i16 = _make("q3_k", True, span=True) if WIDE else None

"""Scalar helpers that LLVM vectorises: a bit-exact-enough exp, sigmoid, and the f32 bitcast
they need (an llvmlite intrinsic, since Numba has no scalar bit reinterpretation).

`exp_f32` is Cephes' expf (range reduction by ln 2, degree-6 polynomial, exponent built in the
float's bits): within 2 ulp of libm over the range that matters, and, unlike a call to libm's
expf, it inlines into vector code. Inputs below -87.3 give exactly 0 (so -inf does), above 88.3 +inf.
"""

import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from isthmus.kernels.numba import FASTMATH


@intrinsic
def i32_as_f32(typingctx, i):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return sig, codegen


@intrinsic
def f16_to_f32(typingctx, h):
    """The f32 value of IEEE half bits (u16): F16C's vcvtph2ps where the host has it."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return sig, codegen


@intrinsic
def fma_f32(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma): fast-math reassociation cannot split it."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return _fma(builder, *args)
    return sig, codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)


@njit(inline="always", fastmath=FASTMATH, cache=True)
def exp_f32(x):
    x = np.float32(x)
    if x < np.float32(-87.3):
        return np.float32(0.0)
    if x > np.float32(88.3):
        return np.float32(np.inf)
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = fma_f32(k, -_LN2_LO, fma_f32(k, -_LN2_HI, x))    # Cody-Waite, immune to reassociation
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * i32_as_f32((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def sigmoid_f32(x):
    return np.float32(1.0) / (np.float32(1.0) + exp_f32(-x))


@njit(inline="always", fastmath=FASTMATH, cache=True)
def erf_f32(x):
    """Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, ~3e-7 in f32): branch-free, so loops over it
    vectorise, where libm's erf is a scalar call per element (7x slower in gelu)."""
    a = np.abs(np.float32(x))
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * a)
    p = np.float32(1.061405429)
    p = p * t - np.float32(1.453152027)
    p = p * t + np.float32(1.421413741)
    p = p * t - np.float32(0.284496736)
    p = p * t + np.float32(0.254829592)
    y = np.float32(1.0) - p * t * exp_f32(-a * a)
    return y if x >= np.float32(0.0) else -y


# -- block dot products written as LLVM vector IR ----------------------------------------------------
#
# Scales d (and offsets m) are f16 bits, as in the GGUF blocks. LLVM's loop vectoriser, left to itself, vectorises the block loop of a quantized dot product
# across blocks (gathers) instead of within a block. These intrinsics spell the loop out: one
# <16 x float> (4-bit) or <32 x float> (8-bit) accumulator kept across the row's blocks, each
# block's nibbles / bytes widened and converted in registers, one horizontal sum per row.
# The IR is target-neutral: LLVM lowers it to AVX-512, AVX2 or SSE as the host has.

def _array_parts(context, builder, aryty, value):
    from numba.core import cgutils

    ary = context.make_array(aryty)(context, builder, value)
    return ary.data, cgutils.unpack_tuple(builder, ary.strides, aryty.ndim), \
        cgutils.unpack_tuple(builder, ary.shape, aryty.ndim)


def _row_ptr(builder, data, stride, row, elem_ty):
    i8p = ir.IntType(8).as_pointer()
    base = builder.bitcast(data, i8p)
    p = builder.gep(base, [builder.mul(row, stride)])
    return builder.bitcast(p, elem_ty.as_pointer())


def _half(builder, bits):
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())


def _fma(builder, a, b, c):
    from numba.core import cgutils

    ty = a.type
    name = f"llvm.fma.v{ty.count}f32" if isinstance(ty, ir.VectorType) else "llvm.fma.f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)
    return builder.call(fn, [a, b, c])


class StrictFloats:
    """An IR builder whose float additions, subtractions and multiplications carry the one flag
    that changes nothing for them (`arcp` concerns division only). Numba's fastmath pass gives
    every flagless float op of a fastmath function `reassoc` and `contract`, with which LLVM may
    reorder or fuse this file's hand-ordered sums differently in different surroundings: a row's
    dot product would then depend on how many tokens share the call. With a flag they are left as
    written, and a token's dot is bitwise the same alone or beside others."""

    def __init__(self, builder):
        self._builder = builder

    def __getattr__(self, name):
        return getattr(self._builder, name)

    def fadd(self, a, b, name=""):
        return self._builder.fadd(a, b, name=name, flags=("arcp",))

    def fsub(self, a, b, name=""):
        return self._builder.fsub(a, b, name=name, flags=("arcp",))

    def fmul(self, a, b, name=""):
        return self._builder.fmul(a, b, name=name, flags=("arcp",))


def _reduce_fadd(builder, vec):
    width = vec.type.count
    while width > 1:     # pairwise halving: log2(width) shuffles and adds
        width //= 2
        lo = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(width))))
        hi = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), width),
                                                          list(range(width, 2 * width))))
        vec = builder.fadd(lo, hi)
    return builder.extract_element(vec, ir.Constant(ir.IntType(32), 0))


def _block_loop(builder, nb, vtype, body):
    """An LLVM loop over blocks b in [0, nb) carrying a vector and a scalar f32 accumulator:
    body(b, acc, macc) -> (acc', macc') emits one block's work. Returns hsum(acc) + macc (0.0 when
    nb == 0)."""
    return _block_loop_multi(builder, nb, vtype, [body])[0]


def _block_loop_multi(builder, nb, vtype, bodies):
    """`_block_loop` for several tokens in one loop: each body with its own accumulators, emitted
    one after the other in each block; one result per body."""
    f32, i64 = ir.FloatType(), ir.IntType(64)
    entry = builder.block
    loop = builder.append_basic_block("blocks")
    done = builder.append_basic_block("done")
    zero_v = ir.Constant(vtype, [0.0] * vtype.count)
    builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(i64, 0)), loop, done)

    builder.position_at_end(loop)
    b = builder.phi(i64)
    accs = [(builder.phi(vtype), builder.phi(f32)) for _ in bodies]
    outs = [body(b, acc, macc) for body, (acc, macc) in zip(bodies, accs)]
    b2 = builder.add(b, ir.Constant(i64, 1))
    b.add_incoming(ir.Constant(i64, 0), entry)
    b.add_incoming(b2, loop)
    for (acc, macc), (acc2, macc2) in zip(accs, outs):
        acc.add_incoming(zero_v, entry)
        acc.add_incoming(acc2, builder.block)
        macc.add_incoming(ir.Constant(f32, 0.0), entry)
        macc.add_incoming(macc2, builder.block)
    latch = builder.block
    builder.cbranch(builder.icmp_signed("<", b2, nb), loop, done)

    builder.position_at_end(done)
    finals = []
    for acc2, macc2 in outs:          # the phis first: LLVM wants them at the top of the block
        accf = builder.phi(vtype)
        accf.add_incoming(zero_v, entry)
        accf.add_incoming(acc2, latch)
        maccf = builder.phi(f32)
        maccf.add_incoming(ir.Constant(f32, 0.0), entry)
        maccf.add_incoming(macc2, latch)
        finals.append((accf, maccf))
    return [builder.fadd(_reduce_fadd(builder, accf), maccf) for accf, maccf in finals]


def _make_row_dot(bits: int):
    lanes = 16 if bits == 4 else 32
    qbytes = 16 if bits == 4 else 32

    def typer(typingctx, qs, d, m, r, x, t, sx):
        return types.float32(qs, d, m, r, x, t, sx), codegen

    def codegen(context, builder, sig, args):
        qs_t, d_t, m_t, _, x_t, _, sx_t = sig.args
        qs, d, m, r, x, t, sx = args
        f32, i64, i8 = ir.FloatType(), ir.IntType(64), ir.IntType(8)
        vf = ir.VectorType(f32, lanes)
        qdata, qstr, _ = _array_parts(context, builder, qs_t, qs)
        ddata, dstr, dshape = _array_parts(context, builder, d_t, d)
        mdata, mstr, _ = _array_parts(context, builder, m_t, m)
        xdata, xstr, _ = _array_parts(context, builder, x_t, x)
        sdata, sstr, _ = _array_parts(context, builder, sx_t, sx)
        r = context.cast(builder, r, sig.args[3], types.int64)
        t = context.cast(builder, t, sig.args[5], types.int64)
        qrow = _row_ptr(builder, qdata, qstr[0], r, i8)
        i16 = ir.IntType(16)
        drow = _row_ptr(builder, ddata, dstr[0], r, i16)
        xrow = _row_ptr(builder, xdata, xstr[0], t, f32)
        if bits == 4:
            mrow = _row_ptr(builder, mdata, mstr[0], r, i16)
            srow = _row_ptr(builder, sdata, sstr[0], t, f32)
        nb = dshape[1]

        def block(b, acc, macc):
            qp = builder.gep(qrow, [builder.mul(b, ir.Constant(i64, qbytes))])
            qv = builder.load(builder.bitcast(qp, ir.VectorType(i8, qbytes).as_pointer()), align=1)
            xo = builder.mul(b, ir.Constant(i64, 32))
            if bits == 4:
                lo = builder.and_(qv, ir.Constant(qv.type, [15] * 16))
                hi = builder.lshr(qv, ir.Constant(qv.type, [4] * 16))
                xl = builder.load(builder.bitcast(builder.gep(xrow, [xo]), vf.as_pointer()), align=4)
                xh = builder.load(builder.bitcast(builder.gep(xrow, [builder.add(xo, ir.Constant(i64, 16))]),
                                                  vf.as_pointer()), align=4)
                s = builder.fmul(builder.uitofp(lo, vf), xl)
                s = _fma(builder, builder.uitofp(hi, vf), xh, s)
                mb = _half(builder, builder.load(builder.gep(mrow, [b])))
                sb = builder.load(builder.gep(srow, [b]))
                macc2 = _fma(builder, mb, sb, macc)
            else:
                xv = builder.load(builder.bitcast(builder.gep(xrow, [xo]), vf.as_pointer()), align=4)
                s = builder.fmul(builder.sitofp(qv, vf), xv)
                macc2 = macc
            db = _half(builder, builder.load(builder.gep(drow, [b])))
            dv = builder.insert_element(ir.Constant(vf, ir.Undefined), db, ir.Constant(ir.IntType(32), 0))
            dv = builder.shuffle_vector(dv, dv, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
            acc2 = _fma(builder, s, dv, acc)
            return acc2, macc2

        return _block_loop(builder, nb, vf, block)

    return intrinsic(typer)


row_dot_q4 = _make_row_dot(4)
row_dot_q8 = _make_row_dot(8)


_FOPI = np.float32(1.27323954473516)        # 4 / pi
_DP1, _DP2, _DP3 = np.float32(0.78515625), np.float32(2.4187564849853515625e-4), np.float32(3.77489497744594108e-8)


@njit(inline="always", cache=True)
def sincos_f32(x):
    """(sin x, cos x) for 0 <= x < 8192 (rope angles), Cephes' sinf/cosf: quadrant reduction by
    pi/4 in three parts, then the two polynomials; branch-free so a loop of it vectorises.
    Still, call it from code compiled without fast-math: Numba inlines with the caller's flags."""
    j = np.int32(x * _FOPI)
    j = (j + np.int32(1)) & np.int32(-2)
    y = np.float32(j)
    z = fma_f32(y, -_DP3, fma_f32(y, -_DP2, fma_f32(y, -_DP1, x)))
    zz = z * z
    ps = ((np.float32(-1.9515295891e-4) * zz + np.float32(8.3321608736e-3)) * zz
          - np.float32(1.6666654611e-1)) * zz * z + z
    pc = ((np.float32(2.443315711809948e-5) * zz - np.float32(1.388731625493765e-3)) * zz
          + np.float32(4.166664568298827e-2)) * zz * zz - np.float32(0.5) * zz + np.float32(1.0)
    q = j & np.int32(7)
    swap = (q & np.int32(2)) != 0
    s = pc if swap else ps
    c = ps if swap else pc
    s = -s if (q & np.int32(4)) != 0 else s
    c = -c if ((q + np.int32(2)) & np.int32(4)) != 0 else c
    return s, c


# -- int16 activations: x quantized per 32-block, dotted with the weights' integers -------------------
#
# AVX2 integer dot products: the weights' 4-bit (0..15; their offset lives in m) or 8-bit values are
# widened to i16 and multiplied with the activations quantized to i16 (scale amax / 32767) by
# vpmaddwd (i16 x i16 -> pairwise i32 sums); one conversion and one FMA per 32 weights, about half
# the instructions of the f32 path. i16 rather than llama.cpp's i8 activations: the rounding error
# (1.5e-5 of a block's largest value) is below what turns a greedy choice, so the target keeps the
# reference's greedy continuations. Nothing overflows: 32 * 127 * 32767 < 2^31.
# Used only where the host has AVX2 (`HAVE_AVX2`).

def _host_has_avx2() -> bool:
    try:
        from llvmlite import binding as llb
        return "+avx2" in llb.get_host_cpu_features().flatten().split(",")
    except Exception:        # pragma: no cover - llvmlite without the query
        return False


HAVE_AVX2 = _host_has_avx2()


def _x86(builder, name, ret, args):
    from numba.core import cgutils

    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _span_rows(context, builder, r0, r1, dst_ty, dst, dot_of_row):
    """An LLVM loop over rows r0 .. r1 - 1 storing dst[i] = dot_of_row(r0 + i) (an i64 row): the
    row-invariant set-up emitted before it stays outside it."""
    i64 = ir.IntType(64)
    ddata, _, _ = _array_parts(context, builder, dst_ty, dst)
    dst_p = builder.bitcast(ddata, ir.FloatType().as_pointer())
    entry = builder.block
    head = builder.append_basic_block("rows")
    done = builder.append_basic_block("rows_done")
    builder.cbranch(builder.icmp_signed("<", r0, r1), head, done)
    builder.position_at_end(head)
    row = builder.phi(i64)
    row.add_incoming(r0, entry)
    builder.store(dot_of_row(row), builder.gep(dst_p, [builder.sub(row, r0)]))
    nxt = builder.add(row, ir.Constant(i64, 1))
    row.add_incoming(nxt, builder.block)
    builder.cbranch(builder.icmp_signed("<", nxt, r1), head, done)
    builder.position_at_end(done)
    return context.get_dummy_value()


def _make_row_dot_i16(bits: int, tokens: int = 1, span: bool = False):
    """dot(W[r], x[t]) of q4/q8 rows with i16 activations; with `tokens` > 1 the dots of x[t] ..
    x[t + tokens - 1] as a tuple, each bitwise the one-token dot (kquant_simd._make says how); with
    `span`, (qs, d, m, r0, xq, xd, xs, t, r1, dst): dst[i] = the dot of row r0 + i, rows in a loop
    of their own (kquant_simd._make says why)."""
    def typer(typingctx, qs, d, m, r, xq, xd, xs, t):
        ret = types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens)
        return ret(qs, d, m, r, xq, xd, xs, t), codegen

    def span_typer(typingctx, qs, d, m, r, xq, xd, xs, t, r1, dst):
        return types.none(qs, d, m, r, xq, xd, xs, t, r1, dst), codegen

    def codegen(context, builder, sig, args):
        builder = StrictFloats(builder)
        qs_t, d_t, m_t, _, xq_t, xd_t, xs_t, _ = sig.args[:8]
        qs, d, m, r, xq, xd, xs, t = args[:8]
        f32, i64, i32, i16, i8 = ir.FloatType(), ir.IntType(64), ir.IntType(32), ir.IntType(16), ir.IntType(8)
        v16i8, v16i16, v8i32, v8f = (ir.VectorType(i8, 16), ir.VectorType(i16, 16), ir.VectorType(i32, 8),
                                     ir.VectorType(f32, 8))
        qdata, qstr, _ = _array_parts(context, builder, qs_t, qs)
        ddata, dstr, dshape = _array_parts(context, builder, d_t, d)
        mdata, mstr, _ = _array_parts(context, builder, m_t, m)
        xqdata, xqstr, _ = _array_parts(context, builder, xq_t, xq)
        xddata, xdstr, _ = _array_parts(context, builder, xd_t, xd)
        xsdata, xsstr, _ = _array_parts(context, builder, xs_t, xs)
        r = context.cast(builder, r, sig.args[3], types.int64)
        t = context.cast(builder, t, sig.args[7], types.int64)
        nb = dshape[1]

        def body_for(r, tk):
            qrow = _row_ptr(builder, qdata, qstr[0], r, i8)
            drow = _row_ptr(builder, ddata, dstr[0], r, i16)
            mrow = _row_ptr(builder, mdata, mstr[0], r, i16) if bits == 4 else None
            xqrow = _row_ptr(builder, xqdata, xqstr[0], tk, i16)
            xdrow = _row_ptr(builder, xddata, xdstr[0], tk, f32)
            xsrow = _row_ptr(builder, xsdata, xsstr[0], tk, f32) if bits == 4 else None

            def block(b, acc, macc):
                xo = builder.mul(b, ir.Constant(i64, 32))
                xl = builder.load(builder.bitcast(builder.gep(xqrow, [xo]), v16i16.as_pointer()), align=2)
                xh = builder.load(builder.bitcast(builder.gep(xqrow, [builder.add(xo, ir.Constant(i64, 16))]),
                                                  v16i16.as_pointer()), align=2)
                if bits == 4:
                    qv = builder.load(builder.bitcast(builder.gep(qrow, [builder.mul(b, ir.Constant(i64, 16))]),
                                                      v16i8.as_pointer()), align=1)
                    w16 = builder.zext(qv, v16i16)
                    lo = builder.and_(w16, ir.Constant(v16i16, [15] * 16))
                    hi = builder.lshr(w16, ir.Constant(v16i16, [4] * 16))
                    mb = _half(builder, builder.load(builder.gep(mrow, [b])))
                    sb = builder.load(builder.gep(xsrow, [b]))
                    macc2 = _fma(builder, mb, sb, macc)
                else:
                    qp = builder.gep(qrow, [xo])
                    lo = builder.sext(builder.load(builder.bitcast(qp, v16i8.as_pointer()), align=1), v16i16)
                    hi = builder.sext(builder.load(builder.bitcast(builder.gep(qp, [ir.Constant(i64, 16)]),
                                                                   v16i8.as_pointer()), align=1), v16i16)
                    macc2 = macc
                p32 = builder.add(_x86(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [lo, xl]),
                                  _x86(builder, "llvm.x86.avx2.pmadd.wd", v8i32, [hi, xh]))
                db = _half(builder, builder.load(builder.gep(drow, [b])))
                scale = builder.fmul(db, builder.load(builder.gep(xdrow, [b])))
                sv = builder.insert_element(ir.Constant(v8f, ir.Undefined), scale, ir.Constant(i32, 0))
                sv = builder.shuffle_vector(sv, sv, ir.Constant(v8i32, [0] * 8))
                acc2 = _fma(builder, builder.sitofp(p32, v8f), sv, acc)
                return acc2, macc2
            return block

        if span:
            r1 = context.cast(builder, args[8], sig.args[8], types.int64)
            return _span_rows(context, builder, r, r1, sig.args[9], args[9],
                              lambda row: _block_loop_multi(builder, nb, v8f, [body_for(row, t)])[0])
        bodies = [body_for(r, builder.add(t, ir.Constant(i64, k))) for k in range(tokens)]
        dots = _block_loop_multi(builder, nb, v8f, bodies)
        return dots[0] if tokens == 1 else context.make_tuple(builder, sig.return_type, dots)

    return intrinsic(span_typer if span else typer)


row_dot_q4_i16 = _make_row_dot_i16(4)
row_dot_q8_i16 = _make_row_dot_i16(8)
rows4_q4_i16 = _make_row_dot_i16(4, tokens=4)     # four tokens at a time (batched decode, prefill)
rows4_q8_i16 = _make_row_dot_i16(8, tokens=4)
span_q4_i16 = _make_row_dot_i16(4, span=True)     # a span of rows for one token (decode)
span_q8_i16 = _make_row_dot_i16(8, span=True)

_Q16 = np.float32(32767.0)
_Q8 = np.float32(127.0)


def _host_has_vnni() -> bool:
    try:
        from llvmlite import binding as llb
        feats = llb.get_host_cpu_features().flatten().split(",")
    except Exception:        # pragma: no cover - llvmlite without the query
        return False
    return "+avx512vnni" in feats and "+avx512bw" in feats


# AVX-512 VNNI's vpdpbusd multiplies 64 u8 x s8 pairs and adds them in fours into 16 i32 lanes: one
# instruction for what takes a widening, a vpmaddwd and half the conversions on the i16 path. The
# K-quant kernels use it with i8 activations (as llama.cpp's q8_K) where the host has it;
# ISTHMUS_NUMBA_AVX512=0 turns it off with the other 512-bit code (comparison only).
HAVE_VNNI = _host_has_vnni() and os.environ.get("ISTHMUS_NUMBA_AVX512", "1") != "0"


@njit(fastmath=False, cache=True)
def quantize_rows_i16(x, xq, xd, xs):
    """x [n, k] f32 -> per 32-block i16 xq, scale xd = amax / 32767 and xs = xd * sum(xq)
    (the sum carries the 4-bit formats' offsets m). Rounds half away from zero.

    Where xq has the columns `i8_columns` asks for, they also hold x quantized to i8 per 256-value
    block, for the VNNI kernels (layout there); an xd of no columns skips the i16 part (a launch
    whose weights all read the i8 one)."""
    cols = x.shape[1]
    with_i8 = xq.shape[1] >= i8_columns_all(cols)
    for t in range(x.shape[0]):
        for b in range(xd.shape[1]):
            amax = _amax(x[t], 32 * b, 32)
            dd = amax / _Q16
            inv = _Q16 / amax if amax > 0 else np.float32(0.0)
            s = np.int32(0)
            for j in range(32):
                q = _round(x[t, 32 * b + j] * inv)
                xq[t, 32 * b + j] = q
                s += q
            xd[t, b] = dd
            xs[t, b] = dd * np.float32(s)
        if with_i8:
            _quantize_row_i8(x[t], xq[t], cols)


@njit(fastmath=False, cache=True, inline="always")
def _amax(x, lo, n):
    """The largest |x[lo:lo + n]|, found as the largest bits of |x| (ordered as the values are, NaN
    above inf): an integer max, which LLVM vectorises without fast math."""
    bits = x.view(np.int32)
    top = np.int32(0)
    for j in range(lo, lo + n):
        top = max(top, bits[j] & np.int32(0x7FFFFFFF))
    return i32_as_f32(top)


@njit(fastmath=False, cache=True, inline="always")
def _round(v):
    """v rounded half away from zero, branch-free (loops of it vectorise). The callers scale by
    limit / amax, so |v| <= limit (times 1 + 2^-23) and no clamp is needed."""
    return np.int32(v + np.float32(0.5) * np.sign(v))


@njit(fastmath=False, cache=True, inline="always")
def _quantize_row_i8(x, xq, cols):
    """One row's i8 columns (i8_columns): values, a scale per 256 and sums per 16."""
    x8 = xq[cols:cols + cols // 2].view(np.int8)
    d8 = xq[cols + cols // 2:cols + cols // 2 + cols // 128].view(np.float32)
    sums = xq[cols + cols // 2 + cols // 128:i8_columns_all(cols)]
    for b in range(cols // 256):
        amax = _amax(x, 256 * b, 256)
        d8[b] = amax / _Q8
        inv8 = _Q8 / amax if amax > 0 else np.float32(0.0)
        for j in range(256):
            x8[256 * b + j] = _round(x[256 * b + j] * inv8)
        for g in range(16):
            s16 = np.int32(0)
            for j in range(16 * g, 16 * g + 16):
                s16 += np.int32(x8[256 * b + j])
            sums[16 * b + g] = s16


@njit(cache=True, inline="always")
def i8_columns_all(cols):
    return cols + cols // 2 + cols // 128 + cols // 16


def i8_columns(cols: int) -> int:
    """The columns of `quantize_rows_i16`'s xq for rows of `cols` values (a multiple of 256 where
    the i8 part is asked for: the VNNI formats' rows are). On hosts with VNNI kernels, after the
    `cols` i16 values, x quantized to i8 per 256-value block as llama.cpp's q8_K: the i8 values
    (two per column), each block's scale amax / 127 as f32 (two columns), and each 16 values' sum
    of their i8 values as i16 (the q4_k mins and q6_k's offset of 32 meet the same activations as
    the integers do, so their errors cancel as in the file's own arithmetic). One scale per 256
    values lets a block's integer products be summed in i32 with the weights' integer sub-block
    scales (vpmaddubsw, then vpdpwssd), converted to float once a block."""
    return i8_columns_all(cols) if HAVE_VNNI else cols

"""What each instruction does: `SEMANTICS[op](machine, ins)` checks the instruction against the
machine and returns a zero-argument closure over numpy views (None for pure sync instructions).

This file and `isa.OPS` are the definition of the machine; tests compare every op with numpy.
Errors are raised as NpuError with the bare rule; `sim.prepare` adds the instruction's index and text.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np

from isthmus.errors import NpuError
from isthmus.npu.isa import COMPUTE_SPACES, DTYPES, OPS, Instruction
from isthmus.npu.sim import F32, Machine, chain, compute_into, convert, f32_kwargs, round_to

SEMANTICS: dict = {}
ALU = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "max": np.maximum,
       "min": np.minimum}
REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}
CMP = {"ge": np.greater_equal, "gt": np.greater, "le": np.less_equal, "lt": np.less, "eq": np.equal,
       "ne": np.not_equal}


def semantics(*names):
    def register(fn):
        for n in names:
            SEMANTICS[n] = fn
        return fn
    return register


def operands(m: Machine, ins: Instruction, *names, spaces=COMPUTE_SPACES):
    """Views of the named AP operands, checking which memories this instruction's engine may touch."""
    out = []
    for n in names:
        a = ins.args[n]
        if a.space not in spaces:
            eng = OPS[ins.op].engine
            raise NpuError(f"{n} is in {a.space.upper()}, which the {eng} engine cannot access "
                           f"({' or '.join(s.upper() for s in spaces)} only)")
        out.append(m.view(a, n))
    return out


def same_shape(**views):
    shapes = {n: v.shape for n, v in views.items()}
    if len(set(shapes.values())) > 1:
        raise NpuError("shape mismatch (partitions, *free dims): " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


def per_partition(m: Machine, ins: Instruction, name: str, like: np.ndarray):
    """A `scalar` field: a python float, or a per-partition AP as a view broadcastable to `like`."""
    a = ins.args[name]
    if not hasattr(a, "space"):
        return float(a)
    (v,) = operands(m, ins, name)
    if a.count != like.shape[0] or a.free_elems != 1:
        raise NpuError(f"{name} must hold one element per partition for {like.shape[0]} partitions, got {v.shape}")
    return v.reshape((a.count,) + (1,) * (like.ndim - 1))


def as_shape(m: Machine, v: np.ndarray, shape, slot: str):
    """(step, array) giving `v`'s elements, row-major, in `shape`: a view when numpy can make one,
    else a scratch buffer that `step()` refills on every run."""
    shape = tuple(shape)
    if v.shape == shape:
        return None, v
    r = v.reshape(shape)
    if np.may_share_memory(r, v):
        return None, r
    buf = m.scratch(shape, slot, v.dtype)
    return (lambda: np.copyto(buf, v.reshape(shape))), buf


@semantics("nop", "halt", "sem_wait", "sem_signal")
def _sync(m, ins):
    return None


@semantics("dma_copy")
def _dma_copy(m, ins):
    d, s = operands(m, ins, "dst", "src", spaces=("hbm", "sbuf"))
    dst, src = ins["dst"], ins["src"]
    if dst.count != src.count or dst.free_elems != src.free_elems:
        raise NpuError(f"dst has {dst.count} x {dst.free_elems} elements, src {src.count} x {src.free_elems} "
                       f"(partitions or rows x elements each)")
    step, s = as_shape(m, s, d.shape, "dma")
    return chain(step, convert(m, d, s))


@semantics("dma_core")
def _dma_core(m, ins):
    peers = getattr(m, "peers", None)
    if peers is None:
        raise NpuError("dma_core moves data between cores: run it in a chip program (npu.chip)")
    if ins["core"] >= len(peers):
        raise NpuError(f"core {ins['core']} does not exist ({len(peers)} cores)")
    (s,) = operands(m, ins, "src", spaces=("hbm", "sbuf"))
    dst, src = ins["dst"], ins["src"]
    if dst.space != "sbuf":
        raise NpuError(f"dma_core writes another core's SBUF, not {dst.space.upper()}")
    d = peers[ins["core"]].view(dst, "dst")
    if dst.count != src.count or dst.free_elems != src.free_elems:
        raise NpuError(f"dst has {dst.count} x {dst.free_elems} elements, src {src.count} x {src.free_elems}")
    step, s = as_shape(m, s, d.shape, "dma")
    return chain(step, convert(m, d, s))


@semantics("sem_signal_core")
def _sem_signal_core(m, ins):
    return None


@semantics("dma_gather")
def _dma_gather(m, ins):
    (d,) = operands(m, ins, "dst", spaces=("sbuf",))
    (t,) = operands(m, ins, "table", spaces=("hbm",))
    (ix,) = operands(m, ins, "index", spaces=("sbuf",))
    dst, table, index = ins["dst"], ins["table"], ins["index"]
    if index.dtype != "i32" or index.free_elems != 1 or index.count != dst.count:
        raise NpuError(f"index must be i32 with one element for each of the {dst.count} dst partitions, "
                       f"got {index.dtype} {ix.shape}")
    if table.free_elems != dst.free_elems:
        raise NpuError(f"a table row has {table.free_elems} elements, a dst partition {dst.free_elems}")
    rows, idx = table.count, ix.reshape(index.count)
    if t.shape[1:] != d.shape[1:]:
        raise NpuError(f"table rows {t.shape[1:]} and dst partitions {d.shape[1:]} need the same free dims")
    buf = m.scratch(d.shape, "gather", t.dtype)
    store = convert(m, d, buf)

    def run():
        lo, hi = idx.min(), idx.max()
        if lo < 0 or hi >= rows:
            p = int(np.flatnonzero((idx < 0) | (idx >= rows))[0])
            raise NpuError(f"gather index {int(idx[p])} (dst partition {p}) is outside the table's {rows} rows")
        np.take(t, idx, axis=0, out=buf)
        if store is not None:
            store()
    return run


@semantics("matmul")
def _matmul(m, ins):
    cfg = m.cfg
    (d,) = operands(m, ins, "dst", spaces=("psum",))
    sv, mv = operands(m, ins, "stationary", "moving", spaces=("sbuf",))
    dst, sta, mov = ins["dst"], ins["stationary"], ins["moving"]
    k, mm, n = mov.count, sta.free_elems, mov.free_elems
    if sta.count != k or sta.start != mov.start:
        raise NpuError(f"stationary (partitions {sta.start}:{sta.start + sta.count}) and moving "
                       f"({mov.start}:{mov.start + mov.count}) must use the same K partitions")
    limits = [("K (contraction partitions)", k, cfg.pe_rows), ("M (stationary columns)", mm, cfg.pe_cols),
              ("N (moving columns)", n, cfg.moving_max)]
    for what, v, hi in limits:
        if v > hi:
            raise NpuError(f"{what} = {v} exceeds the maximum {hi}")
    for what, a in (("stationary", sta), ("dst", dst)):
        if a.start % cfg.pe_partition_align:
            raise NpuError(f"misaligned {what}: partition start {a.start} is not a multiple of "
                           f"{cfg.pe_partition_align}")
    if dst.count != mm or dst.free_elems != n:
        raise NpuError(f"dst must be [M={mm}, N={n}], got {dst.count} partitions x {dst.free_elems}")
    ints = sta.dtype == "i8"
    if sta.dtype != mov.dtype or (ints and dst.dtype != "i32") or (not ints and dst.dtype != "f32") \
            or sta.dtype == "i32":
        raise NpuError(f"dtypes: stationary {sta.dtype}, moving {mov.dtype}, dst {dst.dtype}; operands share "
                       f"a float dtype with an f32 dst, or are i8 with an i32 dst")
    bank = cfg.psum_bank_bytes
    last = dst.offset + dst.extent - 1
    if dst.offset // bank != last // bank:
        raise NpuError(f"dst bytes {dst.offset:#x}..{last:#x} cross a {bank}-byte PSUM bank boundary")
    acc = ins["acc"]
    wide = np.float64 if ints else F32
    bufs = []
    for v, shape, slot in ((sv, (k, mm), "mm_s"), (mv, (k, n), "mm_m")):
        if v.dtype == wide and v.ndim == 2:
            bufs.append((None, v))
        else:
            buf = m.scratch(v.shape, slot, wide)
            bufs.append((partial(np.copyto, buf, v, casting="unsafe"), buf.reshape(shape)))
    (ls, s2), (lm, m2) = bufs
    out = m.scratch((mm, n), "mm_out", wide)
    res = out.reshape(d.shape)
    if ints:
        res32 = m.scratch(d.shape, "mm_i32", np.int32)
        fin = chain(partial(np.copyto, res32, res, casting="unsafe"),
                    partial(np.add, d, res32, out=d) if acc else partial(np.copyto, d, res32))
    elif not acc and d.ndim == 2:                               # straight into PSUM
        return chain(ls, lm, partial(np.matmul, s2.T, m2, out=d))
    else:
        fin = partial(np.add, d, res, out=d) if acc else partial(np.copyto, d, res)
    return chain(ls, lm, partial(np.matmul, s2.T, m2, out=out), fin)


@semantics("transpose")
def _transpose(m, ins):
    d, s = operands(m, ins, "dst", "src")
    if d.ndim != 2 or s.ndim != 2 or d.shape != s.shape[::-1]:
        raise NpuError(f"transpose needs src [P, F] and dst [F, P] with one free dim each, got src {s.shape}, "
                       f"dst {d.shape}")
    return convert(m, d, s.T, "transpose")


@semantics("tensor_tensor")
def _tensor_tensor(m, ins):
    d, a, b = operands(m, ins, "dst", "src0", "src1")
    same_shape(dst=d, src0=a, src1=b)
    return compute_into(m, d, ALU[ins["op"]], a, b)


@semantics("tensor_scalar")
def _tensor_scalar(m, ins):
    d, a = operands(m, ins, "dst", "src")
    same_shape(dst=d, src=a)
    return compute_into(m, d, ALU[ins["op"]], a, per_partition(m, ins, "scalar", d))


@semantics("tensor_reduce")
def _tensor_reduce(m, ins):
    d, s = operands(m, ins, "dst", "src")
    shape = s.shape[:-1] if s.ndim > 2 else (s.shape[0], 1)
    if d.shape[0] != s.shape[0] or math.prod(d.shape[1:]) != math.prod(shape[1:]):
        raise NpuError(f"reducing src {s.shape} over its last dim leaves {shape}; dst is {d.shape}")
    reduce = REDUCE[ins["op"]].reduce
    direct = d.reshape(s.shape[:-1])
    if d.dtype == F32 and np.may_share_memory(direct, d) and not np.may_share_memory(d, s):
        return partial(reduce, s, axis=-1, out=direct, **({} if s.dtype == F32 else {"dtype": F32}))
    out = m.scratch(s.shape[:-1], "red")
    return chain(partial(reduce, s, axis=-1, out=out, **({} if s.dtype == F32 else {"dtype": F32})),
                 convert(m, d, out.reshape(d.shape)))


def _silu(t, t2):
    np.negative(t, out=t2)
    np.exp(t2, out=t2)
    t2 += 1.0
    np.divide(t, t2, out=t)


def _gelu(t, t2):
    np.multiply(t, t, out=t2)
    t2 *= 0.044715
    t2 += 1.0
    t2 *= t
    t2 *= math.sqrt(2.0 / math.pi)
    np.tanh(t2, out=t2)
    t2 += 1.0
    t *= t2
    t *= 0.5


def _gelu_erf(t, t2):
    from scipy.special import erf
    np.multiply(t, 1.0 / math.sqrt(2.0), out=t2)
    erf(t2, out=t2)
    t2 += 1.0
    t *= t2
    t *= 0.5


def _sigmoid(t, t2):
    np.negative(t, out=t)
    np.exp(t, out=t)
    t += 1.0
    np.reciprocal(t, out=t)


def _rsqrt(t, t2):
    np.sqrt(t, out=t)
    np.reciprocal(t, out=t)


# In-place fp32 activation functions f(t) (t2: scratch of t's shape). Keys must match isa.ACT_FUNCS.
ACT = {"identity": None, "exp": lambda t, t2: np.exp(t, out=t), "log": lambda t, t2: np.log(t, out=t),
       "silu": _silu, "gelu": _gelu, "gelu_erf": _gelu_erf, "tanh": lambda t, t2: np.tanh(t, out=t),
       "sigmoid": _sigmoid, "relu": lambda t, t2: np.maximum(t, 0.0, out=t),
       "sqrt": lambda t, t2: np.sqrt(t, out=t), "rsqrt": _rsqrt,
       "reciprocal": lambda t, t2: np.reciprocal(t, out=t), "square": lambda t, t2: np.square(t, out=t)}


# Activation functions that are one numpy ufunc (identity: a copy).
UNARY = {"identity": np.positive, "exp": np.exp, "log": np.log, "tanh": np.tanh, "sqrt": np.sqrt,
         "reciprocal": np.reciprocal, "square": np.square}
BF16, F16 = DTYPES["bf16"].np, np.dtype(np.float16)


@semantics("activate")
def _activate(m, ins):
    d, s = operands(m, ins, "dst", "src")
    same_shape(dst=d, src=s)
    scale, bias = per_partition(m, ins, "scale", d), per_partition(m, ins, "bias", d)
    t = m.scratch(d.shape, "act")
    t2 = m.scratch(d.shape, "act2")
    f = ACT[ins["func"]]
    unit_scale = isinstance(scale, float) and scale == 1.0
    no_bias = isinstance(bias, float) and bias == 0.0
    pre = [partial(np.copyto, t, s, casting="unsafe") if unit_scale
           else partial(np.multiply, s, scale, out=t, **f32_kwargs(s, scale)),
           None if no_bias else partial(np.add, t, bias, out=t, **f32_kwargs(bias))]
    single = UNARY.get(ins["func"])
    if single is not None and ins.args.get("accum") is None and d.dtype in (F32, BF16, F16):
        if unit_scale and no_bias:                               # one ufunc, rounding straight into dst
            return partial(single, s, out=d, **f32_kwargs(s, d))
        return chain(*pre, partial(single, t, out=d, **f32_kwargs(d)))
    steps = pre + [f and partial(f, t, t2)]
    if ins.args.get("accum") is not None:
        acc = ins["accum"]
        (av,) = operands(m, ins, "accum")
        if acc.count != d.shape[0] or acc.free_elems != 1:
            raise NpuError(f"accum must hold one element per partition for {d.shape[0]} partitions, got {av.shape}")
        total = m.scratch((d.shape[0],), "act_sum")
        steps += [partial(np.sum, t, axis=tuple(range(1, d.ndim)), out=total), convert(m, av.reshape(acc.count), total)]
    steps.append(convert(m, d, t))
    return chain(*steps)


def _affine(ins, shape, dtype=np.int64) -> np.ndarray:
    """base + pcoef*p + c0*i0 + c1*i1 + c2*i2 over `shape` (int64)."""
    nfree = len(shape) - 1
    for j in range(nfree, 3):
        if ins[f"c{j}"]:
            raise NpuError(f"c{j} = {ins[f'c{j}']} multiplies free dim {j}, which dst does not have")
    val = np.full(shape, ins["base"], dtype)
    for axis, coef in enumerate([ins["pcoef"]] + [ins[f"c{j}"] for j in range(nfree)]):
        if coef:
            idx = np.arange(shape[axis], dtype=dtype).reshape([-1 if a == axis else 1 for a in range(len(shape))])
            val = val + coef * idx
    return val


@semantics("select")
def _select(m, ins):
    d, s = operands(m, ins, "dst", "src")
    same_shape(dst=d, src=s)
    coefs = tuple(ins[k] for k in ("base", "pcoef", "c0", "c1", "c2"))
    keep_not = m.memo(("select", d.shape, ins["cmp"], coefs), lambda: ~CMP[ins["cmp"]](_affine(ins, d.shape), 0))
    fill = round_to(ins["dst"].dtype, ins["fill"])
    in_place = ins["dst"] == ins["src"]
    return chain(None if in_place else convert(m, d, s, "sel"), partial(np.copyto, d, fill, where=keep_not))


@semantics("iota")
def _iota(m, ins):
    (d,) = operands(m, ins, "dst")
    values = _affine(ins, d.shape).astype(np.int32)            # computed in i32 (wrapping)
    const = values if d.dtype == np.int32 else round_to(ins["dst"].dtype, values.astype(F32))
    return partial(np.copyto, d, const)


@semantics("copy")
def _copy(m, ins):
    d, s = operands(m, ins, "dst", "src")
    if d.shape[0] != s.shape[0] or d[0].size != s[0].size:
        raise NpuError(f"copy needs equal partitions and elements per partition: dst {d.shape}, src {s.shape}")
    step, s = as_shape(m, s, d.shape, "copy")
    return chain(step, convert(m, d, s))


@semantics("dequant")
def _dequant(m, ins):
    if ins["engine"] not in ("vector", "act"):
        raise NpuError(f"dequant runs on vector or act, not {ins['engine']}")
    d, s, sc, z = operands(m, ins, "dst", "src", "scale", "zero")
    a, g = ins.args, ins["group"]
    parts, n = a["dst"].count, a["dst"].free_elems
    if a["src"].count != parts or a["scale"].count != parts or a["zero"].count != parts:
        raise NpuError("dequant: dst, src, scale and zero must have the same partitions")
    if ins["packed"] and a["src"].dtype != "u8":
        raise NpuError(f"dequant packed=1 reads u8 pairs of 4-bit values, got src {a['src'].dtype}")
    if a["src"].free_elems * (2 if ins["packed"] else 1) != n:
        raise NpuError(f"dequant: src has {a['src'].free_elems} elements per partition for {n} dst elements"
                       + (" (two 4-bit values a byte)" if ins["packed"] else ""))
    if n % g or a["scale"].free_elems != n // g or a["zero"].free_elems != n // g:
        raise NpuError(f"dequant: {n} dst elements per partition in groups of {g} need {n // g if g else '?'} "
                       f"scale and zero elements, got {a['scale'].free_elems} and {a['zero'].free_elems}")
    s_step, s2 = as_shape(m, s, (parts, a["src"].free_elems), "dq_src")
    sc_step, sc2 = as_shape(m, sc, (parts, n // g, 1), "dq_scale")
    z_step, z2 = as_shape(m, z, (parts, n // g, 1), "dq_zero")
    q = m.scratch((parts, n // g, g), "dq_q")
    flat = q.reshape(parts, n)
    if ins["packed"]:
        lo, hi = flat[:, 0::2], flat[:, 1::2]

        def unpack():
            np.bitwise_and(s2, 15, out=lo, casting="unsafe")
            np.right_shift(s2, 4, out=hi, casting="unsafe")
        load = unpack
    else:
        load = partial(np.copyto, flat, s2, casting="unsafe")
    out = m.scratch((parts, n // g, g), "dq_out")
    d_step, d2 = as_shape(m, d, (parts, n // g, g), "dq_dst")
    if d_step is not None:                       # dst not viewable in that shape: write through a reshape
        return chain(s_step, sc_step, z_step, load, partial(np.multiply, q, sc2, out=out),
                     partial(np.add, out, z2, out=out), convert(m, d, out.reshape(d.shape)))
    return chain(s_step, sc_step, z_step, load, partial(np.multiply, q, sc2, out=out),
                 partial(np.add, out, z2, out=out), convert(m, d2, out))


@semantics("memset")
def _memset(m, ins):
    (d,) = operands(m, ins, "dst")
    return partial(np.copyto, d, round_to(ins["dst"].dtype, ins["value"]))

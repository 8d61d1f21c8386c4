"""Every instruction against a numpy computation written here (the simulator's own views move data in/out)."""

import math

import ml_dtypes
import numpy as np
import pytest
from scipy.special import erf

from isthmus.npu.isa import ACT_FUNCS, AP, DTYPES, OPS
from isthmus.npu.semantics import ACT, SEMANTICS


def test_every_op_has_semantics_and_every_act_func_an_implementation():
    assert set(SEMANTICS) == set(OPS)
    assert set(ACT) == set(ACT_FUNCS)


@pytest.mark.parametrize("src_dt,dst_dt", [("f32", "bf16"), ("bf16", "f32"), ("f32", "f16"), ("f32", "f8e4m3"),
                                           ("f32", "i8"), ("bf16", "bf16")])
def test_dma_copy_load_and_store_with_cast(rig, rng, src_dt, dst_dt):
    # HBM [64, 40] row-major; load rows 8..39, cols 4..27 into SBUF, cast, store back elsewhere.
    x = rng.standard_normal((64, 40)) * 20
    hbm = AP("hbm", src_dt, 0, 64, 0, ((40, 1),), 40)
    full = rig.put(hbm, x)
    src = AP("hbm", src_dt, 0, 32, (8 * 40 + 4) * DTYPES[src_dt].size, ((24, 1),), 40)
    dst = rig.sb(dst_dt, 32, 24, offset=64)
    rig.run("dma_copy", dst, src, queue=3)
    want = full[8:40, 4:28]
    if dst_dt == "i8":
        want = np.clip(np.rint(want), -128, 127)
    elif dst_dt == "f8e4m3":
        want = rig.rounded(np.clip(want, -448, 448), dst_dt)
    else:
        want = rig.rounded(want, dst_dt)
    np.testing.assert_array_equal(rig.get(dst), want)
    out = AP("hbm", dst_dt, 0, 32, 1 << 16, ((24, 1),), 24)
    rig.run("dma_copy", out, dst, queue=0)
    np.testing.assert_array_equal(rig.get(out), want)


def test_dma_copy_strided_transposing_load(rig, rng):
    """A DMA with a row stride of 1 and a free stride of the row length loads a transpose."""
    x = rig.put(AP("hbm", "f32", 0, 16, 0, ((8, 1),), 8), rng.standard_normal((16, 8)))
    dst = rig.sb("f32", 8, 16)
    rig.run("dma_copy", dst, AP("hbm", "f32", 0, 8, 0, ((16, 8),), 1), queue=0)
    np.testing.assert_array_equal(rig.get(dst), x.T)


def test_dma_copy_reshapes_by_element_order(rig, rng):
    x = rig.put(AP("hbm", "f32", 0, 4, 0, ((12, 1),), 12), rng.standard_normal((4, 12)))
    dst = AP("sbuf", "f32", 0, 4, 0, ((3, 4), (4, 1)))
    rig.run("dma_copy", dst, AP("hbm", "f32", 0, 4, 0, ((12, 1),), 12), queue=0)
    np.testing.assert_array_equal(rig.get(dst), x.reshape(4, 3, 4))


def test_dma_copy_gathers_a_strided_source_into_a_flat_row(rig, rng):
    """src walks each row column-major ({3:1, 4:3}); dst holds the 12 elements flat, in that order."""
    x = rig.put(AP("hbm", "f32", 0, 4, 0, ((12, 1),), 12), rng.standard_normal((4, 12)))
    rig.run("dma_copy", rig.sb("bf16", 4, 12), AP("hbm", "f32", 0, 4, 0, ((3, 1), (4, 3)), 12), queue=0)
    want = x.reshape(4, 4, 3).transpose(0, 2, 1).reshape(4, 12)
    np.testing.assert_array_equal(rig.get(rig.sb("bf16", 4, 12)), rig.rounded(want, "bf16"))


def test_dma_gather_embedding_rows(rig, rng):
    table = rig.put(AP("hbm", "bf16", 0, 50, 0, ((16, 1),), 16), rng.standard_normal((50, 16)))
    idx = np.array([3, 0, 49, 3, 17, 8], np.int32)
    rig.put(rig.sb("i32", 6, 1, offset=4096), idx[:, None])
    dst = rig.sb("f32", 6, 16)
    rig.run("dma_gather", dst, AP("hbm", "bf16", 0, 50, 0, ((16, 1),), 16), rig.sb("i32", 6, 1, offset=4096), queue=0)
    np.testing.assert_array_equal(rig.get(dst), table[idx])


@pytest.mark.parametrize("dt", ["bf16", "f16", "f32", "f8e4m3"])
@pytest.mark.parametrize("acc", [0, 1])
def test_matmul_float(rig, rng, dt, acc):
    k, m, n = 96, 64, 200
    a = rig.put(rig.sb(dt, k, m), rng.standard_normal((k, m)))
    b = rig.put(rig.sb(dt, k, n, offset=1024), rng.standard_normal((k, n)))
    c0 = rig.put(rig.ps(m, n), rng.standard_normal((m, n)))
    rig.run("matmul", rig.ps(m, n), rig.sb(dt, k, m), rig.sb(dt, k, n, offset=1024), acc=acc)
    want = (a.T @ b) + (c0 if acc else 0)
    np.testing.assert_allclose(rig.get(rig.ps(m, n)), want, rtol=1e-5, atol=1e-4)


def test_matmul_int8_accumulates_exactly_in_int32(rig, rng):
    k, m, n = 128, 32, 64
    a = rig.put(rig.sb("i8", k, m), rng.integers(-128, 128, (k, m)))
    b = rig.put(rig.sb("i8", k, n, offset=256), rng.integers(-128, 128, (k, n)))
    dst = rig.ps(m, n, dtype="i32")
    rig.run("matmul", dst, rig.sb("i8", k, m), rig.sb("i8", k, n, offset=256), acc=0)
    rig.run("matmul", dst, rig.sb("i8", k, m), rig.sb("i8", k, n, offset=256), acc=1)
    np.testing.assert_array_equal(rig.get(dst), 2 * (a.astype(np.int64).T @ b.astype(np.int64)))


def test_transpose(rig, rng):
    x = rig.put(rig.sb("bf16", 48, 100), rng.standard_normal((48, 100)))
    rig.run("transpose", rig.ps(100, 48, dtype="f32"), rig.sb("bf16", 48, 100))
    np.testing.assert_array_equal(rig.get(rig.ps(100, 48)), x.T)


@pytest.mark.parametrize("op,fn", [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                                   ("div", np.divide), ("max", np.maximum), ("min", np.minimum)])
def test_tensor_tensor(rig, rng, op, fn):
    a = rig.put(rig.sb("f32", 64, 33), rng.standard_normal((64, 33)))
    b = rig.put(rig.sb("bf16", 64, 33, offset=512), rng.standard_normal((64, 33)) + 3)
    dst = rig.sb("bf16", 64, 33, offset=1024)
    rig.run("tensor_tensor", dst, rig.sb("f32", 64, 33), rig.sb("bf16", 64, 33, offset=512), op=op)
    want = fn(a.astype(np.float32), b.astype(np.float32))
    np.testing.assert_array_equal(rig.get(dst), rig.rounded(want, "bf16"))


def test_tensor_scalar_immediate_and_per_partition(rig, rng):
    x = rig.put(rig.sb("f32", 20, 30), rng.standard_normal((20, 30)))
    rig.run("tensor_scalar", rig.sb("f32", 20, 30, offset=256), rig.sb("f32", 20, 30), op="sub", scalar=1.5)
    np.testing.assert_array_equal(rig.get(rig.sb("f32", 20, 30, offset=256)), (x.astype(np.float32) - 1.5))
    s = rig.put(rig.sb("bf16", 20, 1, offset=1024), rng.standard_normal((20, 1)))
    rig.run("tensor_scalar", rig.sb("f32", 20, 30, offset=256), rig.sb("f32", 20, 30), op="mul",
            scalar=rig.sb("bf16", 20, 1, offset=1024))
    np.testing.assert_array_equal(rig.get(rig.sb("f32", 20, 30, offset=256)),
                                  (x.astype(np.float32) * s.astype(np.float32)))


@pytest.mark.parametrize("op,fn", [("sum", np.sum), ("max", np.max), ("min", np.min)])
def test_tensor_reduce_over_the_innermost_free_dim(rig, rng, op, fn):
    src = AP("sbuf", "f32", 0, 16, 0, ((3, 10), (10, 1)))
    x = rig.put(src, rng.standard_normal((16, 3, 10)))
    dst = rig.sb("f32", 16, 3, offset=512)
    rig.run("tensor_reduce", dst, src, op=op)
    np.testing.assert_allclose(rig.get(dst), fn(x.astype(np.float32), axis=-1), rtol=1e-6)
    rig.run("tensor_reduce", rig.sb("f32", 16, 1, offset=1024), rig.sb("f32", 16, 30), op=op)
    np.testing.assert_allclose(rig.get(rig.sb("f32", 16, 1, offset=1024))[:, 0], fn(x.reshape(16, 30), axis=-1),
                               rtol=1e-6, atol=1e-5)


ACT_REFERENCE = {
    "identity": lambda x: x, "exp": np.exp, "log": np.log, "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "gelu_erf": lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2))), "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0), "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x), "reciprocal": lambda x: 1 / x, "square": lambda x: x * x}


@pytest.mark.parametrize("func", ACT_FUNCS)
def test_activate_every_function_with_scale_bias_and_fused_sum(rig, rng, func):
    positive = func in ("log", "sqrt", "rsqrt")
    x = rig.put(rig.sb("bf16", 32, 40), rng.uniform(0.5, 3, (32, 40)) if positive else rng.standard_normal((32, 40)))
    bias = rig.put(rig.sb("f32", 32, 1, offset=4096), rng.uniform(0.1, 0.5, (32, 1)))
    dst, acc = rig.sb("f32", 32, 40, offset=1024), rig.sb("f32", 32, 1, offset=4160)
    rig.run("activate", dst, rig.sb("bf16", 32, 40), func=func, scale=0.75, bias=rig.sb("f32", 32, 1, offset=4096),
            accum=acc)
    want = ACT_REFERENCE[func](x * 0.75 + bias)
    np.testing.assert_allclose(rig.get(dst), want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(rig.get(acc)[:, 0], want.sum(axis=1), rtol=1e-5, atol=1e-5)


def test_activate_rounds_to_a_bf16_destination(rig, rng):
    x = rig.put(rig.sb("f32", 8, 64), rng.standard_normal((8, 64)))
    rig.run("activate", rig.sb("bf16", 8, 64, offset=512), rig.sb("f32", 8, 64), func="exp")
    np.testing.assert_array_equal(rig.get(rig.sb("bf16", 8, 64, offset=512)), rig.rounded(np.exp(x.astype(np.float32)),
                                                                                         "bf16"))


def test_select_causal_mask(rig, rng):
    """Scores [q, k] for queries 16..31 against keys 0..31: keep k <= q, else -inf."""
    x = rig.put(rig.sb("f32", 16, 32), rng.standard_normal((16, 32)))
    dst = rig.sb("f32", 16, 32, offset=512)
    rig.run("select", dst, rig.sb("f32", 16, 32), cmp="ge", base=16, pcoef=1, c0=-1, fill=float("-inf"))
    q = np.arange(16)[:, None] + 16
    k = np.arange(32)[None, :]
    np.testing.assert_array_equal(rig.get(dst), np.where(q - k >= 0, x, -np.inf))


@pytest.mark.parametrize("cmp,fn", [("gt", np.greater), ("le", np.less_equal), ("lt", np.less), ("eq", np.equal),
                                    ("ne", np.not_equal)])
def test_select_predicates(rig, rng, cmp, fn):
    src = AP("sbuf", "f32", 0, 6, 0, ((4, 5), (5, 1)))
    x = rig.put(src, rng.standard_normal((6, 4, 5)))
    dst = AP("sbuf", "bf16", 0, 6, 256, ((4, 5), (5, 1)))
    rig.run("select", dst, src, cmp=cmp, base=-3, pcoef=2, c0=1, c1=-1, fill=7.0)
    p, i0, i1 = np.meshgrid(np.arange(6), np.arange(4), np.arange(5), indexing="ij")
    want = np.where(fn(-3 + 2 * p + i0 - i1, 0), rig.rounded(x, "bf16"), 7.0)
    np.testing.assert_array_equal(rig.get(dst), want)


def test_iota(rig):
    dst = AP("sbuf", "i32", 0, 8, 0, ((3, 4), (4, 1)))
    rig.run("iota", dst, base=5, pcoef=100, c0=10, c1=-1)
    p, i0, i1 = np.meshgrid(np.arange(8), np.arange(3), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(rig.get(dst), 5 + 100 * p + 10 * i0 - i1)
    rig.run("iota", rig.sb("bf16", 4, 300, offset=512), c0=1)
    np.testing.assert_array_equal(rig.get(rig.sb("bf16", 4, 300, offset=512)),
                                  rig.rounded(np.tile(np.arange(300), (4, 1)), "bf16"))


@pytest.mark.parametrize("dst_dt", ["bf16", "f16", "f8e4m3", "i8", "i32", "f32"])
def test_copy_psum_to_sbuf_with_cast(rig, rng, dst_dt):
    x = rig.put(rig.ps(128, 64), rng.standard_normal((128, 64)) * 300)
    x[0, :4] = [np.nan, np.inf, -np.inf, 1e6]
    rig.put(rig.ps(128, 64), x)
    rig.run("copy", rig.sb(dst_dt, 128, 64), rig.ps(128, 64))
    got = rig.get(rig.sb(dst_dt, 128, 64))
    if dst_dt in ("i8", "i32"):
        info = np.iinfo(dst_dt.replace("i", "int"))
        hi = float(np.nextafter(np.float32(info.max), 0)) if info.bits == 32 else info.max
        want = np.clip(np.nan_to_num(np.rint(x.astype(np.float32)), nan=0, posinf=hi, neginf=info.min), info.min, hi)
    elif dst_dt == "f8e4m3":
        want = rig.rounded(np.clip(x, -448, 448), dst_dt)
    else:
        want = rig.rounded(x, dst_dt)
    np.testing.assert_array_equal(got, want)


def test_memset_and_nop_like_sync_ops(rig):
    rig.run("memset", rig.sb("bf16", 128, 7), value=0.1)
    assert (rig.get(rig.sb("bf16", 128, 7)) == float(np.float32(0.1).astype(ml_dtypes.bfloat16))).all()
    before = rig.m.sbuf.copy()
    for op, fields in [("nop", {"engine": "vector"}), ("sem_signal", {"engine": "act", "sem": 1}),
                       ("sem_wait", {"engine": "tensor", "sem": 1, "value": 0}), ("halt", {})]:
        rig.run(op, **fields)
    np.testing.assert_array_equal(rig.m.sbuf, before)


@pytest.mark.parametrize("src_dt,packed,engine", [("i8", 0, "vector"), ("f8e4m3", 0, "act"), ("u8", 1, "vector"),
                                                  ("u8", 1, "act")])
def test_dequant_against_numpy(rig, rng, src_dt, packed, engine):
    """dst = q * scale[group] + zero[group] per partition; packed: two 4-bit values a byte, low nibble first."""
    P, n, g = 96, 64, 16
    if packed:
        q = rng.integers(0, 16, (P, n))
        src = rig.put(rig.sb("u8", P, n // 2), q[:, 0::2] | (q[:, 1::2] << 4))
    else:
        src = rig.put(rig.sb(src_dt, P, n), rng.standard_normal((P, n)) * 40)
        q = src
    scale = rig.put(rig.sb("bf16", P, n // g, offset=256), rng.standard_normal((P, n // g)))
    zero = rig.put(rig.sb("f32", P, n // g, offset=320), rng.standard_normal((P, n // g)))
    rig.run("dequant", rig.sb("bf16", P, n, offset=512), rig.sb("u8" if packed else src_dt, P, n // 2 if packed else n),
            rig.sb("bf16", P, n // g, offset=256), rig.sb("f32", P, n // g, offset=320), group=g, packed=packed,
            engine=engine)
    want = (q.reshape(P, n // g, g) * scale[..., None] + zero[..., None]).reshape(P, n).astype(np.float32)
    np.testing.assert_array_equal(rig.get(rig.sb("bf16", P, n, offset=512)), rig.rounded(want, "bf16"))
    assert src is not None


@pytest.mark.parametrize("fields,needle", [
    (dict(group=16, packed=1, engine="vector"), "reads u8 pairs"),          # i8 source with packed=1
    (dict(group=24, packed=0, engine="vector"), "in groups of 24"),
    (dict(group=16, packed=0, engine="tensor"), "runs on vector or act"),
])
def test_dequant_errors(rig, fields, needle):
    from isthmus.errors import NpuError
    with pytest.raises(NpuError, match=None) as e:
        rig.run("dequant", rig.sb("bf16", 32, 64, offset=512), rig.sb("i8", 32, 64), rig.sb("bf16", 32, 4, offset=256),
                rig.sb("bf16", 32, 4, offset=320), **fields)
    assert needle in str(e.value)

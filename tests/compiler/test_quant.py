"""ggml block formats: dequantization is checked bit for bit against the `gguf` package's
reference (a test-only oracle), quantization against its reference quantizers."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ggml_ref  # tests/support: llama.cpp's quantizer
from isthmus.compiler.quant import GGML_TYPES, SUPPORTED, QuantizedArray, check_supported, quantize
from isthmus.errors import UnsupportedError

WRITTEN = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "bf16": T.BF16}     # types `quantize` writes
READ_ONLY = {"q5_0": T.Q5_0, "q5_1": T.Q5_1, "iq4_nl": T.IQ4_NL, "q2_k": T.Q2_K, "q3_k": T.Q3_K,
             "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}
QTYPES = {**WRITTEN, **READ_ONLY}


def random_blocks(qtype, rows, cols, seed=0):
    layout = GGML_TYPES[int(QTYPES[qtype])]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(rows, cols // layout.block_size * layout.type_size), dtype=np.uint8)


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_random_blocks_matches_gguf(qtype):
    # Random bytes include inf/nan scales; those must come out as ggml's do.
    raw = random_blocks(qtype, 17, 512)
    got = QuantizedArray(qtype, (17, 512), raw).dequantize()
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(raw, QTYPES[qtype])
    assert got.dtype == np.float32 and got.shape == (17, 512)
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not ggml_ref.available(), reason="needs llama-cpp-python (peers extra)")
@pytest.mark.parametrize("qtype", READ_ONLY)
def test_dequantize_llama_cpp_blocks(qtype):
    """Blocks as llama.cpp's quantizer writes them (realistic scales, every sub-block used):
    bit for bit gguf's dequantization, and close to the values they were quantized from."""
    x = np.random.default_rng(3).standard_normal((6, 768)).astype(np.float32)
    raw = ggml_ref.quantize(x, QTYPES[qtype])
    qa = QuantizedArray(qtype, x.shape, raw)
    got = qa.dequantize()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, QTYPES[qtype]))
    np.testing.assert_array_equal(qa.rows([4, 1]), got[[4, 1]])
    # q2_k keeps 2 bits: its error is large but still far below the values' spread
    assert np.abs(got - x).mean() < (0.35 if qtype in ("q2_k", "q3_k") else 0.12)


@pytest.mark.parametrize("qtype", READ_ONLY)
def test_quantize_refuses_types_it_only_reads(qtype):
    with pytest.raises(UnsupportedError, match=f"reads {qtype} but does not write it"):
        quantize(np.zeros((1, 256), np.float32), qtype)


@pytest.mark.parametrize("qtype", WRITTEN)
def test_quantize_matches_gguf_reference_quantizer(qtype):
    x = (np.random.default_rng(1).standard_normal((9, 96)) * 4).astype(np.float32)
    x[0, :32] = 0  # an all-zero block takes the d == 0 path
    x[1, :32] = 5.0  # a constant block: q4_1 has max == min
    got = quantize(x, qtype)
    want = gguf.quants.quantize(x, QTYPES[qtype])
    np.testing.assert_array_equal(got.raw, want.reshape(got.raw.shape))
    np.testing.assert_array_equal(got.dequantize(), gguf.quants.dequantize(want, QTYPES[qtype]))


def _error_bound(qtype, x):
    blocks = x.reshape(-1, 32)
    lo, hi = blocks.min(1, keepdims=True), blocks.max(1, keepdims=True)
    amax = np.abs(blocks).max(1, keepdims=True)
    f16 = 2.0**-10  # the scales are stored as f16
    if qtype == "q8_0":
        bound = amax / 127 * 0.5 + amax * f16
    elif qtype == "q4_0":
        bound = amax / 8 * 1.0 + amax * f16  # -max maps to 7d, one step short
    else:
        bound = (hi - lo) / 15 * 0.5 + (np.abs(hi) + np.abs(lo)) * f16
    # f16 scales of tiny blocks lose absolute precision: half the smallest subnormal, times |q| <= 128.
    bound = bound * 1.001 + 128 * 2.0**-25
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_quantize_roundtrip_error_is_bounded(qtype, data):
    rows = data.draw(st.integers(1, 4))
    cols = 32 * data.draw(st.integers(1, 4))
    finite = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
    x = data.draw(hnp.arrays(np.float32, (rows, cols), elements=finite))
    err = np.abs(quantize(x, qtype).dequantize() - x)
    assert np.all(err <= _error_bound(qtype, x))


def test_bf16_roundtrip_is_close():
    x = np.random.default_rng(2).standard_normal((3, 10)).astype(np.float32)
    np.testing.assert_allclose(quantize(x, "bf16").dequantize(), x, rtol=2**-8)


@pytest.mark.parametrize("qtype", QTYPES)
def test_rows_dequantizes_only_selected_rows(qtype):
    raw = random_blocks(qtype, 11, 256, seed=3)
    q = QuantizedArray(qtype, (11, 256), raw)
    with np.errstate(all="ignore"):
        full = q.dequantize()
    np.testing.assert_array_equal(q.rows(4), full[4])
    np.testing.assert_array_equal(q.rows([7, 0, 7]), full[[7, 0, 7]])
    ids = np.array([[1, 2], [10, 3]])
    np.testing.assert_array_equal(q.rows(ids), full[ids])
    np.testing.assert_array_equal(q.dequantize(rows=[5]), full[[5]])
    assert q.rows(np.array([], dtype=np.int64)).shape == (0, 256)


def test_quantized_array_is_immutable_and_never_copies():
    raw = random_blocks("q4_1", 4, 64)
    raw.flags.writeable = False
    q = QuantizedArray("q4_1", (4, 64), raw)
    assert np.shares_memory(q.raw, raw)
    assert q.nbytes == raw.nbytes == 4 * 2 * 20
    assert q.shape == (4, 64) and q.ndim == 2 and q.size == 256
    with pytest.raises(AttributeError):
        q.shape = (1, 256)
    assert not quantize(np.zeros((1, 32), np.float32), "q8_0").raw.flags.writeable


def test_higher_rank_and_1d_shapes():
    x = np.random.default_rng(4).standard_normal((2, 3, 64)).astype(np.float32)
    q = quantize(x, "q8_0")
    assert q.raw.shape == (6, 2 * 34)
    assert q.dequantize().shape == (2, 3, 64)
    v = quantize(x[0, 0], "q4_0")
    assert v.dequantize().shape == (64,)


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match="multiple of the q4_0 block size"):
        quantize(np.zeros((2, 30), np.float32), "q4_0")
    with pytest.raises(ValueError, match="needs"):
        QuantizedArray("q8_0", (2, 32), np.zeros(10, np.uint8))
    with pytest.raises(UnsupportedError, match="iq4_xs"):
        quantize(np.zeros(256, np.float32), "iq4_xs")
    with pytest.raises(ValueError, match="multiple of the q4_k block size 256"):
        QuantizedArray("q4_k", (2, 128), np.zeros(144, np.uint8))


def test_type_table_names_unsupported_types():
    assert {GGML_TYPES[i].name for i in (0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 30)} == set(SUPPORTED)
    for type_id, (name, block, size) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[T(type_id)] == (block, size), name
        assert T(type_id).name == name
    with pytest.raises(UnsupportedError, match=r"tensor blk\.0\.attn_q\.weight uses ggml type IQ4_XS, .*supported: F32"):
        check_supported(23, "blk.0.attn_q.weight")
    assert check_supported(12, "w").name == "Q4_K"
    with pytest.raises(UnsupportedError, match="type id 99"):
        check_supported(99, "w")
    assert check_supported(3, "w").name == "Q4_1"


@pytest.mark.slow
def test_real_model_tensors_dequantize_like_gguf(default_model_path):
    reader = gguf.GGUFReader(str(default_model_path))
    from isthmus.compiler.frontends.gguf import read_gguf

    ours = read_gguf(default_model_path).tensors
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen or t.tensor_type not in (T.Q8_0, T.Q4_0, T.Q4_1):
            continue
        seen.add(t.tensor_type.name)
        mine = ours[t.name]
        np.testing.assert_array_equal(mine.dequantize(), gguf.quants.dequantize(t.data, t.tensor_type))
        np.testing.assert_array_equal(mine.rows([0, 5]), gguf.quants.dequantize(t.data[[0, 5]], t.tensor_type))
    assert seen  # the default model holds Q8_0 and Q4_1 tensors


def test_packable_together_needs_one_storage_and_one_width():
    from isthmus.compiler.quant import packable_together

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    q41, q40, q8 = quantize(w, "q4_1"), quantize(w, "q4_0"), quantize(w, "q8_0")
    assert packable_together([q41, quantize(w[:4], "q4_1")])          # one block format, rows differ
    assert packable_together([w, w.astype(np.float16), quantize(w, "bf16")])   # dense floats of any width
    assert not packable_together([q41, q40])                          # two block formats
    assert not packable_together([q8, w])                             # blocks beside dense
    assert not packable_together([w, rng.standard_normal((8, 32)).astype(np.float32)])   # widths differ

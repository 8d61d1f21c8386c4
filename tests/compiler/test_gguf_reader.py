"""The from-scratch GGUF reader: round trips through the `gguf` package's writer (a test-only
oracle), every malformation ending in ModelFormatError, and fuzzing of the header parser."""

import itertools
import mmap
import struct
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isthmus.compiler.frontends.gguf import GGUFFile, read_gguf
from isthmus.compiler.frontends.gguf_arch import config_from_gguf
from isthmus.compiler.quant import QuantizedArray, quantize
from isthmus.errors import ModelFormatError, UnsupportedError

METADATA = {
    "t.u8": ("uint8", 255), "t.i8": ("int8", -128), "t.u16": ("uint16", 65535), "t.i16": ("int16", -32768),
    "t.u32": ("uint32", 2**32 - 1), "t.i32": ("int32", -(2**31)), "t.f32": ("float32", 0.5),
    "t.u64": ("uint64", 2**64 - 1), "t.i64": ("int64", -(2**63)), "t.f64": ("float64", 1e300),
    "t.bool": ("bool", True), "t.false": ("bool", False), "t.str": ("string", "héllo 😀\n<|im_start|>"),
}
ARRAYS = {
    "t.ints": [1, -2, 3], "t.floats": [0.25, -1.5], "t.strs": ["a", "", "ü"], "t.bools": [True, False],
    "t.nested": [[1, 2], [3]],
}


def write_small(path, alignment=None):
    """A valid GGUF with metadata of every type and F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    for key, (kind, value) in METADATA.items():
        getattr(w, f"add_{kind}")(key, value)
    for key, value in ARRAYS.items():
        w.add_array(key, value)
    if alignment:
        w.add_custom_alignment(alignment)
    want = {
        "f32_2d": rng.standard_normal((3, 5)).astype(np.float32),
        "f32_1d": rng.standard_normal(7).astype(np.float32),
        "f16": rng.standard_normal((2, 4)).astype(np.float16),
    }
    for name, arr in want.items():
        w.add_tensor(name, arr)
    for qtype, ggml in (("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("bf16", T.BF16)):
        q = quantize(rng.standard_normal((4, 64)).astype(np.float32), qtype)
        w.add_tensor(qtype, np.array(q.raw), raw_dtype=ggml)
        want[qtype] = q
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    want = write_small(path)
    return path, want


def test_metadata_of_every_value_type_round_trips(small):
    path, _ = small
    f = read_gguf(path)
    assert isinstance(f, GGUFFile) and f.version == 3 and f.alignment == 32
    assert f.metadata["general.architecture"] == "llama"
    for key, (kind, value) in METADATA.items():
        got = f.metadata[key]
        assert got == value and type(got) is type(value), key
    for key, value in ARRAYS.items():
        assert f.metadata[key] == value, key
    assert f.metadata["t.f32"] == 0.5 and isinstance(f.metadata["t.bools"][0], bool)


def test_tensors_round_trip_as_read_only_views(small):
    path, want = small
    f = read_gguf(path)
    assert list(f.tensors) == list(want)
    assert f.tensor_types == {"f32_2d": "F32", "f32_1d": "F32", "f16": "F16", "q8_0": "Q8_0",
                              "q4_0": "Q4_0", "q4_1": "Q4_1", "bf16": "BF16"}
    for name, expected in want.items():
        got = f.tensors[name]
        if isinstance(expected, QuantizedArray):
            assert isinstance(got, QuantizedArray) and got.qtype == expected.qtype and got.shape == (4, 64)
            np.testing.assert_array_equal(got.raw, expected.raw)
            np.testing.assert_array_equal(got.dequantize(), expected.dequantize())
            arr = got.raw
        else:
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
            arr = got
        assert not arr.flags.writeable
        while isinstance(arr, np.ndarray):  # a view of the mapped file, never a copy
            arr = arr.base
        assert isinstance(arr.obj if isinstance(arr, memoryview) else arr, mmap.mmap)


def test_custom_alignment(tmp_path):
    want = write_small(tmp_path / "a.gguf", alignment=64)
    f = read_gguf(tmp_path / "a.gguf")
    assert f.alignment == 64 and f.data_offset % 64 == 0
    np.testing.assert_array_equal(f.tensors["f32_2d"], want["f32_2d"])


# --- hand-built files, for malformations the writer will not produce ------------------------------

def s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name, dims, type_id=0, offset=0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", type_id, offset)


def build(kvs=(), tensors=(), data=b"", version=3, n_kv=None, n_tensors=None, magic=b"GGUF", align=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % align) + data


ONE_F32 = dict(kvs=[kv("a", 4, struct.pack("<I", 7))], tensors=[tinfo("w", [4])], data=np.arange(4, dtype="<f4").tobytes())


def read_bytes(tmp_path, blob, name="x.gguf"):
    path = tmp_path / name
    path.write_bytes(blob)
    return read_gguf(path)


def test_hand_built_file_reads(tmp_path):
    f = read_bytes(tmp_path, build(**ONE_F32))
    assert f.metadata == {"a": 7}
    np.testing.assert_array_equal(f.tensors["w"], [0, 1, 2, 3])
    # The writer skips empty strings and arrays, so these are built by hand.
    empty = read_bytes(tmp_path, build(kvs=[kv("e", 9, struct.pack("<IQ", 4, 0)), kv("s", 8, s(""))]), "e.gguf")
    assert empty.metadata == {"e": [], "s": ""} and empty.tensors == {}
    v2 = read_bytes(tmp_path, build(version=2, **ONE_F32), "v2.gguf")
    assert v2.version == 2


MALFORMED = {
    "bad magic": (build(magic=b"GGML", **ONE_F32), "not a GGUF file"),
    "zip": (b"PK\x03\x04" + b"\0" * 100, "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
    "tiny": (b"GGU", "not a GGUF file"),
    "version 1": (build(version=1, **ONE_F32), "GGUF version 1 is not supported"),
    "version 4": (build(version=4, **ONE_F32), "GGUF version 4 is not supported"),
    "big endian": (build(version=3 << 24, **ONE_F32), "big-endian"),
    "absurd kv count": (build(n_kv=2**60, **ONE_F32), "claims 1152921504606846976 metadata entries"),
    "absurd tensor count": (build(n_tensors=2**40, **ONE_F32), "tensors but only"),
    "absurd key length": (build(kvs=[struct.pack("<Q", 2**50) + b"\0" * 16]), "claims 1125899906842624 bytes"),
    "absurd string": (build(kvs=[kv("k", 8, struct.pack("<Q", 2**63))]), "claims"),
    "absurd array": (build(kvs=[kv("k", 9, struct.pack("<IQ", 6, 2**40))]), "claims 1099511627776 elements"),
    "absurd string array": (build(kvs=[kv("k", 9, struct.pack("<IQ", 8, 10**6))]), "claims 1000000 elements"),
    "absurd string in array": (build(kvs=[kv("k", 9, struct.pack("<IQ", 8, 1) + struct.pack("<Q", 2**40))]), "claims"),
    "unknown value type": (build(kvs=[kv("k", 13, b"\0" * 8)]), "unknown value type 13"),
    "unknown array type": (build(kvs=[kv("k", 9, struct.pack("<IQ", 42, 1))]), "unknown value type 42"),
    "deep nesting": (build(kvs=[kv("k", 9, struct.pack("<IQ", 9, 1) * 20)]), "nests arrays"),
    "bad utf-8 key": (build(kvs=[kv(b"\xff\xfe", 4, b"\0" * 4)]), "not valid UTF-8"),
    "bad utf-8 string": (build(kvs=[kv("k", 9, struct.pack("<IQ", 8, 1) + s(b"\xc3"))]), "not valid UTF-8"),
    "duplicate key": (build(kvs=[kv("k", 0, b"\1"), kv("k", 0, b"\2")]), "appears twice"),
    "bad alignment": (build(kvs=[kv("general.alignment", 4, struct.pack("<I", 3))]), "power of two"),
    "too many dims": (build(tensors=[tinfo("w", [1] * 5)]), "5 dimensions"),
    "absurd dim": (build(tensors=[tinfo("w", [2**63, 2])]), "absurd dimension"),
    "overflowing size": (build(tensors=[tinfo("w", [2**61, 2**61, 2**61])], data=b"\0" * 64), "runs past the end"),
    "data past end": (build(tensors=[tinfo("w", [100])], data=b"\0" * 16), "truncated"),
    "offset past end": (build(tensors=[tinfo("w", [4], offset=2**40)], data=b"\0" * 16), "runs past the end"),
    "unaligned offset": (build(tensors=[tinfo("w", [4], offset=4)], data=b"\0" * 64), "not a multiple of the alignment"),
    "partial block": (build(tensors=[tinfo("w", [30], type_id=8)], data=b"\0" * 64), "block size 32"),
    "duplicate tensor": (build(tensors=[tinfo("w", [4]), tinfo("w", [4])], data=b"\0" * 16), "appears twice"),
    "truncated tensor info": (build(tensors=[tinfo("w", [4])[:-3]], align=1), "truncated tensor w info"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_raise_model_format_error(tmp_path, case):
    blob, message = MALFORMED[case]
    with pytest.raises(ModelFormatError, match=message) as info:
        read_bytes(tmp_path, blob)
    text = str(info.value)
    assert text.startswith(str(tmp_path / "x.gguf") + ": ") and "\n" not in text


@pytest.mark.parametrize("type_id, name", [(23, "IQ4_XS"), (16, "IQ2_XXS"), (34, "TQ1_0")])
def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, type_id, name):
    blob = build(tensors=[tinfo("blk.0.attn_q.weight", [256, 2], type_id=type_id)], data=b"\0" * 1024)
    with pytest.raises(UnsupportedError, match=rf"tensor blk\.0\.attn_q\.weight uses ggml type {name}, which isthmus does not support; supported: "):
        read_bytes(tmp_path, blob)


def test_unknown_tensor_type_id(tmp_path):
    with pytest.raises(UnsupportedError, match="ggml type id 77"):
        read_bytes(tmp_path, build(tensors=[tinfo("w", [4], type_id=77)], data=b"\0" * 16))


def test_corrupt_beats_unsupported(tmp_path):
    # A file that is both corrupt and uses an unsupported type is reported as corrupt.
    blob = build(tensors=[tinfo("a", [256], type_id=13), tinfo("b", [10**6])], data=b"\0" * 64)
    with pytest.raises(ModelFormatError, match="truncated"):
        read_bytes(tmp_path, blob)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelFormatError, match="directory"):
        read_gguf(tmp_path)


def test_truncation_at_every_offset(tmp_path, small):
    path, _ = small
    blob = path.read_bytes()
    f = read_gguf(path)
    # Every cut in the header, then a stride through the tensor data.
    cuts = itertools.chain(range(f.data_offset + 1), range(f.data_offset + 1, len(blob), 7))
    target = tmp_path / "cut.gguf"
    for n in cuts:
        target.write_bytes(blob[:n])
        with pytest.raises(ModelFormatError):
            read_gguf(target)


def test_random_bytes_after_magic(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(200):
        blob = b"GGUF" + struct.pack("<I", 3) + rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        try:
            read_bytes(tmp_path, blob, f"r{i}.gguf")
        except (ModelFormatError, UnsupportedError):
            pass


_fuzz_settings = settings(max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_counter = itertools.count()


def _must_fail_cleanly(tmp_path, blob):
    path = tmp_path / f"fuzz{next(_counter)}.gguf"  # a fresh name: an earlier result may still map the old file
    path.write_bytes(blob)
    try:
        read_gguf(path)
    except (ModelFormatError, UnsupportedError) as e:
        assert "\n" not in str(e)


@_fuzz_settings
@given(blob=st.binary(max_size=512))
def test_fuzz_random_bytes(tmp_path, blob):
    _must_fail_cleanly(tmp_path, blob)
    _must_fail_cleanly(tmp_path, b"GGUF\x03\0\0\0" + blob)


@_fuzz_settings
@given(data=st.data())
def test_fuzz_mutated_valid_file(tmp_path, small, data):
    blob = bytearray(small[0].read_bytes())
    header_end = read_gguf(small[0]).data_offset
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, header_end - 1))
        blob[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    _must_fail_cleanly(tmp_path, bytes(blob))


# --- model configuration -------------------------------------------------------------------------

LLAMA_KEYS = {
    "llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
    "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.context_length": 256,
}


def write_llama(path, drop=(), arch="llama", **extra):
    w = gguf.GGUFWriter(path, arch)
    for key, value in LLAMA_KEYS.items():
        if key not in drop:
            w.add_uint32(key.replace("llama.", f"{arch}."), value)
    if "eps" not in drop:
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(10)])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    for key, value in extra.items():
        w.add_string(key, value) if isinstance(value, str) else w.add_float32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((10, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read_gguf(path)


def test_llama_config(tmp_path):
    cfg = config_from_gguf(write_llama(tmp_path / "l.gguf", **{"general.name": "Tiny"}))
    assert cfg == {
        "architecture": "llama", "name": "Tiny", "n_layers": 2, "hidden": 64, "ffn": 128, "n_heads": 4,
        "n_kv_heads": 2, "head_dim": 16, "rope_dim": 16, "rms_eps": pytest.approx(1e-5), "rope_theta": 10000.0,
        "rope_factors": [], "qkv_bias": False, "qk_norm": False,
        "context_length": 256, "vocab_size": 10, "bos_token_id": 1, "eos_token_id": 2,
        "chat_template": "{{ messages }}", "tied_embeddings": True,
    }
    cfg = config_from_gguf(write_llama(tmp_path / "t.gguf", **{"llama.rope.freq_base": 5e5}))
    assert cfg["rope_theta"] == 5e5 and cfg["name"] == "t"


def test_llama_config_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="llama.block_count is missing"):
        config_from_gguf(write_llama(tmp_path / "a.gguf", drop=["llama.block_count"]))
    with pytest.raises(ModelFormatError, match="layer_norm_rms_epsilon is missing"):
        config_from_gguf(write_llama(tmp_path / "b.gguf", drop=["eps"]))
    with pytest.raises(UnsupportedError, match="architecture 'falcon' is not supported"):
        config_from_gguf(write_llama(tmp_path / "c.gguf", arch="falcon"))
    with pytest.raises(UnsupportedError, match="rope scaling 'yarn'"):
        config_from_gguf(write_llama(tmp_path / "d.gguf", **{"llama.rope.scaling.type": "yarn"}))
    with pytest.raises(ModelFormatError, match="expected a positive"):
        config_from_gguf(write_llama(tmp_path / "e.gguf", drop=["llama.context_length"], **{"llama.context_length": "x"}))


# --- the real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_matches_gguf_package(default_model_path):
    start = time.perf_counter()
    f = read_gguf(default_model_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"reading the index took {elapsed:.2f}s"
    ref = gguf.GGUFReader(str(default_model_path))
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(f.metadata) == set(fields)
    for key, field in fields.items():
        assert f.metadata[key] == field.contents(), key
    assert f.version == 3 and f.data_offset == ref.data_offset
    assert list(f.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = f.tensors[t.name]
        assert f.tensor_types[t.name] == t.tensor_type.name
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist())), t.name
        raw = mine.raw if isinstance(mine, QuantizedArray) else mine
        assert np.array_equal(np.asarray(raw).view(np.uint8).reshape(-1), t.data.view(np.uint8).reshape(-1)), t.name
    cfg = config_from_gguf(f)
    assert (cfg["n_layers"], cfg["hidden"], cfg["ffn"], cfg["n_heads"], cfg["n_kv_heads"]) == (30, 576, 1536, 9, 3)
    assert (cfg["vocab_size"], cfg["context_length"], cfg["rope_theta"], cfg["tied_embeddings"]) == (49152, 8192, 1e5, True)
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2 and "<|im_start|>" in cfg["chat_template"]

"""A GGUF file holding every block type isthmus reads loads with the right types and values
(the file is written by the gguf package, the blocks by llama.cpp's quantizer, and the values
compared with gguf's own dequantization)."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import ggml_ref  # tests/support
from isthmus.compiler.frontends.gguf import read_gguf

TYPES = [T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]

pytestmark = pytest.mark.skipif(not ggml_ref.available(), reason="needs llama-cpp-python (peers extra)")


def test_gguf_with_every_read_type_loads(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raws = {}
    for t in TYPES:
        raw = ggml_ref.quantize(rng.standard_normal((3, 512)).astype(np.float32), t)
        raws[t.name] = raw
        w.add_tensor(t.name.lower(), raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(path)
    for t in TYPES:
        arr = f.tensors[t.name.lower()]
        assert f.tensor_types[t.name.lower()] == t.name
        assert arr.qtype == t.name.lower() and arr.shape == (3, 512)
        np.testing.assert_array_equal(arr.dequantize(), gguf.quants.dequantize(raws[t.name], t))

"""A GGUF file holding every block type isthmus reads loads with the right types and values
(the file is written by the gguf package, the blocks by llama.cpp's quantizer, and the values
compared with gguf's own dequantization); and a Q4_K_M file made by llama.cpp's own quantizer
(llama_model_quantize) runs on the numba target with llama.cpp's logits and greedy tokens."""

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


def _tiny_llama_f32(path, hidden=256, ffn=512, layers=2, seed=0):
    """A 2-layer random Llama with widths that are multiples of 256 (so llama.cpp's Q4_K_M keeps
    q4_k and q6_k) and tiny_models' byte-level chat vocabulary, as an f32 GGUF."""
    import tiny_models

    tokens = tiny_models.SPECIALS + tiny_models.byte_alphabet() + ["".join(m.split(" ")) for m in tiny_models.MERGES]
    V, H, KVH, hd = len(tokens), 4, 2, 64
    rng = np.random.default_rng(seed)

    def mat(rows, cols, scale=1.0):
        return (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in (("context_length", 128), ("embedding_length", hidden), ("block_count", layers),
                     ("feed_forward_length", ffn), ("attention.head_count", H), ("attention.head_count_kv", KVH)):
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3] * 3 + [1] * (len(tokens) - 3))
    w.add_array("tokenizer.ggml.merges", tiny_models.MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    tensors = {"token_embd.weight": rng.standard_normal((V, hidden)).astype(np.float32),
               "output_norm.weight": np.ones(hidden, np.float32), "output.weight": mat(V, hidden, 6.0)}
    for i in range(layers):
        p = f"blk.{i}"
        tensors.update({
            f"{p}.attn_norm.weight": np.ones(hidden, np.float32), f"{p}.ffn_norm.weight": np.ones(hidden, np.float32),
            f"{p}.attn_q.weight": mat(H * hd, hidden), f"{p}.attn_k.weight": mat(KVH * hd, hidden),
            f"{p}.attn_v.weight": mat(KVH * hd, hidden), f"{p}.attn_output.weight": mat(hidden, H * hd),
            f"{p}.ffn_gate.weight": mat(ffn, hidden), f"{p}.ffn_up.weight": mat(ffn, hidden),
            f"{p}.ffn_down.weight": mat(hidden, ffn)})
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("ftype", ["LLAMA_FTYPE_MOSTLY_Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q2_K"])
def test_llama_cpp_quantized_file_matches_llama_cpp(tmp_path, ftype):
    import ctypes

    import llama_cpp

    import isthmus

    src = _tiny_llama_f32(tmp_path / "f32.gguf")
    dst = tmp_path / "q.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    kinds = set(read_gguf(dst).tensor_types.values())
    assert kinds & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}, kinds

    llm = llama_cpp.Llama(model_path=str(dst), n_ctx=64, n_threads=1, verbose=False)
    dec = isthmus.compile(isthmus.load(str(dst)), target="numba").decoder()

    def theirs():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()

    feed, clear = [5, 40, 77, 120, 9, 33], 0
    for _ in range(12):         # a prefill, then decode steps both fed llama.cpp's greedy token
        llm.eval(feed)
        want, got = theirs(), dec.step(feed)
        scale = np.abs(want).max()
        # llama.cpp rounds activations to 8 bits (its q8_K dot products) and keeps an f16 KV cache:
        # ~2e-2 of the logits' range from exact arithmetic here; a wrong block layout is off by ~1
        assert np.abs(got - want).max() <= 0.05 * scale
        top2 = np.sort(want)[-2:]
        if top2[1] - top2[0] > 0.1 * scale:          # a clear greedy choice is the same
            assert int(np.argmax(got)) == int(np.argmax(want))
            clear += 1
        feed = [int(np.argmax(want))]
    llm.close()
    assert clear >= 4           # enough clear choices that the greedy check is not vacuous

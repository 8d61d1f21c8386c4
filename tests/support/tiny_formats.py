"""Tiny models in the formats other than GGUF, written without torch: an ONNX graph (a small MLP
with two named inputs and two outputs, weights inline or in external data files) and a sharded
safetensors Llama checkpoint with a tokenizer.json, tokenizer_config.json, generation_config.json
and a chat template, which the safetensors frontend loads as a chat model. Imported as
`tiny_formats` (tests/support is on pytest's pythonpath)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from tiny_models import CHAT_CONFIG, MERGES, SPECIALS, TEMPLATE, byte_alphabet

# Every format a model can be sealed in (tests/tee parametrizes over them): "onnx-decoder" is the
# Optimum export in tests/data/optimum/llama (model.onnx beside its config and tokenizer files).
FORMATS = ("gguf", "onnx", "onnx-external", "safetensors", "onnx-decoder")
CHAT_FORMATS = ("gguf", "safetensors", "onnx-decoder")
OPTIMUM_LLAMA = Path(__file__).resolve().parents[1] / "data" / "optimum" / "llama"
ONNX_IN, ONNX_HIDDEN, ONNX_OUT = 32, 192, 24


def write_tiny_onnx(path, *, external: bool = False, seed: int = 0) -> Path:
    """x [batch, 32] f32 and scale [1] f32 in; y = relu(x @ W1 + b1) @ W2 * scale and the row sums of
    y out. With `external`, every weight lives in its own file beside the model (two files at least)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = {"W1": rng.standard_normal((ONNX_IN, ONNX_HIDDEN)).astype(np.float32) / 6,
             "b1": rng.standard_normal(ONNX_HIDDEN).astype(np.float32),
             "W2": rng.standard_normal((ONNX_HIDDEN, ONNX_OUT)).astype(np.float32) / 14,
             "axes": np.array([1], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="mm1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "W2"], ["y0"], name="mm2"),
             helper.make_node("Mul", ["y0", "scale"], ["y"], name="scale"),
             helper.make_node("ReduceSum", ["y", "axes"], ["total"], name="sum", keepdims=0)]
    graph = helper.make_graph(
        nodes, "tiny-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ONNX_IN]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", ONNX_OUT]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=256)
    else:
        onnx.save_model(model, str(path))
    return path


def tiny_onnx_feeds(batch: int = 3, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, ONNX_IN)).astype(np.float32), "scale": np.array([1.5], np.float32)}


# -- a safetensors checkpoint ---------------------------------------------------------------------

def _tokenizer_json() -> str:
    """The tiny GGUF's byte-level BPE vocabulary (same tokens and merges) as a tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = SPECIALS + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return tok.to_str()


def _write_safetensors(path: Path, tensors: dict) -> None:
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a, "<f4").tobytes())


def write_tiny_checkpoint(folder, *, seed: int = 0, shards: int = 2) -> Path:
    """A 2-layer random Llama as a HF folder, its weights split over `shards` safetensors files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = CHAT_CONFIG
    D, F, H, KVH, hd = c["hidden"], c["ffn"], c["n_heads"], c["n_kv_heads"], c["head_dim"]
    V = len(SPECIALS) + 256 + len(MERGES)
    rng = np.random.default_rng(seed)

    def mat(rows, cols, scale=1.0):
        return (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    out = mat(V, D, 4.0)
    out[2] *= 0.3
    w = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32),
         "model.norm.weight": np.ones(D, np.float32), "lm_head.weight": out}
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}"
        w.update({f"{p}.input_layernorm.weight": np.ones(D, np.float32),
                  f"{p}.post_attention_layernorm.weight": np.ones(D, np.float32),
                  f"{p}.self_attn.q_proj.weight": mat(H * hd, D), f"{p}.self_attn.k_proj.weight": mat(KVH * hd, D),
                  f"{p}.self_attn.v_proj.weight": mat(KVH * hd, D), f"{p}.self_attn.o_proj.weight": mat(D, H * hd),
                  f"{p}.mlp.gate_proj.weight": mat(F, D), f"{p}.mlp.up_proj.weight": mat(F, D),
                  f"{p}.mlp.down_proj.weight": mat(D, F)})
    names = list(w)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: w[n] for n in names[k::shards]}
        _write_safetensors(folder / file, part)
        weight_map.update({n: file for n in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(a.nbytes for a in w.values())}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D, "intermediate_size": F,
        "num_hidden_layers": c["n_layers"], "num_attention_heads": H, "num_key_value_heads": KVH,
        "head_dim": hd, "vocab_size": V, "max_position_embeddings": c["context_length"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder

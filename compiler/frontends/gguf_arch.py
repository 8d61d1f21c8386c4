"""GGUF metadata -> the hyper-parameters a decoder builder takes, per architecture.

llama.cpp writes each architecture's hyper-parameters under its own prefix (`qwen2.block_count`).
`config_from_gguf` reads the ones isthmus applies and refuses, naming it, any other key under the
architecture's prefix that would change the numbers: a file is never run with a setting silently
dropped. Benign keys (sizes that must agree with the tensors, counts that are zero) are checked,
not ignored.

Architectures and how llama.cpp lays them out:
    llama   rotary in the interleaved (Meta) layout: the converter permutes Q/K rows; llama3's rope
            scaling as a `rope_freqs` tensor of per-pair frequency divisors; linear rope scaling
    qwen2   biases on Q, K and V; rotary in the half-split (NEOX) layout
    qwen3   an RMS norm over each Q and K head before the rotary (`attn_q_norm`, `attn_k_norm`),
            head size from `attention.key_length`; NEOX rotary
    phi3    one fused QKV weight, one fused gate|up weight; NEOX rotary (the long-context files'
            rope_factors_long/short tensors are refused: isthmus does not apply longrope)
    gemma2  scaled embedding, post-attention and post-MLP norms, GeGLU, attention and logit
            soft-capping, sliding-window attention on even layers (compiler/frontends/gemma.py)
    gemma3  as gemma2 without soft-capping, with per-head Q/K norms, five sliding layers of six
            with a local rotary base of 10000, the file's base and scaling on the full layers
    gpt2    learned positions, LayerNorm with biases, fused QKV with bias, GELU (tanh) MLP, biases
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from isthmus.compiler.frontends.files import one_line
from isthmus.compiler.frontends.gguf import (MAX_CONTEXT, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB,
                                             MAX_WIDTH, GGUFFile, check_limit)
from isthmus.errors import ModelFormatError, UnsupportedError

# architecture -> rotary layout of its Q/K rows in a llama.cpp file (None: no rotary)
ROPE_LAYOUT = {"llama": "interleaved", "qwen2": "half", "qwen3": "half", "phi3": "half", "gemma2": "half",
               "gemma3": "half", "gpt2": None}
SUPPORTED = tuple(ROPE_LAYOUT)

_SIZES = {"context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
          "attention.head_count_kv", "vocab_size", "attention.key_length", "attention.value_length",
          "expert_count", "expert_used_count"}
_ROPE = {"rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
         "rope.scaling.original_context_length", "rope.scaling.finetuned"}
# the keys under "<arch>." each architecture's builder applies (or checks)
APPLIED = {
    "llama": _SIZES | _ROPE | {"attention.layer_norm_rms_epsilon"},
    "qwen2": _SIZES | _ROPE | {"attention.layer_norm_rms_epsilon"},
    "qwen3": _SIZES | _ROPE | {"attention.layer_norm_rms_epsilon"},
    "phi3": _SIZES | _ROPE | {"attention.layer_norm_rms_epsilon"},
    "gpt2": _SIZES | {"attention.layer_norm_epsilon"},
    "gemma2": _SIZES | _ROPE | {"attention.layer_norm_rms_epsilon", "attention.sliding_window",
                                "attn_logit_softcapping", "final_logit_softcapping"},
    "gemma3": _SIZES | _ROPE | {"attention.layer_norm_rms_epsilon", "attention.sliding_window",
                                "attention.sliding_window_pattern", "attn_logit_softcapping",
                                "final_logit_softcapping"},
}
# llama.cpp's model sizes whose query scale is 1/sqrt(hidden / heads) rather than 1/sqrt(head_dim)
# (Gemma 2 and 3 27B; their files record the layer count, not query_pre_attn_scalar)
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def config_from_gguf(gguf_file: GGUFFile) -> dict:
    """The hyper-parameters of the file's architecture, as the builders take them."""
    md, name = gguf_file.metadata, gguf_file.path

    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{name}: metadata key general.architecture is missing")
    if arch not in ROPE_LAYOUT:
        raise UnsupportedError(f"{name}: architecture {one_line(arch)!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED)}")
    unknown = sorted(k for k in md if k.startswith(arch + ".") and k[len(arch) + 1:] not in APPLIED[arch])
    if unknown:
        raise UnsupportedError(f"{name}: metadata {unknown[0]} = {one_line(repr(md[unknown[0]]))[:80]} is a "
                               f"{arch} setting isthmus does not apply, so it would run with wrong numbers")

    def get(key: str, kind: type, default: Any = ..., limit: int | None = None) -> Any:
        key = f"{arch}.{key}"
        if key not in md:
            if default is ...:
                raise ModelFormatError(f"{name}: metadata key {key} is missing")
            return default
        value = md[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else type(value) is kind
        if not ok or (kind is int and value <= 0):
            raise ModelFormatError(f"{name}: metadata {key} is {one_line(repr(value))}, expected a positive {kind.__name__}")
        return kind(value) if limit is None else check_limit(value, limit, key, name)

    if md.get(f"{arch}.expert_count", 0):
        raise UnsupportedError(f"{name}: {arch}.expert_count is {md[f'{arch}.expert_count']}: mixture-of-experts "
                               "layers are not supported")
    hidden = get("embedding_length", int, limit=MAX_WIDTH)
    n_heads = get("attention.head_count", int, limit=MAX_HEADS)
    n_kv_heads = get("attention.head_count_kv", int, n_heads, limit=MAX_HEADS)
    head_dim = get("attention.key_length", int, hidden // n_heads, limit=MAX_HEAD_DIM)
    if f"{arch}.attention.key_length" not in md and hidden % n_heads:
        raise ModelFormatError(f"{name}: embedding length {hidden} is not a multiple of the head count {n_heads}")
    if get("attention.value_length", int, head_dim, limit=MAX_HEAD_DIM) != head_dim:
        raise UnsupportedError(f"{name}: {arch}.attention.value_length differs from the key length {head_dim}")
    if n_heads % n_kv_heads:
        raise ModelFormatError(f"{name}: head count {n_heads} is not a multiple of the KV head count {n_kv_heads}")
    tokens = md.get("tokenizer.ggml.tokens")
    embedding = gguf_file.tensors.get("token_embd.weight")
    vocab = len(tokens) if isinstance(tokens, list) else embedding.shape[0] if embedding is not None else ...
    config = {
        "architecture": arch,
        "name": md.get("general.name") if isinstance(md.get("general.name"), str) else Path(name).stem,
        "n_layers": get("block_count", int, limit=MAX_LAYERS),
        "hidden": hidden,
        "ffn": get("feed_forward_length", int, limit=MAX_WIDTH),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "context_length": get("context_length", int, limit=MAX_CONTEXT),
        "vocab_size": get("vocab_size", int, vocab, limit=MAX_VOCAB),
        "bos_token_id": _token_id(md, "tokenizer.ggml.bos_token_id", name),
        "eos_token_id": _token_id(md, "tokenizer.ggml.eos_token_id", name),
        "chat_template": md.get("tokenizer.chat_template"),
        "tied_embeddings": "output.weight" not in gguf_file.tensors,
        # llama.cpp applies these wherever the file has them (qwen2 always has the biases)
        "qkv_bias": "blk.0.attn_q.bias" in gguf_file.tensors,
        "qk_norm": "blk.0.attn_q_norm.weight" in gguf_file.tensors,
    }
    if arch == "gpt2":
        config["norm_eps"] = _positive_eps(get("attention.layer_norm_epsilon", float), f"{arch}.attention.layer_norm_epsilon", name)
        return config
    config["rms_eps"] = _positive_eps(get("attention.layer_norm_rms_epsilon", float),
                                      f"{arch}.attention.layer_norm_rms_epsilon", name)
    rope_dim = get("rope.dimension_count", int, head_dim)
    if rope_dim > head_dim:
        raise ModelFormatError(f"{name}: metadata {arch}.rope.dimension_count is {rope_dim}, over the head size {head_dim}")
    config["rope_dim"] = rope_dim
    config["rope_theta"] = get("rope.freq_base", float, 10000.0)
    config["rope_factors"] = _rope_factors(gguf_file, arch, rope_dim)
    if arch in _GEMMA_27B_LAYERS:
        if rope_dim != head_dim:
            raise UnsupportedError(f"{name}: {arch}.rope.dimension_count {rope_dim} differs from the head size")
        _gemma(config, gguf_file, get)
    return config


def _gemma(config: dict, gguf_file: GGUFFile, get) -> None:
    """Gemma's own settings, read as llama.cpp reads them (its sliding-layer patterns are fixed)."""
    arch, md, L = config["architecture"], gguf_file.metadata, config["n_layers"]

    def cap(key):
        value = md.get(f"{arch}.{key}", 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ModelFormatError(f"{gguf_file.path}: metadata {arch}.{key} is {one_line(repr(value))}, "
                                   "expected a number >= 0")
        return float(value)
    config["attn_softcap"], config["final_softcap"] = cap("attn_logit_softcapping"), cap("final_logit_softcapping")
    config["sliding_window"] = get("attention.sliding_window", int, limit=MAX_CONTEXT)
    if arch == "gemma2":
        config["sliding"] = [i % 2 == 0 for i in range(L)]
    else:
        pattern = get("attention.sliding_window_pattern", int, 6)
        config["sliding"] = [(i + 1) % pattern != 0 for i in range(L)]
    config["rope_theta_local"] = 10000.0 if arch == "gemma3" else config["rope_theta"]
    width = config["hidden"] // config["n_heads"] if L == _GEMMA_27B_LAYERS[arch] else config["head_dim"]
    config["attn_scale"] = float(width) ** -0.5
    config["qk_norm"] = arch == "gemma3"


def _rope_factors(gguf_file: GGUFFile, arch: str, rope_dim: int) -> list[float]:
    """Per-pair frequency divisors: llama3's `rope_freqs` tensor, or linear scaling's one factor."""
    md, name = gguf_file.metadata, gguf_file.path
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    factors: list[float] = []
    if scaling == "linear":
        factor = md.get(f"{arch}.rope.scaling.factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
            raise ModelFormatError(f"{name}: linear rope scaling needs a positive {arch}.rope.scaling.factor")
        factors = [float(factor)] * (rope_dim // 2)
    elif scaling != "none":
        raise UnsupportedError(f"{name}: rope scaling {one_line(str(scaling))!r} is not supported (none, linear, "
                               "and llama3's rope_freqs tensor are)")
    freqs = gguf_file.tensors.get("rope_freqs.weight")
    if freqs is not None:
        if hasattr(freqs, "dequantize") or tuple(freqs.shape) != (rope_dim // 2,):
            raise ModelFormatError(f"{name}: tensor rope_freqs.weight must be f32[{rope_dim // 2}], "
                                   f"got {gguf_file.tensor_types['rope_freqs.weight']}{list(freqs.shape)}")
        f = np.asarray(freqs, np.float64)
        if not np.all(np.isfinite(f) & (f > 0)):
            raise ModelFormatError(f"{name}: tensor rope_freqs.weight holds values that are not positive and finite")
        factors = [a * b for a, b in zip(factors, f.tolist())] if factors else f.tolist()
    return factors


def _positive_eps(eps: float, key: str, name: str) -> float:
    if not eps > 0:
        raise ModelFormatError(f"{name}: metadata {key} is {eps}, expected > 0")
    return eps


def _token_id(md: dict, key: str, name: str) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ModelFormatError(f"{name}: metadata {key} is {one_line(repr(value))}, expected a token id")
    return value

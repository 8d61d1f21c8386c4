"""Tiny random-weight Hugging Face decoders written as GGUF files laid out as llama.cpp's converter
(convert_hf_to_gguf.py) writes them: its tensor names, its metadata keys, its Q/K row permutation
for the llama architecture, GPT-2's Conv1D weights transposed to [out, in], llama3 rope scaling as
a rope_freqs tensor. The transformers model itself is the oracle the tests compare against.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

TINY = dict(vocab_size=96, hidden_size=72, intermediate_size=112, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=128)


def hf_model(arch: str, seed: int = 0, **overrides):
    """A tiny random transformers model of `arch` (llama, llama3, qwen2, qwen3, phi3, mistral, gpt2),
    eval mode, f32."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    tiny = dict(TINY, **{k: overrides.pop(k) for k in list(overrides) if k in TINY})
    if arch in ("gemma2", "gemma3"):
        # small window and caps, so that positions past the window and the squashing both show
        kw = dict(tiny, head_dim=16, query_pre_attn_scalar=16, rms_norm_eps=1e-6, sliding_window=4, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
        if arch == "gemma2":
            model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**kw, attn_logit_softcapping=1.5, final_logit_softcapping=3.0,
                                                         **overrides))
        else:               # six layers: five sliding (local rotary base 10000), one full (base 1e6)
            kw["num_hidden_layers"] = 6
            model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**kw, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                                                             **overrides))
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=tiny["vocab_size"], n_embd=tiny["hidden_size"], n_layer=2, n_head=6,
                            n_positions=tiny["max_position_embeddings"], n_inner=tiny["intermediate_size"],
                            activation_function="gelu_new", bos_token_id=1, eos_token_id=2, **overrides)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        kw = dict(tiny, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, **overrides)
        if arch == "llama3":
            kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
               "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
        if arch == "mistral":
            kw.setdefault("sliding_window", None)
        if arch == "phi3":
            kw["pad_token_id"] = 0
        if arch == "qwen3":
            kw["head_dim"] = 16          # qwen3 sets its head size apart from hidden / heads
        model = cls[1](cls[0](**kw))
    with torch.no_grad():                # spread the norms' weights so a missed norm shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation for the llama architecture (rotation pairs made adjacent)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(cfg) -> np.ndarray:
    rs = cfg.rope_parameters
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    dim = cfg.hidden_size // cfg.num_attention_heads
    out = []
    for freq in 1.0 / (rs["rope_theta"] ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(model, path, arch: str, extra_metadata: dict | None = None, extra_tensors: dict | None = None,
               vocab=None, template: str | None = None, quant: str | None = None):
    """`model` (from hf_model) as a GGUF file at `path`, f32 tensors (norms and biases f32 as llama.cpp);
    `vocab` (tokens, merges, token types of a byte-level BPE, e.g. gguf_vocabs.train_bpe()) and
    `template` add a tokenizer and a chat template, ending turns at <|im_end|>. `quant` ("Q8_0",
    "Q4_0", ...) quantizes the linear weights with the gguf package's own quantizer, as llama.cpp's
    converter does with --outtype."""
    import gguf

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    name = "llama" if arch == "llama3" else arch
    w = gguf.GGUFWriter(str(path), name)
    w.add_name(f"tiny-{arch}")
    t = {}
    if arch in ("gemma2", "gemma3"):
        _gemma_tensors(w, cfg, sd, arch, t)
    elif arch == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        t["token_embd.weight"] = sd["transformer.wte.weight"]
        t["position_embd.weight"] = sd["transformer.wpe.weight"]
        for i in range(cfg.n_layer):
            h, b = f"transformer.h.{i}", f"blk.{i}"
            for src, dst in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
                t[f"{b}.{dst}.weight"], t[f"{b}.{dst}.bias"] = sd[f"{h}.{src}.weight"], sd[f"{h}.{src}.bias"]
            for src, dst in (("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"), ("mlp.c_fc", "ffn_up"),
                             ("mlp.c_proj", "ffn_down")):
                t[f"{b}.{dst}.weight"] = np.ascontiguousarray(sd[f"{h}.{src}.weight"].T)   # Conv1D is [in, out]
                t[f"{b}.{dst}.bias"] = sd[f"{h}.{src}.bias"]
        t["output_norm.weight"], t["output_norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
    else:
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        _llama_sizes(w, cfg)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_vocab_size(cfg.vocab_size)
        if arch == "qwen3":
            w.add_key_length(hd)
            w.add_value_length(hd)
        t["token_embd.weight"] = sd["model.embed_tokens.weight"]
        for i in range(cfg.num_hidden_layers):
            m, b = f"model.layers.{i}", f"blk.{i}"
            if arch == "phi3":           # fused projections, written fused as llama.cpp does
                t |= {f"{b}.attn_norm.weight": sd[f"{m}.input_layernorm.weight"],
                      f"{b}.attn_qkv.weight": sd[f"{m}.self_attn.qkv_proj.weight"],
                      f"{b}.attn_output.weight": sd[f"{m}.self_attn.o_proj.weight"],
                      f"{b}.ffn_norm.weight": sd[f"{m}.post_attention_layernorm.weight"],
                      f"{b}.ffn_up.weight": sd[f"{m}.mlp.gate_up_proj.weight"],
                      f"{b}.ffn_down.weight": sd[f"{m}.mlp.down_proj.weight"]}
                continue
            q, k = sd[f"{m}.self_attn.q_proj.weight"], sd[f"{m}.self_attn.k_proj.weight"]
            if name == "llama":
                q, k = _permute(q, cfg.num_attention_heads), _permute(k, cfg.num_key_value_heads)
            t |= {f"{b}.attn_norm.weight": sd[f"{m}.input_layernorm.weight"], f"{b}.attn_q.weight": q,
                  f"{b}.attn_k.weight": k, f"{b}.attn_v.weight": sd[f"{m}.self_attn.v_proj.weight"],
                  f"{b}.attn_output.weight": sd[f"{m}.self_attn.o_proj.weight"],
                  f"{b}.ffn_norm.weight": sd[f"{m}.post_attention_layernorm.weight"],
                  f"{b}.ffn_gate.weight": sd[f"{m}.mlp.gate_proj.weight"],
                  f"{b}.ffn_up.weight": sd[f"{m}.mlp.up_proj.weight"],
                  f"{b}.ffn_down.weight": sd[f"{m}.mlp.down_proj.weight"]}
            for proj in "qkv":
                if f"{m}.self_attn.{proj}_proj.bias" in sd:
                    t[f"{b}.attn_{proj}.bias"] = sd[f"{m}.self_attn.{proj}_proj.bias"]
            if arch == "qwen3":
                t[f"{b}.attn_q_norm.weight"] = sd[f"{m}.self_attn.q_norm.weight"]
                t[f"{b}.attn_k_norm.weight"] = sd[f"{m}.self_attn.k_norm.weight"]
        t["output_norm.weight"] = sd["model.norm.weight"]
        t["output.weight"] = sd["lm_head.weight"]
        if arch == "llama3":
            t["rope_freqs.weight"] = _llama3_rope_freqs(cfg)
    if vocab is not None:
        tokens, merges, types = vocab
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", "gpt-2")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", tokens.index("<|endoftext|>"))
        w.add_uint32("tokenizer.ggml.eos_token_id", tokens.index("<|im_end|>"))
    if template is not None:
        w.add_string("tokenizer.chat_template", template)
    for key, value in (extra_metadata or {}).items():
        w.add_key_value(key, value, gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else
                        gguf.GGUFValueType.UINT32 if isinstance(value, int) else gguf.GGUFValueType.STRING)
    t |= extra_tensors or {}
    for n, a in t.items():
        a = np.ascontiguousarray(a, np.float32)
        if quant and a.ndim == 2 and n != "token_embd.weight" and n != "position_embd.weight":
            qt = getattr(gguf.GGMLQuantizationType, quant)
            w.add_tensor(n, gguf.quants.quantize(a, qt), raw_shape=gguf.quant_shape_to_byte_shape(a.shape, qt),
                         raw_dtype=qt)
        else:
            w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_sizes(w, cfg):
    """The sizes and norm epsilon every Llama-like family writes under its prefix."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def _gemma_tensors(w, cfg, sd, arch, t):
    """Gemma as llama.cpp's converter writes it: norm weights with Gemma's 1 added, no Q/K permutation,
    the tied embedding only, the soft-capping and window settings under the architecture's prefix."""
    _llama_sizes(w, cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", cfg.attn_logit_softcapping)
        w.add_float32(f"{arch}.final_logit_softcapping", cfg.final_logit_softcapping)
    else:
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    t["token_embd.weight"] = sd["model.embed_tokens.weight"]
    norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for i in range(cfg.num_hidden_layers):
        m, b = f"model.layers.{i}", f"blk.{i}"
        for src, dst in norms.items():
            if f"{m}.{src}.weight" in sd:
                t[f"{b}.{dst}.weight"] = sd[f"{m}.{src}.weight"] + 1
        for src, dst in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down")):
            t[f"{b}.{dst}.weight"] = sd[f"{m}.{src}.weight"]
    t["output_norm.weight"] = sd["model.norm.weight"] + 1


def transformers_reading(model, path):
    """transformers' own model of the GGUF at `path`, as `from_pretrained(gguf_file=...)` reads it
    (dequantizing with the gguf package), given `model`'s config: from these tiny files' metadata it
    does not recover every setting (the vocabulary size without a tokenizer, qwen3's head_dim,
    gemma2's soft caps, gpt2's n_inner). The weights are all the file's."""
    import transformers as tf

    path = Path(path)
    return tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=model.config).eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """The transformers model's logits for every position of `ids`, f32 [len(ids), vocab]."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def resized(model, seed: int = 0, **sizes):
    """`model` (from hf_model) rebuilt at other sizes with fresh random weights from `seed`, its
    norms and biases spread as hf_model spreads them. `sizes` are spelled as Llama's config spells
    them (vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim) for every family; e.g. widths that are multiples of 256, which
    llama.cpp's k-quants need (tests/data/kquant_families/make.py)."""
    import torch

    d = model.config.to_dict()
    d.pop("layer_types", None)           # recomputed from the new layer count
    if d["model_type"] == "gpt2":
        names = dict(hidden_size="n_embd", intermediate_size="n_inner", num_hidden_layers="n_layer",
                     num_attention_heads="n_head")
        sizes = {names.get(k, k): v for k, v in sizes.items() if k not in ("num_key_value_heads", "head_dim")}
    elif "query_pre_attn_scalar" in d and "head_dim" in sizes:
        sizes["query_pre_attn_scalar"] = sizes["head_dim"]
    if "head_dim" not in d:
        sizes.pop("head_dim", None)
    d.update(sizes)
    torch.manual_seed(seed)
    out = type(model)(type(model.config)(**d))
    with torch.no_grad():
        for name, p in out.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return out.eval()

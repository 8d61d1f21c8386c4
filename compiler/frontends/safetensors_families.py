"""HF checkpoints of Gemma 2, Gemma 3 (text only) and GPT-2 -> the hyper-parameters and GGUF-named
weights that gemma.py and gpt2.py build from, the same ones gguf_arch.py reads from a GGUF file.

Where HF's layout differs from llama.cpp's:
  - Gemma's RMS norms compute x * (1 + w) and HF stores w; llama.cpp's converter (and so gemma.py)
    stores 1 + w, so every Gemma norm weight gets its 1 added here (in f32).
  - Gemma's Q/K rows are in HF's half-split (rotate_half) order; llama.cpp does not permute them
    either, and gemma.py rotates in that order: no permutation.
  - GPT-2's linears are Conv1D, stored [in, out]: transposed to [out, in] here (a copy). c_attn is
    the fused Q|K|V weight and bias, as gpt2.py takes them; its causal-mask buffers (`attn.bias`,
    `attn.masked_bias`, in old checkpoints) are ignored; the original checkpoints name tensors
    without the `transformer.` prefix.
A config.json setting that changes the numbers is applied (soft-capping, sliding windows and which
layers slide, the query scale, the local and global rotary bases) or refused, naming it. A value
config.json leaves out is transformers' default for the model_type, as transformers would run it.
"""

from __future__ import annotations

import re

import numpy as np

from isthmus.compiler.frontends.files import TakenWeights, one_line
from isthmus.compiler.frontends.gguf import MAX_CONTEXT, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH
from isthmus.compiler.frontends.safetensors import _rope, _token_ids, hf_getter, hf_name, renamed_weights
from isthmus.compiler.quant import QuantizedArray
from isthmus.errors import ModelFormatError, UnsupportedError

# transformers' defaults (Gemma2Config, Gemma3TextConfig) for the settings a config.json may leave out
_GEMMA_DEFAULTS = {
    "gemma2": dict(rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, head_dim=256, max_position_embeddings=8192),
    "gemma3": dict(rope_theta=1_000_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=None, final_logit_softcapping=None, head_dim=256,
                   max_position_embeddings=131072),
}
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")         # GELU's tanh form, which both builders apply
_GEMMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_GEMMA_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
_GEMMA_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_GPT2_LAYER_RE = re.compile(r"(?:transformer\.)?h\.(\d+)\.(.+)\.(weight|bias)")
_GPT2_GLOBAL_RE = re.compile(r"(?:transformer\.)?(wte|wpe|ln_f)\.(weight|bias)")
_GPT2_GLOBALS = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
                 "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
_GPT2_LAYERS = {"ln_1": ("attn_norm", False), "ln_2": ("ffn_norm", False), "attn.c_attn": ("attn_qkv", True),
                "attn.c_proj": ("attn_output", True), "mlp.c_fc": ("ffn_up", True), "mlp.c_proj": ("ffn_down", True)}
_GPT2_BUFFERS = re.compile(r"(?:transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")   # causal masks, not weights
_NOTHING = re.compile(r"(?!)")


def family_config_from_hf(cfg: dict, model_type: str, where: str) -> dict:
    """config.json of a gemma2, gemma3_text or gpt2 checkpoint -> its builder's hyper-parameters."""
    if model_type == "gpt2":
        return _gpt2_config(cfg, where)
    return _gemma_config(cfg, "gemma2" if model_type == "gemma2" else "gemma3", where)


def build_family(checkpoint: dict, config: dict, where: str):
    """(the weights as `TakenWeights`, GGUF name -> HF name, the decoder graph) of a Gemma or GPT-2 checkpoint."""
    if config["architecture"] == "gpt2":
        from isthmus.compiler.frontends.gpt2 import build_gpt2 as build

        weights, shown = renamed_weights(checkpoint, config, where, _gpt2_tensor, _GPT2_BUFFERS)
    else:
        from isthmus.compiler.frontends.gemma import build_gemma as build

        weights, shown = renamed_weights(checkpoint, config, where, _gemma_tensor, _NOTHING)
    weights = TakenWeights(weights)
    return weights, shown, build(config, weights, name=config["name"], where=where)


# --- config.json -------------------------------------------------------------------------------

def _refuse(cfg: dict, where: str, key: str, bad, why: str) -> None:
    if key in cfg and cfg[key] is not None and cfg[key] == bad and type(cfg[key]) is type(bad):
        raise UnsupportedError(f"{where}: {key} {one_line(repr(cfg[key]))} is not applied by isthmus ({why})")


def _common(cfg: dict, where: str, arch: str, vocab: int) -> dict:
    eos = _token_ids(cfg.get("eos_token_id"), "eos_token_id", vocab, where)
    bos = _token_ids(cfg.get("bos_token_id"), "bos_token_id", vocab, where)
    return {"architecture": arch, "name": hf_name(cfg), "vocab_size": vocab, "bos_token_id": bos[0] if bos else None,
            "eos_token_id": eos[0] if eos else None, "stop_token_ids": eos[1:], "chat_template": None,
            "tied_embeddings": cfg.get("tie_word_embeddings", True) is True, "qkv_bias": False}


def _gpt2_config(cfg: dict, where: str) -> dict:
    get = hf_getter(cfg, where)
    _refuse(cfg, where, "scale_attn_by_inverse_layer_idx", True, "it divides each layer's attention scores by "
            "the layer's number")
    _refuse(cfg, where, "scale_attn_weights", False, "isthmus scales attention scores by 1/sqrt(head size)")
    _refuse(cfg, where, "add_cross_attention", True, "isthmus builds a decoder without cross-attention")
    # reorder_and_upcast_attn computes the scores in f32 with the scale applied first: isthmus's
    # attention is f32 throughout, so it gives the same numbers.
    act = cfg.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise UnsupportedError(f"{where}: activation_function {one_line(repr(act))} is not supported; supported: "
                               f"{', '.join(map(repr, _TANH_GELU))} (GELU's tanh form, which the gpt2 builder applies)")
    hidden, n_heads = get("n_embd", int, limit=MAX_WIDTH), get("n_head", int, limit=MAX_HEADS)
    if hidden % n_heads:
        raise ModelFormatError(f"{where}: n_embd {hidden} is not a multiple of n_head {n_heads}")
    eps = get("layer_norm_epsilon", float, 1e-5)
    return {
        **_common(cfg, where, "gpt2", get("vocab_size", int, limit=MAX_VOCAB)),
        "n_layers": get("n_layer", int, limit=MAX_LAYERS),
        "hidden": hidden,
        "ffn": get("n_inner", int, 4 * hidden, limit=MAX_WIDTH),
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "head_dim": hidden // n_heads,
        "context_length": get("n_positions", int, 1024, limit=MAX_CONTEXT),
        "qk_norm": False,
        "norm_eps": eps,
    }


def _gemma_config(cfg: dict, arch: str, where: str) -> dict:
    defaults = _GEMMA_DEFAULTS[arch]
    get = hf_getter(cfg, where)

    def setting(key):                 # absent: transformers' default; null: off
        return cfg[key] if key in cfg else defaults[key]

    _refuse(cfg, where, "attention_bias", True, "Gemma's builder has no attention biases")
    _refuse(cfg, where, "use_bidirectional_attention", True, "isthmus's attention is causal")
    if cfg.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise UnsupportedError(f"{where}: partial_rotary_factor {cfg['partial_rotary_factor']!r} is not supported")
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in _TANH_GELU:
        raise UnsupportedError(f"{where}: hidden_activation {one_line(repr(act))} is not supported; supported: "
                               f"{', '.join(map(repr, _TANH_GELU))} (GELU's tanh form, which the gemma builder applies)")

    hidden, n_heads = get("hidden_size", int, limit=MAX_WIDTH), get("num_attention_heads", int, limit=MAX_HEADS)
    n_kv_heads = get("num_key_value_heads", int, n_heads, limit=MAX_HEADS)
    if n_heads % n_kv_heads:
        raise ModelFormatError(f"{where}: num_attention_heads {n_heads} is not a multiple of "
                               f"num_key_value_heads {n_kv_heads}")
    head_dim = get("head_dim", int, defaults["head_dim"], limit=MAX_HEAD_DIM)
    n_layers = get("num_hidden_layers", int, limit=MAX_LAYERS)
    config = {
        **_common(cfg, where, arch, get("vocab_size", int, limit=MAX_VOCAB)),
        "n_layers": n_layers,
        "hidden": hidden,
        "ffn": get("intermediate_size", int, limit=MAX_WIDTH),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "rope_dim": head_dim,
        "rms_eps": get("rms_norm_eps", float, 1e-6),
        "context_length": get("max_position_embeddings", int, defaults["max_position_embeddings"], limit=MAX_CONTEXT),
        "qk_norm": arch == "gemma3",
        "attn_scale": float(get("query_pre_attn_scalar", float, defaults["query_pre_attn_scalar"])) ** -0.5,
        "sliding": _sliding_layers(cfg, arch, n_layers, where),
    }
    for key, ours in (("attn_logit_softcapping", "attn_softcap"), ("final_logit_softcapping", "final_softcap")):
        cap = setting(key)
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0):
            raise ModelFormatError(f"{where}: {key} is {one_line(repr(cap))}, expected a positive number or null")
        config[ours] = 0.0 if cap is None else float(cap)
    window = setting("sliding_window")
    if any(config["sliding"]) and (type(window) is not int or window <= 0):
        raise ModelFormatError(f"{where}: sliding_window is {one_line(repr(window))}, expected a positive integer "
                               "(layer_types has sliding layers)")
    config["sliding_window"] = window if any(config["sliding"]) else 0
    config["rope_theta"], config["rope_factors"], config["rope_theta_local"] = _gemma_rope(cfg, arch, head_dim, where)
    return config


def _sliding_layers(cfg: dict, arch: str, n_layers: int, where: str) -> list[bool]:
    """Which layers use the sliding window: layer_types, or else transformers' pattern for the model type
    (Gemma 2: every other layer from the first; Gemma 3: all but every sliding_window_pattern-th)."""
    kinds = cfg.get("layer_types")
    if kinds is None:
        if arch == "gemma2":
            pattern = 2
        else:
            key = "sliding_window_pattern" if "sliding_window_pattern" in cfg else "_sliding_window_pattern"
            pattern = cfg.get(key, 6)
            if type(pattern) is not int or pattern <= 0:
                raise ModelFormatError(f"{where}: {key} is {one_line(repr(pattern))}, expected a positive integer")
        return [(i + 1) % pattern != 0 for i in range(n_layers)]
    if not isinstance(kinds, list) or len(kinds) != n_layers:
        raise ModelFormatError(f"{where}: layer_types is {one_line(repr(kinds))[:80]}, expected a list of "
                               f"{n_layers} layer kinds")
    for kind in kinds:
        if kind not in ("sliding_attention", "full_attention"):
            raise UnsupportedError(f"{where}: layer_types holds {one_line(repr(kind))}; isthmus applies "
                                   "'sliding_attention' and 'full_attention'")
    return [kind == "sliding_attention" for kind in kinds]


def _gemma_rope(cfg: dict, arch: str, head_dim: int, where: str) -> tuple[float, list[float], float]:
    """(global base, global per-pair frequency divisors, the sliding layers' base). transformers >= 5
    writes Gemma 3's rotary as rope_parameters per layer kind; older ones rope_theta, rope_scaling and
    rope_local_base_freq. gemma.py turns sliding layers without scaling, so scaling is refused there."""
    default = _GEMMA_DEFAULTS[arch]["rope_theta"]
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):
        full = {"rope_theta": default, "rope_parameters": params.get("full_attention")}
        local = {"rope_theta": 10000.0, "rope_parameters": params.get("sliding_attention")}
    else:
        full = {"rope_theta": default, **{k: cfg[k] for k in ("rope_theta", "rope_scaling", "rope_parameters")
                                         if cfg.get(k) is not None}}
        local = full if arch == "gemma2" else {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    theta, factors = _rope(full, where)
    local_theta, local_factors = _rope(local, where)
    if local_factors(head_dim):
        raise UnsupportedError(f"{where}: rope scaling on the sliding-window layers is not applied by isthmus "
                               "(its Gemma builder scales only the full-attention layers' rotary)")
    return theta, factors(head_dim), local_theta


# --- tensors ---------------------------------------------------------------------------------

def _gemma_tensor(hf_name: str, array):
    """(GGUF name, array) of a HF Gemma tensor: norm weights with Gemma's 1 added, as gemma.py takes them."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight", array
    if hf_name == "lm_head.weight":
        return "output.weight", array
    if hf_name == "model.norm.weight":
        return "output_norm.weight", _plus_one(array)
    m = _GEMMA_LAYER_RE.fullmatch(hf_name)
    if m is None:
        return None
    blk, part = f"blk.{int(m.group(1))}", m.group(2)
    if part in _GEMMA_NORMS:
        return f"{blk}.{_GEMMA_NORMS[part]}.weight", _plus_one(array)
    if part in _GEMMA_LINEARS:
        return f"{blk}.{_GEMMA_LINEARS[part]}.weight", array
    return None


def _gpt2_tensor(hf_name: str, array):
    """(GGUF name, array) of a HF GPT-2 tensor: Conv1D weights transposed to [out, in]."""
    if hf_name == "lm_head.weight":
        return "output.weight", array
    m = _GPT2_GLOBAL_RE.fullmatch(hf_name)
    if m:
        name = _GPT2_GLOBALS.get(f"{m.group(1)}.{m.group(2)}")
        if name is None:
            return None
        widen = name.startswith("output_norm") and isinstance(array, QuantizedArray)
        return name, array.dequantize() if widen else array
    m = _GPT2_LAYER_RE.fullmatch(hf_name)
    if m is None or m.group(2) not in _GPT2_LAYERS:
        return None
    name, conv1d = _GPT2_LAYERS[m.group(2)]
    name = f"blk.{int(m.group(1))}.{name}.{m.group(3)}"
    if len(array.shape) == 1 and isinstance(array, QuantizedArray):
        return name, array.dequantize()          # biases and norms in f32, as llama.cpp writes them
    return name, _transposed(array) if conv1d and m.group(3) == "weight" else array


def _plus_one(array) -> np.ndarray:
    values = array.dequantize() if isinstance(array, QuantizedArray) else np.asarray(array, np.float32)
    return values.astype(np.float32) + np.float32(1)


def _transposed(array):
    if len(array.shape) != 2:
        return array                   # the builder names the tensor and the shape it expected
    n_in, n_out = array.shape
    if isinstance(array, QuantizedArray):          # bf16: transpose the 16-bit values themselves
        bits = np.ascontiguousarray(array.raw).view("<u2").reshape(n_in, n_out)
        return QuantizedArray(array.qtype, (n_out, n_in), np.ascontiguousarray(bits.T).view(np.uint8))
    return np.ascontiguousarray(array.T)

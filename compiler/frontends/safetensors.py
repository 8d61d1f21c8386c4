"""HF checkpoint folder (config.json + *.safetensors) -> Model: the Llama family (llama, mistral,
qwen2, qwen3, phi3), and Gemma 2, Gemma 3 (text) and GPT-2 (safetensors_families.py).

A safetensors file is: a u64 little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the
tensor data, with offsets relative to the byte after the header. It is read here from that
description alone (neither the `safetensors` nor the `torch` package is imported): the file is
memory-mapped and every tensor is a read-only view of it. F32 and F16 become numpy arrays; BF16
stays 16-bit as a `QuantizedArray("bf16")` (widened to f32 by `uint16 << 16` when dequantized),
as the GGUF reader holds it. The file is untrusted: offsets, sizes and shapes are checked
before use, and any malformation is a one-line `ModelFormatError` naming the file.

HF names map onto the GGUF names the builders expect (llama.py, gemma.py, gpt2.py); HF stores Q/K
rows in the half-split (rotate_half) order, so no row is permuted and the graph uses
`rope_layout="half"` (llama.cpp permutes only the llama architecture's rows, into the interleaved
order its GGUF path undoes with `rope_layout="interleaved"`). A sharded checkpoint lists its
files in model.safetensors.index.json.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np

from isthmus.compiler.frontends import Model
from isthmus.compiler.quant import QuantizedArray
from isthmus.compiler.frontends.files import TakenWeights, map_readonly, one_line
from isthmus.compiler.frontends.memfiles import MemoryFile, MemoryFolder
from isthmus.compiler.frontends.gguf import (MAX_CONTEXT, MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB,
                                             MAX_WIDTH, check_limit)
from isthmus.errors import ModelFormatError, UnsupportedError

_PLAIN = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
# Every dtype the format defines, with its size in bits, so a valid file is told apart from a corrupt one.
_ITEM_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
              "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
              "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64}
SUPPORTED_DTYPES = (*_PLAIN, "BF16")
MAX_HEADER = 100_000_000  # the format's own limit on the JSON header

INDEX_FILE = "model.safetensors.index.json"
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",           # qwen3
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",                  # phi3's fused ones
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
# the model_types build_llama builds (it reads the variant's tensors), and the other families'
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
MODEL_TYPES = (*LLAMA_TYPES, "gemma2", "gemma3_text", "gpt2")
_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old checkpoints carry it


def load_safetensors(folder) -> Model:
    """`folder`: a path, or a `memfiles.MemoryFolder` (the checkpoint's files in memory, as sealed)."""
    folder = _folder(folder)
    config = config_from_hf(_read_json(folder / "config.json"), str(folder / "config.json"))
    _add_generation_stops(folder, config)
    tok_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    if not isinstance(tok_config, dict):
        raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: expected a JSON object")
    config["chat_template"] = _chat_template(folder, tok_config)
    config["name"] = config["name"] or folder.resolve().name

    checkpoint, arch = read_checkpoint(folder), config["architecture"]
    if arch in LLAMA_TYPES:
        from isthmus.compiler.frontends.llama import build_llama

        weights, shown = renamed_weights(checkpoint, config, str(folder), _llama_tensor, _IGNORED_RE)
        weights = TakenWeights(weights)
        graph = build_llama(config, weights, rope_layout="half", name=config["name"], where=str(folder))
    else:
        from isthmus.compiler.frontends.safetensors_families import build_family

        weights, shown, graph = build_family(checkpoint, config, str(folder))
    weights.refuse_unused(str(folder), arch, shown=shown)
    tokenizer = None
    if (folder / "tokenizer.json").exists():
        from isthmus.compiler.frontends.hf_tokenizer import tokenizer_from_hf

        tokenizer = tokenizer_from_hf(folder, tok_config, bos_id=config["bos_token_id"],
                                      eos_id=config["eos_token_id"], stop_ids=config["stop_token_ids"],
                                      chat_template=config["chat_template"], vocab_size=config["vocab_size"])
    return Model(graph, str(folder), "safetensors", config, tokenizer)


def llama_weights(hf: dict, config: dict, where: str) -> dict:
    """HF-named tensors -> the GGUF-named dict `build_llama` takes (which checks shapes and presence)."""
    return renamed_weights(hf, config, where, _llama_tensor, _IGNORED_RE)[0]


def renamed_weights(hf: dict, config: dict, where: str, rename, ignored: re.Pattern) -> tuple[dict, dict]:
    """HF-named tensors -> (GGUF-named tensors, GGUF name -> HF name). `rename(hf_name, array)` gives
    (GGUF name, the array as the builder takes it), or None for a name outside the architecture;
    `ignored` matches the harmless extras a checkpoint may carry (buffers, not weights)."""
    weights, shown = {}, {}
    for hf_name, array in hf.items():
        renamed = rename(hf_name, array)
        if renamed is None:
            if ignored.fullmatch(hf_name):
                continue
            raise UnsupportedError(f"{where}: tensor {one_line(hf_name)} is not part of the "
                                   f"{config['architecture']} architecture isthmus builds")
        name, array = renamed
        if name in weights:
            raise ModelFormatError(f"{where}: tensors {one_line(shown[name])} and {one_line(hf_name)} are the same "
                                   f"weight ({name})")
        weights[name], shown[name] = array, hf_name
    if config["tied_embeddings"]:
        weights.pop("output.weight", None)     # some checkpoints store the tied copy anyway
    elif "output.weight" not in weights:
        raise ModelFormatError(f"{where}: tensor lm_head.weight is missing "
                               f"(config.json says the embeddings are not tied)")
    extra = sorted(n for n in weights if n.startswith("blk.") and int(n.split(".")[1]) >= config["n_layers"])
    if extra:
        raise ModelFormatError(f"{where}: tensor {one_line(shown[extra[0]])} is beyond the {config['n_layers']} "
                               f"layers config.json declares")
    return weights, shown


def _add_generation_stops(folder: Path, config: dict) -> None:
    """generate() stops at the end tokens generation_config.json lists, which may be more than config.json names."""
    path = folder / "generation_config.json"
    if not path.exists():
        return
    gen = _read_json(path)
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    stops = config["stop_token_ids"]
    stops += [i for i in _token_ids(eos, "eos_token_id", config["vocab_size"], str(path))
              if i != config["eos_token_id"] and i not in stops]
    if config["eos_token_id"] is None and stops:
        config["eos_token_id"] = stops.pop(0)


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a HF Llama tensor, or None for a name outside the architecture."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _llama_tensor(hf_name: str, array):
    name = gguf_name(hf_name)
    return None if name is None else (name, array)


# --- config.json -------------------------------------------------------------------------------

def config_from_hf(cfg: dict, where: str) -> dict:
    """The hyperparameters of config.json's model_type, as its builder takes them."""
    model_type = _model_type(cfg, where)
    if model_type in LLAMA_TYPES:
        return llama_config_from_hf(cfg, where)
    from isthmus.compiler.frontends.safetensors_families import family_config_from_hf

    return family_config_from_hf(cfg, model_type, where)


def _model_type(cfg: dict, where: str) -> str:
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{where}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type == "gemma3":
        raise UnsupportedError(f"{where}: model_type 'gemma3' is the multimodal Gemma 3 (vision tower included); "
                               "isthmus reads text-only Gemma 3 checkpoints (Gemma3ForCausalLM, model_type "
                               "'gemma3_text')")
    if model_type not in MODEL_TYPES:
        raise UnsupportedError(f"{where}: model_type {one_line(repr(model_type))} is not supported; "
                               f"supported: {', '.join(MODEL_TYPES)}")
    return model_type


def hf_getter(cfg: dict, where: str):
    """get(key, kind, default=..., limit=None): config.json's positive number `key` (`default` when it
    is absent or null; a missing key without one is an error), checked against `limit`."""

    def get(key: str, kind: type, default=..., limit: int | None = None):
        value = cfg.get(key)
        if value is None:
            if default is ...:
                raise ModelFormatError(f"{where}: {key} is missing")
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else type(value) is kind
        if not ok or value <= 0:
            raise ModelFormatError(f"{where}: {key} is {one_line(repr(value))}, expected a positive {kind.__name__}")
        return kind(value) if limit is None else check_limit(value, limit, key, where)
    return get


def hf_name(cfg: dict) -> str | None:
    """The checkpoint's own name, from config.json's _name_or_path."""
    name = cfg.get("_name_or_path")
    return name.rstrip("/").rsplit("/", 1)[-1] if isinstance(name, str) and name.strip("/") else None


def llama_config_from_hf(cfg: dict, where: str) -> dict:
    """The hyperparameters `build_llama` needs (the keys of `gguf_arch.config_from_gguf`), from config.json."""
    model_type = _model_type(cfg, where)
    if model_type not in LLAMA_TYPES:
        raise UnsupportedError(f"{where}: model_type {model_type!r} is not a Llama-family model")
    get = hf_getter(cfg, where)

    for key in ("attention_bias", "mlp_bias"):      # qwen2's Q/K/V biases are its own, not these flags
        if cfg.get(key):
            raise UnsupportedError(f"{where}: {key} is true; isthmus builds {model_type} without those biases")
    if cfg.get("use_sliding_window") or (
            isinstance(cfg.get("sliding_window"), int) and model_type in ("mistral", "qwen2", "qwen3")
            and cfg["sliding_window"] < cfg.get("max_position_embeddings", 1 << 62)
            and cfg.get("use_sliding_window", model_type == "mistral")):
        raise UnsupportedError(f"{where}: sliding_window {cfg.get('sliding_window')!r} is not applied by isthmus "
                               "(full attention would give other numbers past the window)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"{where}: hidden_act {one_line(repr(act))} is not supported; supported: 'silu'")
    if cfg.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise UnsupportedError(f"{where}: partial_rotary_factor {cfg['partial_rotary_factor']!r} is not supported")
    rope_theta, rope_factors = _rope(cfg, where)

    hidden, n_heads = get("hidden_size", int, limit=MAX_WIDTH), get("num_attention_heads", int, limit=MAX_HEADS)
    n_kv_heads = get("num_key_value_heads", int, n_heads, limit=MAX_HEADS)
    if cfg.get("head_dim") is None and hidden % n_heads:
        raise ModelFormatError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}")
    head_dim = get("head_dim", int, hidden // n_heads, limit=MAX_HEAD_DIM)
    if n_heads % n_kv_heads:
        raise ModelFormatError(f"{where}: num_attention_heads {n_heads} is not a multiple of "
                               f"num_key_value_heads {n_kv_heads}")
    vocab = get("vocab_size", int, limit=MAX_VOCAB)
    eos = _token_ids(cfg.get("eos_token_id"), "eos_token_id", vocab, where)
    bos = _token_ids(cfg.get("bos_token_id"), "bos_token_id", vocab, where)
    return {
        "architecture": model_type,
        "name": hf_name(cfg),
        "n_layers": get("num_hidden_layers", int, limit=MAX_LAYERS),
        "hidden": hidden,
        "ffn": get("intermediate_size", int, limit=MAX_WIDTH),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "rope_dim": head_dim,
        "rms_eps": get("rms_norm_eps", float, 1e-6),
        "rope_theta": rope_theta,
        "rope_factors": rope_factors(head_dim),
        "context_length": get("max_position_embeddings", int, 2048, limit=MAX_CONTEXT),
        "vocab_size": vocab,
        "bos_token_id": bos[0] if bos else None,
        "eos_token_id": eos[0] if eos else None,
        "stop_token_ids": eos[1:],
        "chat_template": None,
        "tied_embeddings": cfg.get("tie_word_embeddings", False) is True,
        "qkv_bias": model_type == "qwen2",
        "qk_norm": model_type == "qwen3",
    }


def _rope(cfg: dict, where: str):
    """rope_theta, and a function head_dim -> per-pair frequency divisors (default, linear, llama3)."""
    # transformers < 5 writes rope_theta + rope_scaling; 5 writes rope_parameters {rope_type, rope_theta}.
    from isthmus.compiler.frontends.llama import llama3_rope_factors

    theta, scaling = cfg.get("rope_theta"), None
    for key in ("rope_scaling", "rope_parameters"):
        params = cfg.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ModelFormatError(f"{where}: {key} is {one_line(repr(params))}, expected an object")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise UnsupportedError(f"{where}: rope scaling {one_line(repr(kind))} is not supported "
                                   "(default, linear and llama3 are)")
        if kind != "default":
            scaling = params
        theta = params.get("rope_theta", theta)
    theta = 10000.0 if theta is None else theta
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        raise ModelFormatError(f"{where}: rope_theta is {one_line(repr(theta))}, expected a positive number")

    def number(key):
        v = scaling.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ModelFormatError(f"{where}: rope scaling {key} is {one_line(repr(v))}, expected a positive number")
        return float(v)

    def factors(head_dim: int) -> list[float]:
        if scaling is None:
            return []
        if scaling.get("rope_type", scaling.get("type")) == "linear":
            return [number("factor")] * (head_dim // 2)
        return llama3_rope_factors(float(theta), head_dim, number("factor"), number("low_freq_factor"),
                                   number("high_freq_factor"), number("original_max_position_embeddings"))
    return float(theta), factors


def _token_ids(value, key: str, vocab: int, where: str) -> list[int]:
    """A token id or a list of them (Llama 3 lists several end tokens), as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(type(v) is int and 0 <= v < vocab for v in values):
        raise ModelFormatError(f"{where}: {key} is {one_line(repr(value))}, expected token ids below {vocab}")
    return values


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    # transformers >= 4.47 may write the template to its own file; older ones keep it in tokenizer_config.json.
    path = folder / "chat_template.jinja"
    if path.exists():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path}: cannot read ({one_line(str(e))})") from None
    template = tok_config.get("chat_template")
    if isinstance(template, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read ({one_line(str(e))})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


# --- safetensors files -----------------------------------------------------------------------

def read_checkpoint(folder) -> dict:
    """All tensors of a checkpoint folder by HF name: the files model.safetensors.index.json names,
    or else every *.safetensors file in the folder."""
    folder = _folder(folder)
    index_path = folder / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ModelFormatError(f"{index_path}: weight_map is missing or does not map tensor names "
                                   f"to file names")
        for file in set(weight_map.values()):
            if Path(file).name != file:
                raise ModelFormatError(f"{index_path}: shard {one_line(file)} is not a file name inside the folder")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        weight_map = None
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{folder}: no *.safetensors file (and no {INDEX_FILE})")
    tensors: dict = {}
    for path in files:
        for name, array in read_safetensors(path).items():
            if name in tensors:
                raise ModelFormatError(f"{path}: tensor {one_line(name)} also appears in another file")
            if weight_map is not None and weight_map.get(name) != path.name:
                raise ModelFormatError(f"{path}: tensor {one_line(name)} is not listed there in {INDEX_FILE}")
            tensors[name] = array
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ModelFormatError(f"{folder / weight_map[missing[0]]}: tensor {one_line(missing[0])} "
                                   f"listed in {INDEX_FILE} is not in the file")
    return tensors


def read_safetensors(path) -> dict:
    """Name -> read-only view of one safetensors file (np.ndarray for F32/F16, QuantizedArray for BF16)."""
    if isinstance(path, MemoryFile):
        name, mm = str(path), path.buffer()
        if len(mm) < 8:
            raise ModelFormatError(f"{name}: not a safetensors file (only {len(mm)} bytes long)")
    else:
        name = os.fspath(path)
        mm = map_readonly(name, "safetensors")
    (n,) = struct.unpack_from("<Q", mm, 0)
    if n > min(len(mm) - 8, MAX_HEADER):
        raise ModelFormatError(f"{name}: header claims {n} bytes but the file has {len(mm) - 8} after the length; "
                               f"truncated or not a safetensors file")
    try:
        header = json.loads(bytes(mm[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFormatError(f"{name}: header is not valid JSON; not a safetensors file") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{name}: header is not a JSON object")
    data_start, data_size = 8 + n, len(mm) - 8 - n
    entries, unsupported = [], None
    for tname, info in header.items():
        if tname == "__metadata__":
            continue
        shown = one_line(tname)
        if not isinstance(info, dict):
            raise ModelFormatError(f"{name}: tensor {shown} has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ITEM_BITS:
            raise ModelFormatError(f"{name}: tensor {shown} has unknown dtype {one_line(repr(dtype))}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
            raise ModelFormatError(f"{name}: tensor {shown} has a bad shape {one_line(repr(shape))}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ModelFormatError(f"{name}: tensor {shown} has bad data_offsets {one_line(repr(offsets))}")
        begin, end = offsets
        nbytes = math.prod(shape) * _ITEM_BITS[dtype] // 8
        if end - begin != nbytes:
            raise ModelFormatError(f"{name}: tensor {shown} of shape {tuple(shape)} in {dtype} needs {nbytes} bytes "
                                   f"but its data_offsets span {end - begin}")
        if end > data_size:
            raise ModelFormatError(f"{name}: tensor {shown} data (bytes {begin}..{end}) runs past the end of the file "
                                   f"({data_size} data bytes); the file is truncated")
        if dtype not in SUPPORTED_DTYPES:
            # Raised after the whole header is checked, so a corrupt file is called corrupt.
            unsupported = unsupported or (shown, dtype)
        entries.append((tname, dtype, tuple(shape), data_start + begin, nbytes))
    if unsupported:
        raise UnsupportedError(f"{name}: tensor {unsupported[0]} is stored as {unsupported[1]}; "
                               f"supported: {', '.join(SUPPORTED_DTYPES)}")
    return {tname: _view(mm, dtype, shape, start, nbytes) for tname, dtype, shape, start, nbytes in entries}


def _folder(folder):
    """A folder on disk as a Path; an in-memory one as it is."""
    return folder if isinstance(folder, MemoryFolder) else Path(folder)


def _view(mm: mmap.mmap, dtype: str, shape: tuple, start: int, nbytes: int):
    if dtype == "BF16":
        raw = np.frombuffer(mm, np.uint8, nbytes, start) if nbytes else np.zeros(0, np.uint8)
        return QuantizedArray("bf16", shape or (1,), raw)
    if nbytes == 0:
        arr = np.zeros(shape, _PLAIN[dtype])
        arr.flags.writeable = False
        return arr
    return np.frombuffer(mm, _PLAIN[dtype], math.prod(shape), start).reshape(shape)



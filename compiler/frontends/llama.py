"""Build the graph of a Llama-family decoder from its hyperparameters and weights.

Weights are named as in GGUF (`blk.{i}.attn_q.weight`, ...); the safetensors frontend renames
HF checkpoints to match. `rope_layout` says how Q/K features pair up for rotation: GGUF files
permute Q/K rows for the interleaved (Meta) layout, HF checkpoints use the half-split layout.
The family's variants come from the config: `qkv_bias` (Qwen2's Q/K/V biases), `qk_norm` (Qwen3's
RMS norm over each Q and K head before the rotary: `attn_q_norm`, `attn_k_norm`), `rope_factors`
(per-pair frequency divisors: llama3's rope_freqs, linear scaling); and from the weights present:
one fused QKV weight and one fused gate|up weight (Phi-3: `attn_qkv`, `ffn_up` of 2 x ffn rows),
split here into row views so the fusion pass sees ordinary siblings. A frontend passes the weights
as `files.TakenWeights` and refuses any tensor the builder did not read.

Graph interface, recorded on the graph as its `DecoderInterface` (what generation drives):
    inputs   input_ids i64[batch, seq], position_ids i64[batch, seq],
             past_key.{i}, past_value.{i} f32[batch, kv_heads, past, head_dim]
    outputs  logits f32[batch, seq, vocab], present_key.{i}, present_value.{i}
             (the KV cache with this step's keys appended: [batch, kv_heads, past+seq, head_dim])
"""

from __future__ import annotations

from collections.abc import Mapping

from isthmus.compiler.ir import DecoderInterface, Graph, KVLayer
from isthmus.compiler.quant import QuantizedArray
from isthmus.errors import ModelFormatError


def decoder_inputs(g: Graph, n_layers: int, kv_heads: int, head_dim: int):
    """The decoder interface's inputs every builder here declares: token ids, positions and each
    layer's (past key, past value), [batch, kv_heads, past, head_dim]."""
    ids = g.add_input("input_ids", ("batch", "seq"), "i64")
    pos = g.add_input("position_ids", ("batch", "seq"), "i64")
    pasts = [(g.add_input(f"past_key.{i}", ("batch", kv_heads, "past", head_dim), "f32"),
              g.add_input(f"past_value.{i}", ("batch", kv_heads, "past", head_dim), "f32")) for i in range(n_layers)]
    return ids, pos, pasts


def finish_decoder(g: Graph, logits, pasts: list, presents: list) -> None:
    """Outputs logits then each layer's present key and value, and the record of that interface."""
    g.set_outputs([logits] + presents)
    g.decoder = DecoderInterface("input_ids", logits.name, "position_ids", tuple(
        KVLayer(pk.name, pv.name, k.name, v.name) for (pk, pv), k, v in zip(pasts, presents[::2], presents[1::2])))


def _weight(g: Graph, weights: dict, name: str, shape: tuple, where: str):
    if name not in weights:
        raise ModelFormatError(f"{where}: tensor {name} is missing")
    w = weights[name]
    if tuple(w.shape) != tuple(shape):
        raise ModelFormatError(f"{where}: tensor {name} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    return g.add_constant(name, w)


def split_rows(w, sizes: list[int], name: str, where: str) -> list:
    """A [sum(sizes), cols] weight (or [sum(sizes)] bias) as consecutive row blocks, without copying."""
    if w.shape[0] != sum(sizes):
        raise ModelFormatError(f"{where}: tensor {name} has {w.shape[0]} rows, expected {sum(sizes)}")
    parts, lo = [], 0
    for n in sizes:
        if isinstance(w, QuantizedArray):
            parts.append(QuantizedArray(w.qtype, (n, *w.shape[1:]), w.raw[lo:lo + n]))
        else:
            parts.append(w[lo:lo + n])
        lo += n
    return parts


def llama3_rope_factors(theta: float, dim: int, factor: float, low: float, high: float, original: float) -> list[float]:
    """Llama 3's rope scaling as per-pair frequency divisors (what llama.cpp's converter writes as the
    rope_freqs tensor): long wavelengths slowed by `factor`, short ones kept, a smooth band between."""
    import math

    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


class _Overlay(Mapping):
    """The weights with some names added or replaced (the row blocks of fused tensors)."""

    def __init__(self, base: Mapping, extra: dict):
        self.base, self.extra = base, extra

    def __getitem__(self, name):
        return self.extra[name] if name in self.extra else self.base[name]

    def __iter__(self):
        return iter({**dict.fromkeys(self.base), **dict.fromkeys(self.extra)})

    def __len__(self):
        return len(set(self.base) | set(self.extra))


def _unfused(config: dict, weights: Mapping, where: str) -> Mapping:
    """Phi-3's fused QKV and gate|up weights as separate Q/K/V and gate/up row blocks."""
    D, F, H, KVH, hd = (config[k] for k in ("hidden", "ffn", "n_heads", "n_kv_heads", "head_dim"))
    extra = {}
    for i in range(config["n_layers"]):
        p = f"blk.{i}"
        if f"{p}.attn_qkv.weight" in weights and f"{p}.attn_q.weight" not in weights:
            for suffix in ("weight", "bias"):
                if f"{p}.attn_qkv.{suffix}" in weights:
                    parts = split_rows(weights[f"{p}.attn_qkv.{suffix}"], [H * hd, KVH * hd, KVH * hd],
                                       f"{p}.attn_qkv.{suffix}", where)
                    extra.update({f"{p}.attn_{x}.{suffix}": t for x, t in zip("qkv", parts)})
        up = weights.get(f"{p}.ffn_up.weight") if f"{p}.ffn_up.weight" in weights else None
        if f"{p}.ffn_gate.weight" not in weights and up is not None and up.shape[0] == 2 * F:
            gate, up = split_rows(weights[f"{p}.ffn_up.weight"], [F, F], f"{p}.ffn_up.weight", where)  # gate first
            extra.update({f"{p}.ffn_gate.weight": gate, f"{p}.ffn_up.weight": up})
    return _Overlay(weights, extra) if extra else weights


def build_llama(config: dict, weights: dict, *, rope_layout: str, name: str = "llama",
                where: str = "model") -> Graph:
    D, F, L = config["hidden"], config["ffn"], config["n_layers"]
    H, KVH, hd = config["n_heads"], config["n_kv_heads"], config["head_dim"]
    V, eps = config["vocab_size"], config["rms_eps"]
    rope_attrs = {"theta": float(config["rope_theta"]), "layout": rope_layout,
                  "dim": 0 if config.get("rope_dim", hd) == hd else config["rope_dim"],
                  "factors": [float(f) for f in config.get("rope_factors") or ()]}

    weights = _unfused(config, weights, where)
    g = Graph(name)
    ids, pos, pasts = decoder_inputs(g, L, KVH, hd)

    def w(n, shape):
        return _weight(g, weights, n, shape, where)

    tok = w("token_embd.weight", (V, D))
    x = g.add("embedding", [tok, ids], name="embed", source="token_embd")
    if x.dtype != "f32":   # an f16 table gives f16 rows; the residual stream and KV cache are f32
        x = g.add("cast", [x], {"to": "f32"}, source="token_embd")
    presents = []
    for i, (past_k, past_v) in enumerate(pasts):
        p = f"blk.{i}"

        def heads(h, n, proj):
            src = f"{p}.attn_{proj}"
            ins = [h, w(f"{src}.weight", (n * hd, D))]
            if config.get("qkv_bias"):
                ins.append(w(f"{src}.bias", (n * hd,)))
            y = g.add("linear", ins, name=f"{p}.{proj}", source=src)
            y = g.add("reshape", [y], {"shape": [0, 0, n, hd]}, source=src)
            if proj != "v" and config.get("qk_norm"):      # normalised per head, before the rotary
                y = g.add("rmsnorm", [y, w(f"{src}_norm.weight", (hd,))], {"eps": eps}, name=f"{p}.{proj}_norm",
                          source=f"{src}_norm")
            return g.add("transpose", [y], {"perm": [0, 2, 1, 3]}, source=src)

        h = g.add("rmsnorm", [x, w(f"{p}.attn_norm.weight", (D,))], {"eps": eps}, name=f"{p}.attn_norm", source=f"{p}.attn_norm")
        q = g.add("rope", [heads(h, H, "q"), pos], rope_attrs, name=f"{p}.q_rope", source=f"{p}.attn_q")
        k = g.add("rope", [heads(h, KVH, "k"), pos], rope_attrs, name=f"{p}.k_rope", source=f"{p}.attn_k")
        v = heads(h, KVH, "v")
        k_all = g.add("concat", [past_k, k], {"axis": 2}, name=f"present_key.{i}", source=f"{p}.kv_cache")
        v_all = g.add("concat", [past_v, v], {"axis": 2}, name=f"present_value.{i}", source=f"{p}.kv_cache")
        presents += [k_all, v_all]
        a = g.add("attention", [q, k_all, v_all], {"causal": True}, name=f"{p}.attn", source=f"{p}.attn")
        a = g.add("transpose", [a], {"perm": [0, 2, 1, 3]}, source=f"{p}.attn")
        a = g.add("reshape", [a], {"shape": [0, 0, H * hd]}, source=f"{p}.attn")
        o = g.add("linear", [a, w(f"{p}.attn_output.weight", (D, H * hd))], name=f"{p}.attn_out", source=f"{p}.attn_output")
        x = g.add("add", [x, o], name=f"{p}.attn_residual", source=f"{p}.attn_output")

        h = g.add("rmsnorm", [x, w(f"{p}.ffn_norm.weight", (D,))], {"eps": eps}, name=f"{p}.ffn_norm", source=f"{p}.ffn_norm")
        gate = g.add("linear", [h, w(f"{p}.ffn_gate.weight", (F, D))], name=f"{p}.gate", source=f"{p}.ffn_gate")
        up = g.add("linear", [h, w(f"{p}.ffn_up.weight", (F, D))], name=f"{p}.up", source=f"{p}.ffn_up")
        act = g.add("swiglu", [gate, up], name=f"{p}.swiglu", source=f"{p}.ffn")
        down = g.add("linear", [act, w(f"{p}.ffn_down.weight", (D, F))], name=f"{p}.down", source=f"{p}.ffn_down")
        x = g.add("add", [x, down], name=f"{p}.ffn_residual", source=f"{p}.ffn_down")

    x = g.add("rmsnorm", [x, w("output_norm.weight", (D,))], {"eps": eps}, name="output_norm", source="output_norm")
    head = w("output.weight", (V, D)) if "output.weight" in weights else tok
    logits = g.add("linear", [x, head], name="logits", source="output")
    finish_decoder(g, logits, pasts, presents)
    return g

"""Build the graph of a Llama-family decoder from its hyperparameters and weights.

Weights are named as in GGUF (`blk.{i}.attn_q.weight`, ...); the safetensors frontend renames
HF checkpoints to match. `rope_layout` says how Q/K features pair up for rotation: GGUF files
permute Q/K rows for the interleaved (Meta) layout, HF checkpoints use the half-split layout.
The family's variants are read from the weights present: Q/K/V biases (Qwen2), an RMS norm over
each Q and K head before the rotary (Qwen3: `attn_q_norm`, `attn_k_norm`); and from the config:
`rope_factors`, per-pair frequency divisors (llama3's rope_freqs, linear scaling).

Graph interface, recorded on the graph as its `DecoderInterface` (what generation drives):
    inputs   input_ids i64[batch, seq], position_ids i64[batch, seq],
             past_key.{i}, past_value.{i} f32[batch, kv_heads, past, head_dim]
    outputs  logits f32[batch, seq, vocab], present_key.{i}, present_value.{i}
             (the KV cache with this step's keys appended: [batch, kv_heads, past+seq, head_dim])
"""

from __future__ import annotations

from isthmus.compiler.ir import DecoderInterface, Graph, KVLayer
from isthmus.errors import ModelFormatError


def _weight(g: Graph, weights: dict, name: str, shape: tuple, where: str):
    if name not in weights:
        raise ModelFormatError(f"{where}: tensor {name} is missing")
    w = weights[name]
    if tuple(w.shape) != tuple(shape):
        raise ModelFormatError(f"{where}: tensor {name} has shape {tuple(w.shape)}, expected {tuple(shape)}")
    return g.add_constant(name, w)


def build_llama(config: dict, weights: dict, *, rope_layout: str, name: str = "llama",
                where: str = "model") -> Graph:
    D, F, L = config["hidden"], config["ffn"], config["n_layers"]
    H, KVH, hd = config["n_heads"], config["n_kv_heads"], config["head_dim"]
    V, eps = config["vocab_size"], config["rms_eps"]
    rope_attrs = {"theta": float(config["rope_theta"]), "layout": rope_layout,
                  "dim": 0 if config.get("rope_dim", hd) == hd else config["rope_dim"],
                  "factors": [float(f) for f in config.get("rope_factors") or ()]}

    g = Graph(name)
    ids = g.add_input("input_ids", ("batch", "seq"), "i64")
    pos = g.add_input("position_ids", ("batch", "seq"), "i64")
    pasts = [(g.add_input(f"past_key.{i}", ("batch", KVH, "past", hd), "f32"),
              g.add_input(f"past_value.{i}", ("batch", KVH, "past", hd), "f32")) for i in range(L)]

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
            if f"{src}.bias" in weights:
                ins.append(w(f"{src}.bias", (n * hd,)))
            y = g.add("linear", ins, name=f"{p}.{proj}", source=src)
            y = g.add("reshape", [y], {"shape": [0, 0, n, hd]}, source=src)
            if proj != "v" and f"{src}_norm.weight" in weights:      # normalised per head, before the rotary
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
    g.set_outputs([logits] + presents)
    g.decoder = DecoderInterface("input_ids", "logits", "position_ids", tuple(
        KVLayer(pk.name, pv.name, k.name, v.name) for (pk, pv), k, v in zip(pasts, presents[::2], presents[1::2])))
    return g

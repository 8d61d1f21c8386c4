"""Build the graph of a Gemma 2 or Gemma 3 decoder from its hyperparameters and GGUF-named weights.

What sets Gemma apart from the Llama family, block by block:
  - the token embedding is scaled by sqrt(hidden);
  - RMS norms before and after attention and before and after the MLP (`post_attention_norm`,
    `post_ffw_norm`), inside the residual; llama.cpp's converter stores Gemma's (1 + w) norm weights
    with the 1 added, so they multiply as Llama's do;
  - a GeGLU MLP: gelu_tanh(gate) * up;
  - sliding-window attention on most layers (Gemma 2: every other layer, starting with the first;
    Gemma 3: five of every six) and full attention on the rest; Gemma 3 turns the sliding layers'
    rotary at a local base (10000) and the full ones at the file's base, with its scaling;
  - Gemma 2 squashes attention scores and the logits with tanh soft-capping; Gemma 3 normalises each
    Q and K head (`attn_q_norm`, `attn_k_norm`) instead.
The decoder interface is Llama's (input_ids, position_ids, past/present key/value, logits).
"""

from __future__ import annotations

import numpy as np

from isthmus.compiler.frontends.llama import _weight, decoder_inputs, finish_decoder
from isthmus.compiler.ir import Graph


def build_gemma(config: dict, weights: dict, *, name: str = "gemma", where: str = "model") -> Graph:
    D, F, L = config["hidden"], config["ffn"], config["n_layers"]
    H, KVH, hd = config["n_heads"], config["n_kv_heads"], config["head_dim"]
    V, eps = config["vocab_size"], config["rms_eps"]

    g = Graph(name)
    ids, pos, pasts = decoder_inputs(g, L, KVH, hd)

    def w(n, shape):
        return _weight(g, weights, n, shape, where)

    def norm(x, tensor, label, width=D):
        return g.add("rmsnorm", [x, w(tensor, (width,))], {"eps": eps}, name=label, source=tensor.rsplit(".", 1)[0])

    tok = w("token_embd.weight", (V, D))
    x = g.add("embedding", [tok, ids], name="embed", source="token_embd")
    if x.dtype != "f32":
        x = g.add("cast", [x], {"to": "f32"}, source="token_embd")
    x = g.add("mul", [x, g.const(np.float32(D) ** np.float32(0.5), name="embed_scale")], name="embed_scaled",
              source="token_embd")
    presents = []
    for i, (past_k, past_v) in enumerate(pasts):
        p = f"blk.{i}"
        sliding = config["sliding"][i]
        rope = {"theta": float(config["rope_theta_local"] if sliding else config["rope_theta"]), "layout": "half",
                "dim": 0, "factors": [] if sliding else [float(f) for f in config.get("rope_factors") or ()]}

        def heads(h, n, proj):
            y = g.add("linear", [h, w(f"{p}.attn_{proj}.weight", (n * hd, D))], name=f"{p}.{proj}", source=f"{p}.attn_{proj}")
            y = g.add("reshape", [y], {"shape": [0, 0, n, hd]}, source=f"{p}.attn_{proj}")
            if proj != "v" and config["qk_norm"]:
                y = norm(y, f"{p}.attn_{proj}_norm.weight", f"{p}.{proj}_norm", hd)
            return g.add("transpose", [y], {"perm": [0, 2, 1, 3]}, source=f"{p}.attn_{proj}")

        h = norm(x, f"{p}.attn_norm.weight", f"{p}.attn_norm")
        q = g.add("rope", [heads(h, H, "q"), pos], rope, name=f"{p}.q_rope", source=f"{p}.attn_q")
        k = g.add("rope", [heads(h, KVH, "k"), pos], rope, name=f"{p}.k_rope", source=f"{p}.attn_k")
        k_all = g.add("concat", [past_k, k], {"axis": 2}, name=f"present_key.{i}", source=f"{p}.kv_cache")
        v_all = g.add("concat", [past_v, heads(h, KVH, "v")], {"axis": 2}, name=f"present_value.{i}",
                      source=f"{p}.kv_cache")
        presents += [k_all, v_all]
        a = g.add("attention", [q, k_all, v_all], {"causal": True, "scale": float(config["attn_scale"]),
                                                   "softcap": float(config["attn_softcap"]),
                                                   "window": config["sliding_window"] if sliding else 0},
                  name=f"{p}.attn", source=f"{p}.attn")
        a = g.add("reshape", [g.add("transpose", [a], {"perm": [0, 2, 1, 3]})], {"shape": [0, 0, H * hd]},
                  source=f"{p}.attn")
        o = g.add("linear", [a, w(f"{p}.attn_output.weight", (D, H * hd))], name=f"{p}.attn_out",
                  source=f"{p}.attn_output")
        x = g.add("add", [x, norm(o, f"{p}.post_attention_norm.weight", f"{p}.post_attn_norm")],
                  name=f"{p}.attn_residual")
        h = norm(x, f"{p}.ffn_norm.weight", f"{p}.ffn_norm")
        gate = g.add("linear", [h, w(f"{p}.ffn_gate.weight", (F, D))], name=f"{p}.gate", source=f"{p}.ffn_gate")
        up = g.add("linear", [h, w(f"{p}.ffn_up.weight", (F, D))], name=f"{p}.up", source=f"{p}.ffn_up")
        m = g.add("mul", [g.add("gelu", [gate], {"approximate": "tanh"}), up], name=f"{p}.geglu", source=f"{p}.ffn")
        down = g.add("linear", [m, w(f"{p}.ffn_down.weight", (D, F))], name=f"{p}.down", source=f"{p}.ffn_down")
        x = g.add("add", [x, norm(down, f"{p}.post_ffw_norm.weight", f"{p}.post_ffw_norm")], name=f"{p}.ffn_residual")

    x = norm(x, "output_norm.weight", "output_norm")
    head = w("output.weight", (V, D)) if "output.weight" in weights else tok
    cap = float(config["final_softcap"])
    logits = g.add("linear", [x, head], name="head" if cap else "logits", source="output")
    if cap:
        c = g.const(cap, name="final_softcap")
        logits = g.add("mul", [g.add("tanh", [g.add("div", [logits, c])]), c], name="logits", source="output")
    finish_decoder(g, logits, pasts, presents)
    return g

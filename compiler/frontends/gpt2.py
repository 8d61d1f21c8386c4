"""Build the graph of a GPT-2 decoder from its hyperparameters and weights (GGUF names).

GPT-2 differs from the Llama family in every block: learned absolute positions added to the token
embedding, LayerNorm with a bias, one fused QKV projection with a bias, biases on every linear, a
GELU (tanh) MLP, no rotary. The fused QKV weight is split by rows into three constants here (views,
no copy), so the fusion pass sees ordinary Q/K/V siblings and stacks them again as it does for
Llama. The decoder interface is Llama's (input_ids, position_ids, past/present key/value, logits).
"""

from __future__ import annotations

from isthmus.compiler.frontends.llama import _weight, decoder_inputs, finish_decoder, split_rows
from isthmus.compiler.ir import Graph
from isthmus.errors import ModelFormatError


def build_gpt2(config: dict, weights: dict, *, name: str = "gpt2", where: str = "model") -> Graph:
    D, F, L, H = config["hidden"], config["ffn"], config["n_layers"], config["n_heads"]
    hd, V, eps, T = config["head_dim"], config["vocab_size"], config["norm_eps"], config["context_length"]
    if H * hd != D:
        raise ModelFormatError(f"{where}: {H} heads of {hd} do not make the hidden size {D}")

    g = Graph(name)
    ids, pos, pasts = decoder_inputs(g, L, H, hd)

    def w(n, shape):
        return _weight(g, weights, n, shape, where)

    def layernorm(x, prefix, label):
        return g.add("layernorm", [x, w(f"{prefix}.weight", (D,)), w(f"{prefix}.bias", (D,))], {"eps": eps},
                     name=label, source=prefix)

    def linear(x, prefix, rows, cols, label):
        return g.add("linear", [x, w(f"{prefix}.weight", (rows, cols)), w(f"{prefix}.bias", (rows,))],
                     name=label, source=prefix)

    tok = w("token_embd.weight", (V, D))
    x = g.add("embedding", [tok, ids], name="embed", source="token_embd")
    p_emb = g.add("embedding", [w("position_embd.weight", (T, D)), pos], name="embed_pos", source="position_embd")
    x = g.add("add", [g.add("cast", [x], {"to": "f32"}) if x.dtype != "f32" else x,
                      g.add("cast", [p_emb], {"to": "f32"}) if p_emb.dtype != "f32" else p_emb], name="embed_sum")
    presents = []
    for i, (past_k, past_v) in enumerate(pasts):
        p = f"blk.{i}"
        h = layernorm(x, f"{p}.attn_norm", f"{p}.attn_norm")
        qkv_w = split_rows(_checked(weights, f"{p}.attn_qkv.weight", (3 * D, D), where), [D] * 3,
                           f"{p}.attn_qkv.weight", where)
        qkv_b = split_rows(_checked(weights, f"{p}.attn_qkv.bias", (3 * D,), where), [D] * 3,
                           f"{p}.attn_qkv.bias", where)
        heads = []
        for j, proj in enumerate("qkv"):
            y = g.add("linear", [h, g.add_constant(f"{p}.attn_{proj}.weight", qkv_w[j]),
                                 g.add_constant(f"{p}.attn_{proj}.bias", qkv_b[j])], name=f"{p}.{proj}",
                      source=f"{p}.attn_qkv")
            y = g.add("reshape", [y], {"shape": [0, 0, H, hd]}, source=f"{p}.attn_qkv")
            heads.append(g.add("transpose", [y], {"perm": [0, 2, 1, 3]}, source=f"{p}.attn_qkv"))
        q, k, v = heads
        k_all = g.add("concat", [past_k, k], {"axis": 2}, name=f"present_key.{i}", source=f"{p}.kv_cache")
        v_all = g.add("concat", [past_v, v], {"axis": 2}, name=f"present_value.{i}", source=f"{p}.kv_cache")
        presents += [k_all, v_all]
        a = g.add("attention", [q, k_all, v_all], {"causal": True}, name=f"{p}.attn", source=f"{p}.attn")
        a = g.add("transpose", [a], {"perm": [0, 2, 1, 3]}, source=f"{p}.attn")
        a = g.add("reshape", [a], {"shape": [0, 0, D]}, source=f"{p}.attn")
        x = g.add("add", [x, linear(a, f"{p}.attn_output", D, D, f"{p}.attn_out")], name=f"{p}.attn_residual")
        h = layernorm(x, f"{p}.ffn_norm", f"{p}.ffn_norm")
        m = g.add("gelu", [linear(h, f"{p}.ffn_up", F, D, f"{p}.up")], {"approximate": "tanh"}, name=f"{p}.gelu")
        x = g.add("add", [x, linear(m, f"{p}.ffn_down", D, F, f"{p}.down")], name=f"{p}.ffn_residual")

    x = layernorm(x, "output_norm", "output_norm")
    head = w("output.weight", (V, D)) if "output.weight" in weights else tok
    logits = g.add("linear", [x, head], name="logits", source="output")
    finish_decoder(g, logits, pasts, presents)
    return g


def _checked(weights: dict, name: str, shape: tuple, where: str):
    if name not in weights:
        raise ModelFormatError(f"{where}: tensor {name} is missing")
    t = weights[name]
    if tuple(t.shape) != shape:
        raise ModelFormatError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    return t

"""A tiny Llama whose weights are in the GGUF formats isthmus reads as blocks (q5_0, q5_1,
iq4_nl, q2_k..q6_k), quantized by llama.cpp itself (ggml_ref.py), mixed as llama.cpp's Q4_K_M
mixes them: layer 0 has Q and K in q4_k beside V in q6_k (siblings that cannot be stacked),
layer 1 has Q, K, V alike (stacked). Needs llama-cpp-python."""

from __future__ import annotations

import numpy as np

# hidden and the attention width are multiples of 256, the k-quants' super-block
KQ_CONFIG = dict(n_layers=2, hidden=256, ffn=512, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=67,
                 rms_eps=1e-5, rope_theta=10000.0, context_length=64)

LAYER_TYPES = [
    dict(attn_q="q4_k", attn_k="q4_k", attn_v="q6_k", attn_output="q5_0", ffn_gate="q4_k", ffn_up="q4_k",
         ffn_down="q6_k"),
    dict(attn_q="q3_k", attn_k="q3_k", attn_v="q3_k", attn_output="q2_k", ffn_gate="q5_k", ffn_up="q5_k",
         ffn_down="q5_1"),
]


def kquant_weights(cfg=KQ_CONFIG, seed=0):
    import ggml_ref
    from gguf import GGMLQuantizationType as T

    from isthmus.compiler.quant import QuantizedArray

    rng = np.random.default_rng(seed)
    D, F, H, KVH, hd, V = (cfg[k] for k in ("hidden", "ffn", "n_heads", "n_kv_heads", "head_dim", "vocab_size"))

    def mat(rows, cols, qtype, scale=1.0):
        m = (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        return QuantizedArray(qtype, m.shape, ggml_ref.quantize(m, T[qtype.upper()]))

    w = {"token_embd.weight": mat(V, D, "q6_k", np.sqrt(D)),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
         "output.weight": mat(V, D, "iq4_nl", 4.0)}
    shapes = dict(attn_q=(H * hd, D), attn_k=(KVH * hd, D), attn_v=(KVH * hd, D), attn_output=(D, H * hd),
                  ffn_gate=(F, D), ffn_up=(F, D), ffn_down=(D, F))
    for i, types in enumerate(LAYER_TYPES[:cfg["n_layers"]]):
        p = f"blk.{i}"
        w[f"{p}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[f"{p}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        for name, qtype in types.items():
            w[f"{p}.{name}.weight"] = mat(*shapes[name], qtype)
    return w


def kquant_model(cfg=KQ_CONFIG, seed=0, layout="half"):
    from isthmus.compiler.frontends import Model
    from isthmus.compiler.frontends.llama import build_llama

    g = build_llama(cfg, kquant_weights(cfg, seed), rope_layout=layout, name="tiny-kq")
    return Model(g, "tiny-kq", "test", dict(cfg))

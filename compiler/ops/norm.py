"""Normalisations: rmsnorm (Llama) and layernorm (GPT-2), over the last axis."""

import numpy as np

from isthmus.compiler.ops.registry import ROW_WISE, define, fail, same_dim


def _norm_rule(types, attrs):
    x = types[0]
    for p in types[1:]:
        if p.rank != 1 or not same_dim(p.shape[0], x.shape[-1]):
            fail(f"norm parameter {p} does not match the last dim of {x}")
    return x


def rmsnorm(x, weight, eps):
    x32 = x.astype(np.float32, copy=False)
    ms = np.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 / np.sqrt(ms + np.float32(eps)) * weight).astype(x.dtype, copy=False)


def layernorm(x, weight, bias=None, eps=1e-5):
    x32 = x.astype(np.float32, copy=False)
    mu = np.mean(x32, axis=-1, keepdims=True)
    var = np.mean((x32 - mu) ** 2, axis=-1, keepdims=True)
    y = (x32 - mu) / np.sqrt(var + np.float32(eps)) * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False)


define("rmsnorm", infer=_norm_rule, reference=rmsnorm, attrs={"eps": 1e-6}, inputs=2, traits={ROW_WISE},
       doc="x / sqrt(mean(x^2) + eps) * weight")
define("layernorm", infer=_norm_rule, reference=layernorm, attrs={"eps": 1e-5}, inputs=(2, 3), traits={ROW_WISE},
       doc="(x - mean) / sqrt(var + eps) * weight + bias")

"""Rotary position embedding and scaled dot-product attention (causal, GQA, KV cache).

Layouts: q is [batch, q_heads, seq, head_dim]; k and v are [batch, kv_heads, total, head_dim]
where total = past + seq, i.e. the KV cache already concatenated with this step's keys.
Query i sits at absolute position past + i and, when causal, sees keys 0 .. past + i.
"""

import numpy as np

from isthmus.compiler.ir import TensorType
from isthmus.compiler.ops.reduce import softmax
from isthmus.compiler.ops.registry import ROW_WISE, broadcast_shapes, define, fail, same_dim


def _rope_rule(types, attrs):
    x, pos = types
    if x.rank != 4:
        fail(f"rope input must be [batch, heads, seq, head_dim], got {x}")
    if pos.dtype not in ("i64", "i32") or pos.rank not in (1, 2):
        fail(f"rope positions must be integer [batch, seq] or [seq], got {pos}")
    if attrs["layout"] not in ("interleaved", "half"):
        fail(f"rope layout must be 'interleaved' or 'half', got {attrs['layout']!r}")
    dim = attrs["dim"] or x.shape[-1]
    if isinstance(x.shape[-1], int) and (dim % 2 or dim > x.shape[-1]):
        fail(f"rope dim {dim} must be even and at most head_dim {x.shape[-1]}")
    factors = attrs["factors"]
    if not isinstance(factors, (list, tuple)) or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors):
        fail(f"rope factors must be a list of positive numbers, got {factors!r}")
    if factors and isinstance(dim, int) and len(factors) != dim // 2:
        fail(f"rope factors hold {len(factors)} values; a rotary dim of {dim} needs {dim // 2}")
    return x


def inv_freq(dim, theta, factors=()):
    """The rotation frequency of each pair, theta^(-2i/dim), in f32 as HF and llama.cpp compute it;
    divided by `factors` (llama3's rope_freqs, longrope's factors) when there are any."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    if len(factors):
        inv = inv / np.asarray(factors, np.float32)
    return inv.astype(np.float32)


def rope_angles(positions, dim, theta, factors=()):
    """cos and sin, [..., seq, dim/2], computed in f32 as HF and llama.cpp do."""
    inv_freq_ = inv_freq(dim, theta, factors)
    ang = positions.astype(np.float32)[..., None] * inv_freq_
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope(x, positions, theta=10000.0, layout="half", dim=0, factors=()):
    d = dim or x.shape[-1]
    cos, sin = rope_angles(np.asarray(positions), d, theta, factors)
    if cos.ndim == 3:          # [batch, seq, d/2] -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x32 = x.astype(np.float32)
    rot, rest = x32[..., :d], x32[..., d:]
    if layout == "interleaved":   # pairs (x0, x1), (x2, x3), ...: GGUF / Meta
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = np.empty_like(rot)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
    else:                         # pairs (x_i, x_{i+d/2}): HF rotate_half
        a, b = rot[..., : d // 2], rot[..., d // 2:]
        out = np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return np.concatenate([out, rest], axis=-1).astype(x.dtype, copy=False)


define("rope", infer=_rope_rule, reference=rope, inputs=2, traits={ROW_WISE},
       attrs={"theta": 10000.0, "layout": "half", "dim": 0, "factors": []},
       doc="rotary embedding of the first `dim` (0 = all) features at the given positions; pair i turns "
           "at theta^(-2i/dim) / factors[i] (no factors: 1)")


def _attention_rule(types, attrs):
    q, k, v = types[:3]
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        if t.rank != 4:
            fail(f"attention {what} must be [batch, heads, seq, head_dim], got {t}")
    if not same_dim(k.shape[2], v.shape[2]) or not same_dim(k.shape[1], v.shape[1]):
        fail(f"attention k {k} and v {v} disagree")
    if not same_dim(q.shape[3], k.shape[3]):
        fail(f"attention q {q} and k {k} head dims differ")
    hq, hkv = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        fail(f"query heads {hq} are not a multiple of kv heads {hkv}")
    if len(types) == 4:
        broadcast_shapes(types[3].shape, (q.shape[0], hq, q.shape[2], k.shape[2]))
    if not isinstance(attrs["softcap"], (int, float)) or isinstance(attrs["softcap"], bool) or attrs["softcap"] < 0:
        fail(f"attention softcap must be a number >= 0 (0: none), got {attrs['softcap']!r}")
    if type(attrs["window"]) is not int or attrs["window"] < 0:
        fail(f"attention window must be an integer >= 0 (0: none), got {attrs['window']!r}")
    if attrs["window"] and not attrs["causal"]:
        fail("attention window needs causal attention")
    return TensorType((q.shape[0], hq, q.shape[2], v.shape[3]), q.dtype)


def attention(q, k, v, mask=None, causal=True, scale=0.0, softcap=0.0, window=0):
    b, hq, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    group = hq // hkv
    if group > 1:   # grouped-query attention: query head h reads kv head h // group
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
    scale = scale or 1.0 / float(np.sqrt(d))
    scores = np.matmul(q.astype(np.float32), np.swapaxes(k, -1, -2).astype(np.float32)) * np.float32(scale)
    if softcap:       # Gemma 2: scores squashed into (-softcap, softcap) before the mask
        scores = np.tanh(scores / np.float32(softcap)) * np.float32(softcap)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    if causal:
        past = t - s
        q_pos = np.arange(s)[:, None] + past
        allowed = np.arange(t)[None, :] <= q_pos
        if window:    # sliding-window layers: the last `window` positions, this one included
            allowed &= np.arange(t)[None, :] > q_pos - window
        scores = np.where(allowed, scores, -np.inf)
    p = softmax(scores.astype(np.float32), axis=-1)
    return np.matmul(p, v.astype(np.float32)).astype(q.dtype, copy=False)


define("attention", infer=_attention_rule, reference=attention, inputs=(3, 4), traits={ROW_WISE},
       attrs={"causal": True, "scale": 0.0, "softcap": 0.0, "window": 0},
       doc="softmax(softcap(q k^T * scale) + mask) v; scale 0 means 1/sqrt(head_dim); softcap c > 0 "
           "maps scores s to c * tanh(s / c); window w > 0 lets query i see keys i - w + 1 .. i only")

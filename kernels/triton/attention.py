"""Causal attention over a KV cache, with grouped-query heads: flash prefill and split-KV decode.

Layouts as the op: q [batch, q_heads, seq, head_dim]; k, v [batch, kv_heads, total, head_dim]
with total = past + seq (any strides with unit feature stride, so a view of a preallocated
cache is read in place); query i sits at position past + i and sees keys 0 .. past + i.

prefill  (FlashAttention-2 style) one program per (query block, batch x head); an online
         softmax in f32 over key blocks, exp2 with the scale folded in. Key blocks that every
         query row sees run without a mask; only the diagonal blocks are masked. Heavy
         (late) query blocks are scheduled first.
decode   (flash-decoding) for few query rows: one program per (batch x kv head, key split)
         holds all `group` query heads that share the kv head, so each key is read once; the
         splits' partial results are merged by a second kernel through their log-sum-exp.
Reference: isthmus.compiler.ops.attention.attention.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._util import check_float, dot_dtype, interpreting, launch, pow2

LOG2E = 1.4426950408889634
DECODE_MAX_ROWS = 64     # group x seq rows up to this take the decode kernel


@triton.jit
def _online_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m_pos, offs_n, T, qk_scale,
                  stride_kt, stride_vt, d_mask, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                  EVEN_T: tl.constexpr, PAD_D: tl.constexpr, DOT: tl.constexpr):
    """One key block of the online softmax: returns the updated (acc, l_i, m_i).

    MASK applies the causal and key-count masks to the scores; EVEN_T says every key of the
    block exists and PAD_D that the head dim is padded, so unmasked loads are the common case."""
    keys = start_n + offs_n
    if EVEN_T and not PAD_D:
        k = tl.load(k_ptrs + start_n * stride_kt)
        v = tl.load(v_ptrs + start_n * stride_vt)
    else:
        kv_mask = (keys < T)[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k.to(DOT))) * qk_scale
    if MASK:
        visible = keys[None, :] < T
        if CAUSAL:
            visible = visible & (keys[None, :] <= offs_m_pos[:, None])
        qk = tl.where(visible, qk, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_use = tl.where(m_new == -float("inf"), 0.0, m_new)   # rows that saw no key yet stay NaN-free
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(DOT), v.to(DOT), acc)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(Q, K, V, O, qk_scale,
                    sqb, sqh, sqs, skb, skh, skt, svb, svh, svt, sob, soh, sos,
                    H, S, T, GROUP, S_BUCKET,
                    CAUSAL: tl.constexpr, EVEN_T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    n_m = tl.cdiv(S, BLOCK_M)
    start_m = n_m - 1 - tl.program_id(0)          # the heaviest causal blocks first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    past = T - S

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_mask = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(DOT)
    k_ptrs = K + b * skb + kvh * skh + offs_n[:, None] * skt + offs_d[None, :]
    v_ptrs = V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pos = past + offs_m
    if CAUSAL:
        # keys every row of this block sees: 0 .. past + start_m * BLOCK_M
        full_end = tl.minimum((past + start_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N, T // BLOCK_N * BLOCK_N)
        hi = tl.minimum(past + (start_m + 1) * BLOCK_M, T)
    else:
        full_end = T // BLOCK_N * BLOCK_N
        hi = T
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _online_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, pos, offs_n, T, qk_scale,
                                      skt, svt, d_mask, False, CAUSAL, True, D != BLOCK_D, DOT)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _online_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, pos, offs_n, T, qk_scale,
                                      skt, svt, d_mask, True, CAUSAL, EVEN_T, D != BLOCK_D, DOT)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_kernel(Q, K, V, O, O_part, LSE_part, qk_scale,
                   sqb, sqh, sqs, skb, skh, skt, svb, svh, svt, sob, soh, sos,
                   HKV, S, T, GROUP, CHUNK,
                   CAUSAL: tl.constexpr, DIRECT: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """Rows r = g * S + s of one kv head: query head kvh * GROUP + g at position past + s.

    DIRECT (a single split): the normalised rows go straight to O; else partials and their
    log-sum-exp go to O_part / LSE_part for _combine_kernel."""
    bk = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = (bk // HKV).to(tl.int64)
    kvh = (bk % HKV).to(tl.int64)
    past = T - S

    rows = tl.arange(0, BLOCK_R)
    g = rows // S
    s = rows % S
    r_mask = rows < GROUP * S
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    heads = kvh * GROUP + g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + s[:, None] * sqs + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(DOT)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = K + b * skb + kvh * skh + offs_n[:, None] * skt + offs_d[None, :]
    v_ptrs = V + b * svb + kvh * svh + offs_n[:, None] * svt + offs_d[None, :]

    m_i = tl.full([BLOCK_R], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, T)
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _online_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, past + s, offs_n, T, qk_scale,
                                      skt, svt, d_mask, True, CAUSAL, False, D != BLOCK_D, DOT)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if DIRECT:
        tl.store(O + b * sob + heads[:, None] * soh + s[:, None] * sos + offs_d[None, :],
                 (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
    else:
        lse = tl.where(l_i == 0.0, -float("inf"), m_i + tl.log2(l_safe))
        # partials: [batch, q_heads, S, n_split, D] and [batch, q_heads, S, n_split], f32
        row_id = ((b * HKV + kvh) * GROUP + g) * S + s
        tl.store(O_part + (row_id[:, None] * n_split + split) * D + offs_d[None, :], acc / l_safe[:, None],
                 mask=r_mask[:, None] & d_mask[None, :])
        tl.store(LSE_part + row_id * n_split + split, lse, mask=r_mask)


@triton.jit
def _combine_kernel(O_part, LSE_part, O, n_split, S, HQ, D, sob, soh, sos,
                    BLOCK_SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)                 # (b * HQ + h) * S + s
    splits = tl.arange(0, BLOCK_SPLIT)
    offs_d = tl.arange(0, BLOCK_D)
    sp_mask = splits < n_split
    lse = tl.load(LSE_part + row.to(tl.int64) * n_split + splits, mask=sp_mask, other=-float("inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == -float("inf"), 0.0, m)
    w = tl.exp2(lse - m)
    w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
    part = tl.load(O_part + (row.to(tl.int64) * n_split + splits[:, None]) * D + offs_d[None, :],
                   mask=sp_mask[:, None] & (offs_d < D)[None, :], other=0.0)
    out = tl.sum(part * w[:, None], axis=0)
    s = row % S
    bh = row // S
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    tl.store(O + b * sob + h * soh + s * sos + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)


def _prefill_configs():
    # H100, head_dim 64-128: (BLOCK_M, BLOCK_N, num_stages, num_warps)
    cfg = [(128, 64, 3, 8), (128, 128, 2, 8), (128, 64, 4, 4), (64, 64, 3, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in cfg]


# Tuned once per (query-length bucket, head dim, causal, dtype), not per prompt length.
_prefill_tuned = triton.autotune(_prefill_configs(), key=["S_BUCKET", "D", "CAUSAL", "DOT"])(
    triton.heuristics({"EVEN_T": lambda a: a["T"] % a["BLOCK_N"] == 0})(_prefill_kernel))
_PREFILL_FIXED = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def _check(q, k, v):
    check_float(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention q, k, v must be [batch, heads, seq, head_dim]")
    B, HQ, S, D = q.shape
    if k.shape[0] != B or k.shape != v.shape or k.shape[3] != D:
        raise ValueError(f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if HQ % k.shape[1]:
        raise ValueError(f"query heads {HQ} are not a multiple of kv heads {k.shape[1]}")
    if k.shape[2] < S:
        raise ValueError(f"attention has {S} queries but only {k.shape[2]} keys")
    return [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float = 0.0, *,
              out: torch.Tensor | None = None, decode: bool | None = None, splits: int | None = None,
              config: dict | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, causal over the cache (query i at position total - seq + i).

    `decode` forces (True) or forbids (False) the split-KV kernel; by default it serves calls
    whose group x seq query rows fit DECODE_MAX_ROWS. `splits` fixes its number of key splits and
    `config` the launch (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of tuning it (tests).
    """
    q, k, v = _check(q, k, v)
    B, HQ, S, D = q.shape
    HKV, T = k.shape[1], k.shape[2]
    group = HQ // HKV
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if out.numel() == 0:
        return out
    qk_scale = (scale or 1.0 / math.sqrt(D)) * LOG2E
    block_d = pow2(D, 16)
    dot = dot_dtype(q.dtype)
    if decode is None:
        decode = group * S <= DECODE_MAX_ROWS
    if decode:
        return _decode(q, k, v, out, causal, qk_scale, group, block_d, dot, splits, config)
    args = (q, k, v, out, qk_scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            HQ, S, T, group, min(pow2(S), 4096))
    if config:
        fixed = dict(config)
    elif interpreting():
        fixed = {"BLOCK_M": min(pow2(S, 16), 64), "BLOCK_N": min(pow2(T, 16), 64), "num_warps": 4}
    else:
        fixed = dict(_PREFILL_FIXED)
    fixed["EVEN_T"] = T % fixed["BLOCK_N"] == 0
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * HQ)   # noqa: E731
    launch(_prefill_kernel, grid, args, fixed, tuned=None if config else _prefill_tuned,
           CAUSAL=causal, D=D, BLOCK_D=block_d, DOT=dot)
    return out


def _num_splits(B, HKV, T, block_n, device) -> int:
    """Enough key splits to give every SM two programs; none for a short cache (one launch fewer)."""
    blocks = triton.cdiv(T, block_n)
    if blocks <= 4:
        return 1
    if interpreting() or device.type != "cuda":
        target = 2
    else:
        target = 2 * _sm_count(device)
    return max(1, min(blocks, triton.cdiv(target, B * HKV), 64))


_SMS: dict = {}


def _sm_count(device) -> int:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _decode(q, k, v, out, causal, qk_scale, group, block_d, dot, splits, config):
    B, HQ, S, D = q.shape
    HKV, T = k.shape[1], k.shape[2]
    cfg = dict(config or ({"BLOCK_N": min(pow2(T, 16), 64), "num_warps": 4} if interpreting() else
                          {"BLOCK_N": 64 if block_d <= 128 else 32, "num_warps": 4, "num_stages": 3}))
    block_n = cfg.pop("BLOCK_N")
    n_split = splits or _num_splits(B, HKV, T, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(T, n_split), block_n) * block_n
    n_split = triton.cdiv(T, chunk)
    direct = n_split == 1
    o_part = torch.empty((B, HQ, S, n_split, D) if not direct else (1,), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, HQ, S, n_split) if not direct else (1,), dtype=torch.float32, device=q.device)
    args = (q, k, v, out, o_part, lse, qk_scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], HKV, S, T, group, chunk)
    launch(_decode_kernel, (B * HKV, n_split), args, cfg, CAUSAL=causal, DIRECT=direct, D=D,
           BLOCK_R=pow2(group * S, 16), BLOCK_D=block_d, BLOCK_N=block_n, DOT=dot)
    if direct:
        return out
    launch(_combine_kernel, (B * HQ * S,), (o_part, lse, out, n_split, S, HQ, D, *out.stride()[:3]),
           {"num_warps": 4}, BLOCK_SPLIT=pow2(n_split), BLOCK_D=block_d)
    return out

"""Rotary position embedding, both feature pairings:
    interleaved  pairs (x0, x1), (x2, x3), ...          GGUF / Meta checkpoints
    half         pairs (x_i, x_{i + rot/2})             HF rotate_half
over the first `rot` features of each head (the rest pass through).

x is [batch, heads, seq, head_dim] with any strides (a transposed view of a projection is
read in place), and the result may be written anywhere of the same shape, e.g. straight into
a KV-cache slice. One program rotates every head of one (batch, position). The inverse
frequencies come from the host, computed exactly as the reference does, so the angles agree
to the last bit; cos/sin are evaluated in f32. Reference: isthmus.compiler.ops.attention.rope.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._util import check_float, launch, pow2

_INV_FREQ: dict = {}


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, inv_ptr, y_ptr, S, H, D,
                 sxb, sxh, sxs, syb, syh, sys, spb, sps,
                 ROT: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    hmask = heads < H
    pmask = pairs < ROT // 2
    mask = hmask[:, None] & pmask[None, :]
    pos = tl.load(pos_ptr + b * spb + s * sps).to(tl.float32)
    ang = pos * tl.load(inv_ptr + pairs, mask=pmask, other=0.0)
    cos = tl.cos(ang)[None, :]
    sin = tl.sin(ang)[None, :]
    if INTERLEAVED:
        ia = pairs * 2
        ib = pairs * 2 + 1
    else:
        ia = pairs
        ib = pairs + ROT // 2
    x_row = x_ptr + b * sxb + s * sxs + heads[:, None].to(tl.int64) * sxh
    y_row = y_ptr + b * syb + s * sys + heads[:, None].to(tl.int64) * syh
    a = tl.load(x_row + ia[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(x_row + ib[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row + ia[None, :], (a * cos - c * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + ib[None, :], (a * sin + c * cos).to(y_ptr.dtype.element_ty), mask=mask)
    if COPY_REST:
        rest = ROT + tl.arange(0, BLOCK_R)
        rmask = hmask[:, None] & (rest < D)[None, :]
        tl.store(y_row + rest[None, :], tl.load(x_row + rest[None, :], mask=rmask), mask=rmask)


def inv_freq(rot: int, theta: float, device, factors=()) -> torch.Tensor:
    """1 / theta^(2i/rot) in f32, divided by the per-pair `factors` if any: bit-identical to the
    reference's table (cached per device)."""
    key = (rot, float(theta), str(device), tuple(factors))
    t = _INV_FREQ.get(key)
    if t is None:
        f = (1.0 / (np.float32(theta) ** (np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot))))
        if len(factors):
            f = f / np.asarray(factors, np.float32)
        t = _INV_FREQ[key] = torch.from_numpy(f.astype(np.float32)).to(device)
    return t


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0, layout: str = "half", dim: int = 0,
         *, out: torch.Tensor | None = None, factors=()) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] at integer positions [batch, seq] or [seq].

    `out` (same shape, any strides; may be x itself) receives the result.
    """
    check_float(x)
    if x.dim() != 4:
        raise ValueError(f"rope input must be [batch, heads, seq, head_dim], got {tuple(x.shape)}")
    if layout not in ("interleaved", "half"):
        raise ValueError(f"rope layout must be 'interleaved' or 'half', got {layout!r}")
    B, H, S, D = x.shape
    rot = dim or D
    if rot % 2 or rot > D:
        raise ValueError(f"rope dim {rot} must be even and at most head_dim {D}")
    if positions.dim() == 1:
        positions = positions[None, :]
    if positions.shape[-1] != S or positions.shape[0] not in (1, B):
        raise ValueError(f"rope positions {tuple(positions.shape)} do not match x {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError("rope out must match x's shape and have unit feature stride")
    if x.numel() == 0:
        return out
    spb = positions.stride(0) if positions.shape[0] == B else 0
    block_h = min(pow2(H), 16)
    grid = (B * S, triton.cdiv(H, block_h))
    args = (x, positions, inv_freq(rot, theta, x.device, factors), out, S, H, D,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), spb, positions.stride(1))
    launch(_rope_kernel, grid, args, {"num_warps": 4}, ROT=rot, INTERLEAVED=layout == "interleaved",
           COPY_REST=rot < D and out.data_ptr() != x.data_ptr(),
           BLOCK_H=block_h, BLOCK_P=pow2(rot // 2), BLOCK_R=pow2(max(D - rot, 1)))
    return out

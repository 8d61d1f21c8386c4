"""Row normalisations: rmsnorm (Llama) and layernorm (GPT-2), fused with the residual add.

One program normalises one row held whole in registers (rows up to MAX_COLS), reading x once
and writing y once, so the kernel runs at memory bandwidth. With `residual`, the program first
adds x into the residual stream in place (r += x, rounded to r's dtype, as the unfused graph
does) and normalises the sum: the `add -> rmsnorm` pair of every decoder layer in one pass.
Statistics are f32 whatever the storage type. Reference: isthmus.compiler.ops.norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_float, launch, pow2, programs_per_device, row_warps

MAX_COLS = 65536


@triton.jit
def _norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, n_cols, stride_x, stride_r, stride_y, eps,
                 HAS_RES: tl.constexpr, LAYERNORM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r_ptrs = res_ptr + row * stride_r + cols
        r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) + x
        r = r.to(res_ptr.dtype.element_ty)
        tl.store(r_ptrs, r, mask=mask)
        x = r.to(tl.float32)
    if LAYERNORM:
        mean = tl.sum(x, axis=0) / n_cols
        x = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_persistent_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, eps,
                               BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """rmsnorm with a grid of a few programs per SM walking the rows: the weight is loaded once
    per program and the next row can be prefetched (tl.range's num_stages)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    sx = tl.cast(stride_x, tl.int64)          # 64-bit row offsets
    sy = tl.cast(stride_y, tl.int64)
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=STAGES):
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(y_ptr + row * sy + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A 2-D [rows, n] view with unit column stride (copies only if it must)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _norm(x, weight, bias, eps, residual, out, layernorm, num_warps, persistent=0):
    check_float(x, weight)
    n = x.shape[-1]
    if n > MAX_COLS:
        raise ValueError(f"norm over {n} features: rows longer than {MAX_COLS} are not supported")
    if weight.shape != (n,):
        raise ValueError(f"norm weight {tuple(weight.shape)} does not match the last dim {n} of x")
    x2 = _rows(x, n)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    y2 = out.view(-1, n)
    r2 = x2
    if residual is not None:
        if residual.shape != x.shape or not residual.is_contiguous():
            raise ValueError("residual must be contiguous and shaped like x")
        r2 = residual.view(-1, n)
    if x2.shape[0] == 0:
        return out
    block = pow2(n)
    warps = num_warps or row_warps(block, x.element_size())
    if persistent and residual is None and not layernorm:
        grid = (max(1, min(x2.shape[0], programs_per_device(x.device, warps))),)
        launch(_rmsnorm_persistent_kernel, grid, (x2, weight, y2, x2.shape[0], n, x2.stride(0), y2.stride(0),
                                                  float(eps)), {"num_warps": warps}, BLOCK=block, STAGES=persistent)
        return out
    args = (x2, r2, weight, bias if bias is not None else weight, y2, n, x2.stride(0), r2.stride(0), y2.stride(0),
            float(eps))
    launch(_norm_kernel, (x2.shape[0],), args, {"num_warps": warps},
           HAS_RES=residual is not None, LAYERNORM=layernorm, HAS_BIAS=bias is not None, BLOCK=block)
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None, num_warps: int | None = None, persistent: int = 0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis.

    With `residual`: residual += x (in place), then returns rmsnorm(residual). `persistent=s`
    (no residual) walks the rows with a few programs per SM, prefetching s - 1 rows.
    """
    return _norm(x, weight, None, eps, residual, out, False, num_warps, persistent)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5, *,
              residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
              num_warps: int | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (residual as in rmsnorm)."""
    return _norm(x, weight, bias, eps, residual, out, True, num_warps)

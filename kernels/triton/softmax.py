"""Row softmax over the last axis.

Rows up to MAX_COLS are held whole in registers: one read, one write, f32 arithmetic, exp2 with
log2(e) folded in. Longer rows take the looped kernel (online max and sum, then a second pass
that writes). A row that is entirely -inf gives zeros, not NaN, as the reference does
(isthmus.compiler.ops.reduce.softmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_float, launch, pow2, programs_per_device, row_warps

MAX_COLS = 16384
LOG2E = 1.4426950408889634


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, n_cols, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    m = tl.where(m == -float("inf"), 0.0, m)
    e = tl.exp2((x - m) * 1.4426950408889634)
    s = tl.sum(e, axis=0)
    s = tl.where(s == 0.0, 1.0, s)
    tl.store(y_ptr + row * stride_y + cols, (e / s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_persistent_kernel(x_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, BLOCK: tl.constexpr,
                               STAGES: tl.constexpr):
    """As _softmax_kernel, but a grid of a few programs per SM walks the rows, so the compiler can
    prefetch the next row while this one is reduced (tl.range's num_stages)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    sx = tl.cast(stride_x, tl.int64)          # 64-bit row offsets
    sy = tl.cast(stride_y, tl.int64)
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0), num_stages=STAGES):
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        m = tl.where(m == -float("inf"), 0.0, m)
        e = tl.exp2((x - m) * 1.4426950408889634)
        s = tl.sum(e, axis=0)
        s = tl.where(s == 0.0, 1.0, s)
        tl.store(y_ptr + row * sy + cols, (e / s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_looped_kernel(x_ptr, y_ptr, n_cols, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp2((m - m_use) * 1.4426950408889634) + tl.exp2((x - m_use) * 1.4426950408889634)
        m = m_new
    m_row = tl.max(m, axis=0)
    m_row = tl.where(m_row == -float("inf"), 0.0, m_row)
    total = tl.sum(s * tl.exp2((m - m_row) * 1.4426950408889634), axis=0)
    inv = 1.0 / tl.where(total == 0.0, 1.0, total)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        y = tl.exp2((x - m_row) * 1.4426950408889634) * inv
        tl.store(y_ptr + row * stride_y + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def softmax(x: torch.Tensor, *, out: torch.Tensor | None = None, num_warps: int | None = None,
            block: int | None = None, persistent: int = 0) -> torch.Tensor:
    """softmax over the last axis; `block` forces the looped kernel with that chunk size (tests);
    `persistent=s` walks the rows with a grid of a few programs per SM, prefetching s - 1 rows."""
    check_float(x)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    y2 = out.view(-1, n)
    rows = x2.shape[0]
    if rows == 0 or n == 0:
        return out
    if block is None and n <= MAX_COLS and persistent:
        b = pow2(n)
        warps = num_warps or row_warps(b, x.element_size())
        grid = (min(rows, programs_per_device(x.device, warps)),)
        launch(_softmax_persistent_kernel, grid, (x2, y2, rows, n, x2.stride(0), y2.stride(0)),
               {"num_warps": warps}, BLOCK=b, STAGES=persistent)
    elif block is None and n <= MAX_COLS:
        b = pow2(n)
        launch(_softmax_kernel, (rows,), (x2, y2, n, x2.stride(0), y2.stride(0)),
               {"num_warps": num_warps or row_warps(b, x.element_size())}, BLOCK=b)
    else:
        b = pow2(block or 4096)
        launch(_softmax_looped_kernel, (rows,), (x2, y2, n, x2.stride(0), y2.stride(0)),
               {"num_warps": num_warps or row_warps(b, 4)}, BLOCK=b)
    return out

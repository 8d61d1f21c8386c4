"""Elementwise kernels over [rows, cols] views with a row stride: swiglu, activations, binary ops.

`swiglu(gate, up)` takes its operands as separate tensors or as the two halves of one fused
gate|up projection ([..., 2F] -> gate = [..., :F], up = [..., F:]), read in place. Binary ops
broadcast their second operand along rows (a bias or a per-feature scale) when it is 1-D.
All arithmetic is f32; results are stored in the output's type. References:
isthmus.compiler.ops.elementwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_float, launch, pow2

BLOCK = 1024
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "sigmoid": 3}
BINARY = {"add": 0, "sub": 1, "mul": 2, "div": 3}


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n_cols, sg, su, sy, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy + cols, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_kernel(x_ptr, y_ptr, n_cols, sx, sy, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:   # tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * z)
    else:
        y = tl.sigmoid(x)
    tl.store(y_ptr + row * sy + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _binary_kernel(a_ptr, b_ptr, y_ptr, n_cols, sa, sb, sy, OP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(a_ptr + row * sa + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * sb + cols, mask=mask, other=1.0).to(tl.float32)
    if OP == 0:
        y = a + b
    elif OP == 1:
        y = a - b
    elif OP == 2:
        y = a * b
    else:
        y = a / b
    tl.store(y_ptr + row * sy + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[-1] if t.dim() else 1
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


def _grid(rows: int, cols: int, block: int):
    return (rows, triton.cdiv(cols, block))


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up. With up=None, gate is the fused [..., 2F] projection: its halves are used."""
    check_float(gate)
    if up is None:
        f = gate.shape[-1] // 2
        g2 = _rows(gate)
        g2, u2 = g2[:, :f], g2[:, f:]
        shape = gate.shape[:-1] + (f,)
    else:
        if up.shape != gate.shape:
            raise ValueError(f"swiglu gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        g2, u2 = _rows(gate), _rows(up)
        shape = gate.shape
    out = torch.empty(shape, dtype=gate.dtype, device=gate.device) if out is None else out
    y2 = out.view(-1, shape[-1])
    if out.numel():
        block = min(BLOCK, pow2(shape[-1], 16))
        launch(_swiglu_kernel, _grid(y2.shape[0], shape[-1], block),
               (g2, u2, y2, shape[-1], g2.stride(0), u2.stride(0), y2.stride(0)), {"num_warps": 4}, BLOCK=block)
    return out


def activation(x: torch.Tensor, kind: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu, gelu (erf), gelu_tanh or sigmoid, elementwise."""
    check_float(x)
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    y2 = out.view(x2.shape)
    if out.numel():
        block = min(BLOCK, pow2(x2.shape[1], 16))
        launch(_act_kernel, _grid(*x2.shape, block), (x2, y2, x2.shape[1], x2.stride(0), y2.stride(0)),
               {"num_warps": 4}, ACT=ACTIVATIONS[kind], BLOCK=block)
    return out


def binary(a: torch.Tensor, b: torch.Tensor, op: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (op) b where b has a's shape or is 1-D over a's last axis (broadcast along rows)."""
    check_float(a, b)
    a2 = _rows(a)
    if b.shape == a.shape:
        b2, sb = _rows(b), None
    elif b.dim() == 1 and b.shape[0] == a2.shape[1]:
        b2, sb = b.contiguous(), 0
    else:
        raise ValueError(f"binary {op}: operand {tuple(b.shape)} does not broadcast along rows of {tuple(a.shape)}")
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device) if out is None else out
    y2 = out.view(a2.shape)
    if out.numel():
        block = min(BLOCK, pow2(a2.shape[1], 16))
        args = (a2, b2, y2, a2.shape[1], a2.stride(0), b2.stride(0) if sb is None else 0, y2.stride(0))
        launch(_binary_kernel, _grid(*a2.shape, block), args, {"num_warps": 4}, OP=BINARY[op], BLOCK=block)
    return out

"""Embedding lookup: rows of a float table, or of a block-quantized one dequantized on the fly.

One program copies (part of) one row; a quantized table is the same PackedWeight the output
projection reads when the embedding is tied, so the table is stored once. Ids are checked
on the host (the reference raises InputError for an out-of-range id; a kernel cannot).
Reference: isthmus.compiler.ops.matmul.embedding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import launch, pow2
from .qmatmul import QTYPES, PackedWeight


@triton.jit
def _embedding_kernel(ids_ptr, table_ptr, out_ptr, D, s_row, s_out, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    tok = tl.load(ids_ptr + i).to(tl.int64)
    v = tl.load(table_ptr + tok * s_row + cols, mask=mask, other=0.0)
    tl.store(out_ptr + i * s_out + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qembedding_kernel(ids_ptr, QS, D_ptr, MN, out_ptr, K, s_out, QTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < K
    tok = tl.load(ids_ptr + i).to(tl.int64)
    blk = cols // 32
    scale = tl.load(D_ptr + tok * (K // 32) + blk, mask=mask, other=0.0).to(tl.float32)
    if QTYPE == 2:
        v = tl.load(QS + tok * K + cols, mask=mask, other=0).to(tl.float32) * scale
    else:
        within = cols % 32
        byte = tl.load(QS + tok * (K // 2) + blk * 16 + within % 16, mask=mask, other=0)
        q = tl.where(within < 16, byte & 15, byte >> 4).to(tl.float32)
        if QTYPE == 0:
            v = (q - 8.0) * scale
        else:
            v = q * scale + tl.load(MN + tok * (K // 32) + blk, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i * s_out + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


def embedding(table, ids: torch.Tensor, *, dtype: torch.dtype | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """table[ids] -> ids.shape + (dim,); `table` is a float [vocab, dim] tensor or a PackedWeight."""
    packed = isinstance(table, PackedWeight)
    vocab, dim = (table.n, table.k) if packed else table.shape
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    dtype = dtype or (torch.float32 if packed else table.dtype)
    out = torch.empty((*ids.shape, dim), dtype=dtype, device=flat.device) if out is None else out
    o2 = out.view(-1, dim)
    if flat.numel() == 0:
        return out
    block = min(pow2(dim, 16), 1024)
    grid = (flat.numel(), triton.cdiv(dim, block))
    if packed:
        mn = table.m if table.m is not None else table.d
        launch(_qembedding_kernel, grid, (flat, table.qs, table.d, mn, o2, dim, o2.stride(0)), {"num_warps": 4},
               QTYPE=QTYPES[table.qtype], BLOCK_D=block)
    else:
        if table.stride(-1) != 1:
            table = table.contiguous()
        launch(_embedding_kernel, grid, (flat, table, o2, dim, table.stride(0), o2.stride(0)), {"num_warps": 4},
               BLOCK_D=block)
    return out

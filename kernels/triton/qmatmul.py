"""Matmul with GGUF block-quantized weights (Q4_0, Q4_1, Q8_0), dequantized in registers.

A weight [N, K] (the GGUF [out, in] layout) is repacked once, at load time, into planes the
GPU reads with coalesced loads; no float copy of the weights ever exists:
    d   f16 [N, K/32]   block scales
    m   f16 [N, K/32]   block minimums (q4_1 only)
    qs  q4: u8 [N, K/2] the blocks' 16 nibble bytes, in GGUF order: byte j of a block holds
            value j (low nibble) and value j + 16 (high nibble)
        q8: i8 [N, K]
That is the same number of bytes as the file (4.5 / 5 / 8.5 bits per weight).

qgemv    rows of x up to GEMV_MAX_M (decode): a program owns BLOCK_N weight rows and walks K
         in [BLOCK_N, BLOCK_K/32, 16] nibble tiles, multiplying low and high nibbles against
         the two halves of each 32-value block of x and applying the scale once per block.
qmatmul  longer inputs (prefill): tiles of the weight are dequantized to the activation's
         16-bit type and fed to tensor cores as two half-K dots (low nibbles against x's first
         16 values of each block, high nibbles against the last 16).
Reference: isthmus.compiler.ops.matmul.linear over isthmus.compiler.quant.QuantizedArray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ._util import check_float, dot_dtype, interpreting, launch, pow2
from .matmul import grouped_tile

GEMV_MAX_M = 4
QTYPES = {"q4_0": 0, "q4_1": 1, "q8_0": 2}
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


@dataclass(frozen=True)
class PackedWeight:
    """A block-quantized [n, k] weight as GPU planes (see the module docstring)."""
    qtype: str
    n: int
    k: int
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


def repack(qtype: str, shape, raw: np.ndarray, device="cpu") -> PackedWeight:
    """GGUF blocks (uint8 [rows, bytes_per_row], e.g. QuantizedArray.raw) -> PackedWeight on `device`."""
    if qtype not in QTYPES:
        raise ValueError(f"cannot repack {qtype!r}; supported: {', '.join(QTYPES)}")
    n, k = int(np.prod(shape[:-1])), int(shape[-1])
    if k % 32:
        raise ValueError(f"{qtype} rows of {k} values are not whole 32-value blocks")
    nb = k // 32
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, nb, _BLOCK_BYTES[qtype])
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view("<f2").reshape(n, nb)
    m = None
    if qtype == "q8_0":
        qs = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(n, k)
    elif qtype == "q4_0":
        qs = np.ascontiguousarray(blocks[:, :, 2:]).reshape(n, k // 2)
    else:
        m = np.ascontiguousarray(blocks[:, :, 2:4]).view("<f2").reshape(n, nb)
        qs = np.ascontiguousarray(blocks[:, :, 4:]).reshape(n, k // 2)

    def dev(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return PackedWeight(qtype, n, k, dev(qs), dev(d), dev(m))


def dequantize(w: PackedWeight, dtype=torch.float32) -> torch.Tensor:
    """The float [n, k] matrix (torch ops; for checks and for rows that need no kernel)."""
    d = w.d.float()[:, :, None]
    if w.qtype == "q8_0":
        return (w.qs.view(w.n, -1, 32).float() * d).reshape(w.n, w.k).to(dtype)
    q = w.qs.view(w.n, -1, 16)
    vals = torch.cat([q & 15, q >> 4], dim=2).float()
    out = (vals - 8.0) * d if w.qtype == "q4_0" else vals * d + w.m.float()[:, :, None]
    return out.reshape(w.n, w.k).to(dtype)


@triton.jit
def _qgemv_kernel(X, QS, D, MN, Y, bias_ptr, R, N, K, sxm, sym, srm,
                  QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    NBK: tl.constexpr = BLOCK_K // 32
    nb_row = K // 32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n64 = offs_n.to(tl.int64)
    blk = tl.arange(0, NBK)
    acc = tl.zeros([BLOCK_N, NBK], tl.float32)
    for kb in range(0, nb_row, NBK):          # kb counts 32-value blocks
        b_idx = kb + blk
        b_mask = b_idx < nb_row
        wmask = n_mask[:, None] & b_mask[None, :]
        scale = tl.load(D + n64[:, None] * nb_row + b_idx[None, :], mask=wmask, other=0.0).to(tl.float32)
        if QTYPE == 2:
            j = tl.arange(0, 32)
            xk = b_idx[:, None] * 32 + j[None, :]
            x = tl.load(X + row * sxm + xk, mask=b_mask[:, None], other=0.0).to(tl.float32)
            q = tl.load(QS + n64[:, None, None] * K + xk[None, :, :], mask=wmask[:, :, None], other=0)
            part = tl.sum(q.to(tl.float32) * x[None, :, :], axis=2)
        else:
            j = tl.arange(0, 16)
            xk = b_idx[:, None] * 32 + j[None, :]
            x_lo = tl.load(X + row * sxm + xk, mask=b_mask[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(X + row * sxm + xk + 16, mask=b_mask[:, None], other=0.0).to(tl.float32)
            qk = b_idx[:, None] * 16 + j[None, :]
            q = tl.load(QS + n64[:, None, None] * (K // 2) + qk[None, :, :], mask=wmask[:, :, None], other=0)
            lo = (q & 15).to(tl.float32)
            hi = (q >> 4).to(tl.float32)
            part = tl.sum(lo * x_lo[None, :, :] + hi * x_hi[None, :, :], axis=2)
            xsum = tl.sum(x_lo + x_hi, axis=1)[None, :]     # sum over the block of x
            if QTYPE == 0:                                   # sum (q - 8) d x = d (sum q x - 8 sum x)
                part = part - 8.0 * xsum
            else:                                            # sum (q d + m) x = d sum q x + m sum x
                mins = tl.load(MN + n64[:, None] * nb_row + b_idx[None, :], mask=wmask, other=0.0).to(tl.float32)
                acc += mins * xsum
        acc += scale * part
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_RES:
        out += tl.load(R + row * srm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(Y + row * sym + offs_n, out.to(Y.dtype.element_ty), mask=n_mask)


@triton.jit
def _qmatmul_kernel(X, QS, D, MN, Y, bias_ptr, R, M, N, K, M_BUCKET, sxm, sym, srm,
                    QTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    nb_row = K // 32
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if QTYPE == 2:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < K
            x = tl.load(X + rm[:, None] * sxm + kk[None, :], mask=k_mask[None, :], other=0.0)
            q = tl.load(QS + rn[None, :] * K + kk[:, None], mask=k_mask[:, None], other=0)
            sc = tl.load(D + rn[None, :] * nb_row + (kk // 32)[:, None], mask=k_mask[:, None], other=0.0)
            w = q.to(tl.float32) * sc.to(tl.float32)
            acc = tl.dot(x.to(DOT), w.to(DOT), acc)
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        j = tl.arange(0, HALF)                        # byte j of this K step
        for k0 in range(0, K, BLOCK_K):
            byte = k0 // 2 + j
            blk = byte // 16
            xk = blk * 32 + byte % 16                 # the value a low nibble holds; +16 for the high one
            k_mask = blk < nb_row
            x_lo = tl.load(X + rm[:, None] * sxm + xk[None, :], mask=k_mask[None, :], other=0.0)
            x_hi = tl.load(X + rm[:, None] * sxm + xk[None, :] + 16, mask=k_mask[None, :], other=0.0)
            q = tl.load(QS + rn[None, :] * (K // 2) + byte[:, None], mask=k_mask[:, None], other=0)
            sc = tl.load(D + rn[None, :] * nb_row + blk[:, None], mask=k_mask[:, None], other=0.0).to(tl.float32)
            lo = (q & 15).to(tl.float32)
            hi = (q >> 4).to(tl.float32)
            if QTYPE == 0:
                w_lo = (lo - 8.0) * sc
                w_hi = (hi - 8.0) * sc
            else:
                mn = tl.load(MN + rn[None, :] * nb_row + blk[:, None], mask=k_mask[:, None], other=0.0)
                w_lo = lo * sc + mn.to(tl.float32)
                w_hi = hi * sc + mn.to(tl.float32)
            acc = tl.dot(x_lo.to(DOT), w_lo.to(DOT), acc)
            acc = tl.dot(x_hi.to(DOT), w_hi.to(DOT), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if HAS_RES:
        acc += tl.load(R + offs_m[:, None].to(tl.int64) * srm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs_m[:, None].to(tl.int64) * sym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def _gemv_configs():
    # (BLOCK_N, BLOCK_K, num_warps): few rows per program keep every SM busy on 4096-row matrices;
    # long K steps (128-512 B of nibbles per row) keep enough loads in flight to cover HBM latency
    cfg = [(4, 1024, 4), (8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (32, 512, 8)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3) for n, k, w in cfg]


def _mm_configs():
    cfg = [(128, 128, 64, 3, 8), (64, 128, 64, 3, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (16, 64, 128, 3, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in cfg]


def _prune(configs, named_args, **kwargs):
    """Tiles taller than the (bucketed) M are wasted work; f32 activations halve the smem budget."""
    mb, elem = named_args["M_BUCKET"], named_args["X"].element_size()
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(mb, 16)
            and c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem <= 200 * 1024]
    return keep or configs[-1:]


_qgemv_tuned = triton.autotune(_gemv_configs(), key=["N", "K", "QTYPE", "HAS_BIAS", "HAS_RES"])(_qgemv_kernel)
_qmatmul_tuned = triton.autotune(_mm_configs(), key=["M_BUCKET", "N", "K", "QTYPE", "HAS_BIAS", "HAS_RES", "DOT"],
                                 prune_configs_by={"early_config_prune": _prune})(_qmatmul_kernel)


def qlinear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, *,
            residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
            gemv: bool | None = None, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize(w)^T (+ bias [N]) (+ residual [..., N]) -> [..., N] in x's dtype.

    `gemv` forces (True) or forbids (False) the matrix-vector kernel; `config` fixes the launch (tests).
    """
    check_float(x)
    if x.shape[-1] != w.k:
        raise ValueError(f"qlinear input {tuple(x.shape)} does not match weight [{w.n}, {w.k}]")
    N, K = w.n, w.k
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device) if out is None else out
    y2 = out.view(-1, N)
    r2 = residual.reshape(-1, N) if residual is not None else y2
    if residual is not None and r2.stride(-1) != 1:
        r2 = r2.contiguous()
    if M == 0:
        return out
    mn = w.m if w.m is not None else w.d
    bias_arg = bias if bias is not None else y2
    flags = dict(QTYPE=QTYPES[w.qtype], HAS_BIAS=bias is not None, HAS_RES=residual is not None)
    if (M <= GEMV_MAX_M) if gemv is None else gemv:
        fixed = config or ({"BLOCK_N": min(pow2(N, 16), 128), "BLOCK_K": min(pow2(K, 32), 256), "num_warps": 4}
                           if interpreting() else {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3})
        args = (x2, w.qs, w.d, mn, y2, bias_arg, r2, N, K, x2.stride(0), y2.stride(0), r2.stride(0))
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)   # noqa: E731
        launch(_qgemv_kernel, grid, args, fixed, tuned=None if config else _qgemv_tuned, **flags)
        return out
    fixed = config or ({"BLOCK_M": min(pow2(M, 16), 64), "BLOCK_N": min(pow2(N, 16), 64),
                        "BLOCK_K": min(pow2(K, 32), 128), "GROUP_M": 4, "num_warps": 4} if interpreting() else
                       {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3})
    args = (x2, w.qs, w.d, mn, y2, bias_arg, r2, M, N, K, min(pow2(M), 4096), x2.stride(0), y2.stride(0),
            r2.stride(0))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)   # noqa: E731
    launch(_qmatmul_kernel, grid, args, fixed, tuned=None if config else _qmatmul_tuned, DOT=dot_dtype(x.dtype), **flags)
    return out

"""Dense matmul: C = A @ B (+ bias) (+ residual), batched, f32 accumulation; and `linear`.

The tiled kernel walks output tiles in grouped order (GROUP_M row tiles share their B column
panel in L2), streams K in BLOCK_K steps that the compiler software-pipelines (num_stages) and
feeds tensor cores through tl.dot; its configs are autotuned per (M bucket, N, K) on a GPU.
Rows of A up to GEMV_MAX_M take a matrix-vector kernel instead: a tile of B rows per program,
no tensor cores, one pass over B at memory bandwidth (the decode step).

`linear(x, w)` takes w as [out, in] (the GGUF / HF layout) and reads it in place as B = w^T.
Reference: isthmus.compiler.ops.matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import check_float, dot_dtype, interpreting, launch, pow2

GEMV_MAX_M = 4


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row, column) output tile of program `pid`, walking GROUP_M row tiles down a column
    before moving right, so neighbouring programs share operand tiles in L2."""
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows


@triton.jit
def _matmul_kernel(A, B, C, bias_ptr, R, M, N, K, M_BUCKET,
                   sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, srb, srm, srn,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    batch = tl.program_id(1).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M          # edge tiles wrap around: their loads need no mask, their stores are masked
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + batch * sab + rm[:, None].to(tl.int64) * sam + offs_k[None, :] * sak
    b_ptrs = B + batch * sbb + offs_k[:, None] * sbk + rn[None, :].to(tl.int64) * sbn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0.0)
        acc = tl.dot(a.to(DOT), b.to(DOT), acc)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if HAS_RES:
        acc += tl.load(R + batch * srb + offs_m[:, None] * srm + offs_n[None, :] * srn, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(C + batch * scb + offs_m[:, None] * scm + offs_n[None, :] * scn, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(A, B, C, bias_ptr, R, N, K, sam, sak, sbk, sbn, scm, scn, srm, srn,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[m, n] = sum_k a[m, k] b[k, n] for one row m; B is read as [BLOCK_N, BLOCK_K] tiles along K."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        a = tl.load(A + m * sam + (k0 + offs_k) * sak, mask=k_mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs_n[:, None].to(tl.int64) * sbn + (k0 + offs_k)[None, :] * sbk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += b * a[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_RES:
        out += tl.load(R + m * srm + offs_n * srn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(C + m * scm + offs_n * scn, out.to(C.dtype.element_ty), mask=n_mask)


def _configs():
    # H100 bf16/f16: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
    cfg = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
           (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in cfg]


SMEM_BUDGET = 200 * 1024    # of the 227 KiB an H100 block may use


def _smem(c, elem: int) -> int:
    """Shared memory of a config's pipelined A and B tiles."""
    k = c.kwargs
    return c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elem


def _prune(configs, named_args, **kwargs):
    """Drop tiles taller than the (bucketed) M (wasted work) and those whose pipeline overflows
    shared memory (f32 inputs); the smallest config always stays."""
    mb, elem = named_args["M_BUCKET"], named_args["A"].element_size()
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(mb, 16) and _smem(c, elem) <= SMEM_BUDGET]
    return keep or configs[-1:]


_matmul_tuned = triton.autotune(_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_RES", "DOT"],
                                prune_configs_by={"early_config_prune": _prune})(
    triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_matmul_kernel))


def _fixed(M: int, N: int, K: int, elem: int) -> dict:
    if interpreting():     # few, large programs: the interpreter's cost is per op, not per element
        return {"BLOCK_M": min(pow2(M, 16), 64), "BLOCK_N": min(pow2(N, 16), 64), "BLOCK_K": min(pow2(K, 16), 64),
                "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
    bk = 64 if elem <= 2 else 32
    if M <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
           residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
           gemv: bool | None = None, config: dict | None = None) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] (+ bias [N]) (+ residual [..., M, N]); batch dims broadcast.

    Any strides are read in place. `gemv` forces (True) or forbids (False) the matrix-vector kernel;
    `config` fixes the launch (block sizes, num_warps, num_stages) instead of tuning it (tests).
    """
    check_float(a, b)
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul shapes do not agree: {tuple(a.shape)} @ {tuple(b.shape)}")
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, M, K).reshape(-1, M, K)
    b3 = b.expand(*batch, K, N).reshape(-1, K, N)
    nb = a3.shape[0]
    shape = (*batch, M, N)
    out = torch.empty(shape, dtype=a.dtype, device=a.device) if out is None else out
    c3 = out.view(nb, M, N)
    r3 = residual.expand(shape).reshape(nb, M, N) if residual is not None else c3
    if out.numel() == 0:
        return out
    if K == 0:
        out.copy_((bias if bias is not None else torch.zeros((), device=a.device)).expand(shape)
                  + (r3.view(shape) if residual is not None else 0))
        return out
    bias_arg = bias if bias is not None else c3
    use_gemv = M <= GEMV_MAX_M if gemv is None else gemv
    if use_gemv:
        cfg = config or ({"BLOCK_N": min(pow2(N, 16), 128), "BLOCK_K": min(pow2(K, 16), 128), "num_warps": 4}
                         if interpreting() else {"BLOCK_N": 32, "BLOCK_K": min(pow2(K, 16), 256), "num_warps": 4})
        for i in range(nb):
            args = (a3[i], b3[i], c3[i], bias_arg, r3[i], N, K, a3.stride(1), a3.stride(2), b3.stride(1),
                    b3.stride(2), c3.stride(1), c3.stride(2), r3.stride(1), r3.stride(2))
            launch(_gemv_kernel, (triton.cdiv(N, cfg["BLOCK_N"]), M), args, cfg,
                   HAS_BIAS=bias is not None, HAS_RES=residual is not None)
        return out
    dot = dot_dtype(a.dtype)
    args = (a3, b3, c3, bias_arg, r3, M, N, K, min(pow2(M), 4096), a3.stride(0), a3.stride(1), a3.stride(2),
            b3.stride(0), b3.stride(1), b3.stride(2), c3.stride(0), c3.stride(1), c3.stride(2),
            r3.stride(0), r3.stride(1), r3.stride(2))
    fixed = dict(config or _fixed(M, N, K, a.element_size()))
    fixed["EVEN_K"] = K % fixed["BLOCK_K"] == 0
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), nb)   # noqa: E731
    launch(_matmul_kernel, grid, args, fixed, tuned=None if config else _matmul_tuned,
           HAS_BIAS=bias is not None, HAS_RES=residual is not None, DOT=dot)
    return out


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
           residual: torch.Tensor | None = None, out: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T (+ bias) (+ residual), w read in place."""
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear input {tuple(x.shape)} does not match weight {tuple(w.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    o = torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device) if out is None else out
    r2 = residual.reshape(-1, w.shape[0]) if residual is not None else None
    matmul(x2, w.t(), bias, residual=r2, out=o.view(-1, w.shape[0]), **kw)
    return o

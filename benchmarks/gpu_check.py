#!/usr/bin/env python
"""One prepared GPU check of the Triton kernels: correctness against torch, then the figures.

    python benchmarks/gpu_check.py                  # on the GPU machine, from the repository root
    python benchmarks/gpu_check.py --quick --cpu    # dry run: tiny shapes under TRITON_INTERPRET=1
    python benchmarks/gpu_check.py --compile-only   # compile every kernel config for sm_90 here (no GPU)

Needs torch and triton only; the kernels are imported from this checkout (as `isthmus` when its
folder is called that, by path otherwise). Sections run in priority order and each is skipped
once --budget seconds have gone: the issue's table (softmax, rmsnorm, matmul, causal prefill
attention), decode attention and quantized matvec figures, an end-to-end decode of a random
SmolLM2-shaped Q4_1 model through `--target triton` (that one also needs numpy + scipy and the
isthmus package), odd shapes with the fixed configs, and every autotune config once. A bare
H100 should take about 3 minutes, most of it compiling. Exit status: 0 all checks passed,
1 a check failed (wrong numbers or a kernel that raised), 2 the setup failed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
MODULES = ("_util", "_aot", "norm", "softmax", "rope", "elementwise", "attention", "matmul", "qmatmul", "embedding")
T0 = time.perf_counter()
FAILURES: list[str] = []
ROWS: list[tuple] = []


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def load_kernels() -> SimpleNamespace:
    if REPO.name == "isthmus":
        sys.path.insert(0, str(REPO.parent))
        pkg = "isthmus.kernels.triton"
    else:
        pkg = "_isthmus_triton_kernels"
        folder = REPO / "kernels" / "triton"
        spec = importlib.util.spec_from_file_location(pkg, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[pkg] = mod
        spec.loader.exec_module(mod)
    return SimpleNamespace(**{m: importlib.import_module(f"{pkg}.{m}") for m in MODULES})


# -- helpers ----------------------------------------------------------------------------------------

def bench_ms(fn, cpu: bool) -> float:
    import torch
    import triton

    if cpu:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def check(name: str, got, want, tol: float) -> bool:
    """max |got - want| / max(1, max |want|) <= tol; a failure is recorded, not raised."""
    g, w = got.float(), want.float()
    bad = not bool(g.isfinite().all()) or g.shape != w.shape
    err = float("inf") if bad else float((g - w).abs().max()) / max(1.0, float(w.abs().max()))
    ok = err <= tol
    log(f"  check {name:44s} err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
    if not ok:
        FAILURES.append(f"{name}: error {err:.3e} > {tol:.0e}")
    return ok


def guarded(name: str):
    """Run a section; an exception is a failure of that section, the next one still runs."""
    def wrap(fn):
        def run(ctx):
            if time.perf_counter() - T0 > ctx.args.budget:
                log(f"== {name}: SKIPPED (past the {ctx.args.budget:.0f} s budget)")
                return
            log(f"== {name}")
            try:
                fn(ctx)
            except Exception as e:   # noqa: BLE001  (report and go on)
                traceback.print_exc()
                FAILURES.append(f"{name}: {type(e).__name__}: {e}")
                log(f"   {name} FAILED: {type(e).__name__}: {e}")
        return run
    return wrap


def row(what, shape, triton_v, peer_v, unit, peer, target=None, lower_is_better=False):
    ratio = float("nan") if not peer_v or not triton_v else (peer_v / triton_v if lower_is_better else triton_v / peer_v)
    status = ""
    if target is not None:
        kind, value = target
        ok = (triton_v >= value) if kind == "abs" else (ratio >= value)
        status = f"{'met' if ok else 'MISSED'} ({'>= ' + format(value, 'g') + ' ' + unit if kind == 'abs' else '>= ' + format(value, '.0%') + ' of ' + peer})"
    ROWS.append((what, shape, f"{triton_v:,.1f} {unit}", f"{peer_v:,.1f} {unit}" if peer_v else "-", peer,
                 f"{ratio:.2f}x" if peer_v else "-", status))
    log(f"  {what}: triton {triton_v:,.1f} {unit}, {peer} {peer_v:,.1f} {unit} ({ratio:.2f}x) {status}")


def best_config(tuned) -> str:
    cfg = getattr(tuned, "best_config", None)
    return str(cfg) if cfg is not None else "(fixed config)"


# -- sections ---------------------------------------------------------------------------------------

@guarded("bandwidth reference (torch copy)")
def sec_copy(ctx):
    import torch
    n = (1 << 28) if not ctx.quick else (1 << 16)
    x = torch.empty(n, dtype=torch.float16, device=ctx.dev)
    ms = bench_ms(lambda: x.clone(), ctx.cpu)
    ctx.copy_gbs = 2 * x.numel() * 2 / ms / 1e6
    log(f"  torch clone of {x.numel() * 2 / 2**20:.0f} MiB: {ctx.copy_gbs:,.0f} GB/s (read + write)")


@guarded("softmax")
def sec_softmax(ctx):
    import torch
    K = ctx.k
    rows, cols = (8192, 8192) if not ctx.quick else (64, 130)
    x = torch.randn(rows, cols, dtype=torch.float16, device=ctx.dev) * 3
    check(f"softmax {rows}x{cols} f16", K.softmax.softmax(x), torch.softmax(x.float(), -1), 2e-3)
    nbytes = 2 * x.numel() * x.element_size()
    gbs = nbytes / bench_ms(lambda: K.softmax.softmax(x), ctx.cpu) / 1e6
    tgbs = nbytes / bench_ms(lambda: torch.softmax(x, -1), ctx.cpu) / 1e6
    row("softmax", f"{rows}x{cols} f16", gbs, tgbs, "GB/s", "torch.softmax", ("abs", 2500))
    check("softmax persistent", K.softmax.softmax(x, persistent=2), torch.softmax(x.float(), -1), 2e-3)
    if not ctx.cpu:
        sweep = {f"w{w}": nbytes / bench_ms(lambda w=w: K.softmax.softmax(x, num_warps=w), False) / 1e6
                 for w in (4, 8, 16, 32)}
        sweep.update({f"persistent s{s} w{w}": nbytes / bench_ms(
            lambda s=s, w=w: K.softmax.softmax(x, num_warps=w, persistent=s), False) / 1e6
            for s in (1, 2, 3) for w in (8, 16)})
        log("  softmax sweep: " + ", ".join(f"{k} {v:,.0f}" for k, v in sweep.items()) + " GB/s")
        best = max(sweep, key=sweep.get)
        row(f"softmax, best: {best}", f"{rows}x{cols} f16", sweep[best], tgbs, "GB/s", "torch.softmax", ("abs", 2500))


@guarded("rmsnorm")
def sec_rmsnorm(ctx):
    import torch
    K = ctx.k
    rows, cols = (16384, 4096) if not ctx.quick else (32, 256)
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device=ctx.dev)
    w = torch.randn(cols, dtype=torch.bfloat16, device=ctx.dev)

    def ref(x, w):
        x32 = x.float()
        return (x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + 1e-6) * w.float()).to(x.dtype)

    check(f"rmsnorm {rows}x{cols} bf16", K.norm.rmsnorm(x, w, 1e-6), ref(x, w), 2e-2)
    r = torch.randn_like(x)
    r2 = r.clone()
    y = K.norm.rmsnorm(x, w, 1e-6, residual=r2)          # r2 += x in place, y = rmsnorm(r2)
    check("rmsnorm fused residual: sum", r2, r.float() + x.float(), 1e-2)
    check("rmsnorm fused residual: norm", y, ref(r2, w), 2e-2)
    nbytes = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()
    gbs = nbytes / bench_ms(lambda: K.norm.rmsnorm(x, w, 1e-6), ctx.cpu) / 1e6
    peer = torch.nn.functional.rms_norm if hasattr(torch.nn.functional, "rms_norm") else None
    tgbs = nbytes / bench_ms(lambda: peer(x, (cols,), w, 1e-6), ctx.cpu) / 1e6 if peer else 0.0
    row("rmsnorm", f"{rows}x{cols} bf16", gbs, tgbs, "GB/s", "F.rms_norm (eager)", ("abs", 2500))
    check("rmsnorm persistent", K.norm.rmsnorm(x, w, 1e-6, persistent=2), ref(x, w), 2e-2)
    if not ctx.cpu:
        sweep = {f"w{w_}": nbytes / bench_ms(lambda w_=w_: K.norm.rmsnorm(x, w, 1e-6, num_warps=w_), False) / 1e6
                 for w_ in (4, 8, 16)}
        sweep.update({f"persistent s{s} w{w_}": nbytes / bench_ms(
            lambda s=s, w_=w_: K.norm.rmsnorm(x, w, 1e-6, num_warps=w_, persistent=s), False) / 1e6
            for s in (1, 2, 3) for w_ in (4, 8)})
        log("  rmsnorm sweep: " + ", ".join(f"{k} {v:,.0f}" for k, v in sweep.items()) + " GB/s")
        best = max(sweep, key=sweep.get)
        row(f"rmsnorm, best: {best}", f"{rows}x{cols} bf16", sweep[best], tgbs, "GB/s", "F.rms_norm (eager)",
            ("abs", 2500))


@guarded("matmul")
def sec_matmul(ctx):
    import torch
    K = ctx.k
    n = 4096 if not ctx.quick else 64
    a = torch.randn(n, n, dtype=torch.bfloat16, device=ctx.dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=ctx.dev)
    t0 = time.perf_counter()
    c = K.matmul.matmul(a, b)
    if not ctx.cpu:
        torch.cuda.synchronize()
    log(f"  first call (autotune) {time.perf_counter() - t0:.1f} s; best {best_config(K.matmul._matmul_tuned)}")
    check(f"matmul {n}^3 bf16", c, torch.matmul(a, b), 1e-2)
    flop = 2 * n ** 3
    tf = flop / bench_ms(lambda: K.matmul.matmul(a, b), ctx.cpu) / 1e9
    ttf = flop / bench_ms(lambda: torch.matmul(a, b), ctx.cpu) / 1e9
    row("matmul", f"{n}^3 bf16", tf, ttf, "TFLOP/s", "torch.matmul", ("rel", 0.85))


def _sdpa(q, k, v, causal):
    import torch
    F = torch.nn.functional
    if k.shape[1] != q.shape[1]:
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        except TypeError:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@guarded("causal prefill attention")
def sec_attention(ctx):
    import torch
    K = ctx.k
    B, H, S, D = (4, 32, 2048, 128) if not ctx.quick else (1, 2, 64, 32)
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16, device=ctx.dev) for _ in range(3))
    t0 = time.perf_counter()
    o = K.attention.attention(q, k, v, causal=True, decode=False)
    if not ctx.cpu:
        torch.cuda.synchronize()
    log(f"  first call (autotune) {time.perf_counter() - t0:.1f} s; best {best_config(K.attention._prefill_tuned)}")
    check(f"attention {B}x{H}x{S}x{D} bf16 causal", o, _sdpa(q, k, v, True), 2e-2)
    flop = 4 * B * H * S * S * D / 2
    tf = flop / bench_ms(lambda: K.attention.attention(q, k, v, causal=True, decode=False), ctx.cpu) / 1e9
    ttf = flop / bench_ms(lambda: _sdpa(q, k, v, True), ctx.cpu) / 1e9
    row("attention prefill", f"{B}x{H}x{S}x{D} bf16 causal", tf, ttf, "TFLOP/s", "SDPA", ("rel", 0.80))
    if not ctx.cpu:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ftf = flop / bench_ms(lambda: _sdpa(q, k, v, True), False) / 1e9
            log(f"  SDPA pinned to FLASH_ATTENTION: {ftf:,.1f} TFLOP/s (triton {tf / ftf:.2f}x)")
        except Exception as e:   # noqa: BLE001  (informational only)
            log(f"  SDPA flash backend not measurable: {e}")


@guarded("decode attention (split-KV, GQA)")
def sec_decode(ctx):
    import torch
    K = ctx.k
    B, HQ, HKV, T, D = (8, 32, 8, 4096, 128) if not ctx.quick else (2, 4, 2, 70, 32)
    cache_k = torch.randn(B, HKV, T + 64, D, dtype=torch.bfloat16, device=ctx.dev)
    cache_v = torch.randn(B, HKV, T + 64, D, dtype=torch.bfloat16, device=ctx.dev)
    k, v = cache_k[:, :, :T], cache_v[:, :, :T]        # a view of a preallocated cache, as the decoder reads it
    q = torch.randn(B, HQ, 1, D, dtype=torch.bfloat16, device=ctx.dev)
    check(f"decode attention {B}x{HQ}/{HKV}x{T}x{D}", K.attention.attention(q, k, v), _sdpa(q, k, v, False), 2e-2)
    nbytes = 2 * B * HKV * T * D * 2
    gbs = nbytes / bench_ms(lambda: K.attention.attention(q, k, v), ctx.cpu) / 1e6
    kc, vc = k.contiguous(), v.contiguous()
    tgbs = nbytes / bench_ms(lambda: _sdpa(q, kc, vc, False), ctx.cpu) / 1e6
    row("decode attention", f"B{B} H{HQ}/{HKV} T{T} D{D} bf16", gbs, tgbs, "GB/s", "SDPA (gqa)")


def _random_blocks(qtype, n, k, device, K):
    """Random GGUF blocks (scales in a sane range) repacked, and their dequantized f32 matrix."""
    import numpy as np
    rng = np.random.default_rng(0)
    per = {"q4_0": 18, "q4_1": 20, "q8_0": 34}[qtype]
    raw = rng.integers(0, 256, size=(n, k // 32, per), dtype=np.uint8)
    scales = (rng.random((n, k // 32)) * 0.02 + 0.001).astype("<f2")
    raw[:, :, 0:2] = scales.view(np.uint8).reshape(n, k // 32, 2)
    if qtype == "q4_1":
        mins = (-rng.random((n, k // 32)) * 0.1).astype("<f2")
        raw[:, :, 2:4] = mins.view(np.uint8).reshape(n, k // 32, 2)
    pw = K.qmatmul.repack(qtype, (n, k), raw.reshape(n, -1), device)
    return pw, K.qmatmul.dequantize(pw)


@guarded("quantized matvec / matmul (GGUF blocks)")
def sec_quant(ctx):
    import torch
    K = ctx.k
    N, Kd, M = (14336, 4096, 512) if not ctx.quick else (96, 128, 20)
    x1 = torch.randn(1, Kd, dtype=torch.bfloat16, device=ctx.dev)
    dense = torch.randn(N, Kd, dtype=torch.bfloat16, device=ctx.dev)
    tms = bench_ms(lambda: torch.matmul(x1, dense.t()), ctx.cpu)
    for qtype in ("q4_0", "q4_1", "q8_0"):
        pw, w32 = _random_blocks(qtype, N, Kd, ctx.dev, K)
        check(f"qgemv {qtype} 1x{Kd} @ {N}x{Kd}", K.qmatmul.qlinear(x1, pw), x1.float() @ w32.t(), 2e-2)
        ms = bench_ms(lambda: K.qmatmul.qlinear(x1, pw), ctx.cpu)
        log(f"    best {best_config(K.qmatmul._qgemv_tuned)}")
        gbs, tgbs = pw.nbytes / ms / 1e6, dense.numel() * 2 / tms / 1e6
        log(f"    {qtype}: {gbs:,.0f} GB/s of packed weights; the bf16 matvec reads {tgbs:,.0f} GB/s")
        row(f"qgemv {qtype}", f"1x{Kd} @ {N}x{Kd}, {gbs:,.0f} GB/s", ms * 1e3, tms * 1e3, "us",
            "bf16 matvec (cuBLAS)", lower_is_better=True)
        if qtype == "q4_1":
            xm = torch.randn(M, Kd, dtype=torch.bfloat16, device=ctx.dev)
            check(f"qmatmul {qtype} {M}x{Kd} @ {N}x{Kd}", K.qmatmul.qlinear(xm, pw), xm.float() @ w32.t(), 2e-2)
            flop = 2 * M * N * Kd
            tf = flop / bench_ms(lambda: K.qmatmul.qlinear(xm, pw), ctx.cpu) / 1e9
            dw = w32.to(torch.bfloat16)
            ttf = flop / bench_ms(lambda: torch.matmul(xm, dw.t()), ctx.cpu) / 1e9
            log(f"    best {best_config(K.qmatmul._qmatmul_tuned)}")
            row(f"qmatmul {qtype}", f"{M}x{Kd} @ {N}x{Kd}", tf, ttf, "TFLOP/s", "bf16 matmul (dequantized)")


@guarded("odd shapes, fixed configs (no autotuning)")
def sec_odd(ctx):
    import torch
    K = ctx.k
    os.environ["ISTHMUS_TRITON_AUTOTUNE"] = "0"
    big = not ctx.quick
    try:
        dev, bf = ctx.dev, torch.bfloat16
        x = torch.randn(127, 129, device=dev)
        check("softmax 127x129 f32", K.softmax.softmax(x), torch.softmax(x, -1), 1e-5)
        long = torch.randn(3, 20001 if big else 300, device=dev, dtype=torch.float16)
        check(f"softmax looped 3x{long.shape[1]} f16", K.softmax.softmax(long, block=None if big else 64),
              torch.softmax(long.float(), -1), 2e-3)
        w = torch.randn(129, device=dev)
        check("layernorm 127x129 f32", K.norm.layernorm(x, w, w, 1e-5),
              torch.nn.functional.layer_norm(x, (129,), w, w, 1e-5), 1e-4)
        for layout in ("half", "interleaved"):
            q = torch.randn(2, 9, 7, 64, device=dev, dtype=bf)
            pos = torch.arange(3, 10, device=dev)[None].repeat(2, 1)
            check(f"rope {layout} partial 32/64", K.rope.rope(q, pos, 1e4, layout, 32), _rope_ref(q, pos, layout, 32), 2e-2)
        g = torch.randn(5, 2 * 1537, device=dev, dtype=bf)
        check("swiglu fused halves 5x1537", K.elementwise.swiglu(g),
              torch.nn.functional.silu(g[:, :1537].float()) * g[:, 1537:].float(), 2e-2)
        shapes = [(1, 9, 3, 1, 1, 64), (2, 9, 3, 37, 37, 64), (1, 8, 2, 200, 260, 128), (1, 4, 4, 129, 129, 80),
                  (3, 12, 4, 5, 1000, 64)] if big else [(1, 9, 3, 1, 1, 64), (1, 3, 1, 37, 45, 80)]
        for (b, hq, hkv, s, t, d) in shapes:
            q = torch.randn(b, hq, s, d, device=dev, dtype=bf)
            k, v = (torch.randn(b, hkv, t, d, device=dev, dtype=bf) for _ in range(2))
            want = _attn_ref(q, k, v)
            check(f"attention {b}x{hq}/{hkv} s{s} t{t} d{d}", K.attention.attention(q, k, v), want, 2e-2)
            if s * (hq // hkv) <= 64:
                check(f"  ... prefill kernel", K.attention.attention(q, k, v, decode=False), want, 2e-2)
        for (m, kk, n) in ([(1, 576, 1536), (3, 129, 257), (300, 200, 136), (77, 576, 49152)] if big
                           else [(1, 70, 33), (20, 70, 33)]):
            a = torch.randn(m, kk, device=dev, dtype=bf)
            wt = torch.randn(n, kk, device=dev, dtype=bf)
            bias = torch.randn(n, device=dev, dtype=bf)
            check(f"linear+bias {m}x{kk} @ {n}x{kk}", K.matmul.linear(a, wt, bias), a.float() @ wt.float().t() + bias.float(), 1e-2)
        for qtype in ("q4_0", "q4_1", "q8_0"):
            for (m, kk, n) in ([(1, 576, 1537), (2, 1536, 576), (33, 576, 192)] if big else [(1, 96, 33), (9, 96, 33)]):
                pw, w32 = _random_blocks(qtype, n, kk, dev, K)
                a = torch.randn(m, kk, device=dev, dtype=bf)
                res = torch.randn(m, n, device=dev, dtype=bf)
                check(f"qlinear+res {qtype} {m}x{kk} @ {n}x{kk}", K.qmatmul.qlinear(a, pw, residual=res),
                      a.float() @ w32.t() + res.float(), 2e-2)
            ids = torch.tensor([[0, n - 1, 5]], device=dev)
            check(f"embedding {qtype}", K.embedding.embedding(pw, ids, dtype=torch.float32), w32[ids], 1e-6)
    finally:
        os.environ["ISTHMUS_TRITON_AUTOTUNE"] = "1"


def _attn_ref(q, k, v):
    import torch
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s, t = q.shape[2], k.shape[2]
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.arange(t, device=q.device)[None, :] <= torch.arange(s, device=q.device)[:, None] + (t - s)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def _rope_ref(x, pos, layout, dim):
    import torch
    inv = 1.0 / (1e4 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    ang = pos.float()[:, None, :, None] * inv
    cos, sin = ang.cos(), ang.sin()
    x32 = x.float()
    rot, rest = x32[..., :dim], x32[..., dim:]
    if layout == "interleaved":
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    else:
        a, b = rot[..., :dim // 2], rot[..., dim // 2:]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    return torch.cat([out, rest], -1)


@guarded("every autotune config once")
def sec_configs(ctx):
    import torch
    K = ctx.k
    dev, bf = ctx.dev, torch.bfloat16
    if ctx.cpu:
        log("  (not under the interpreter: GPU tile sizes are too slow there)")
        return
    a, b = torch.randn(300, 200, device=dev, dtype=bf), torch.randn(200, 136, device=dev, dtype=bf)
    want = a.float() @ b.float()
    for c in K.matmul._matmul_tuned.configs:
        check(f"matmul {_cfg(c)}", K.matmul.matmul(a, b, config=_as_dict(c)), want, 1e-2)
    q = torch.randn(1, 4, 200, 128, device=dev, dtype=bf)
    k, v = (torch.randn(1, 2, 260, 128, device=dev, dtype=bf) for _ in range(2))
    want = _attn_ref(q, k, v)
    for c in K.attention._prefill_tuned.configs:
        check(f"attention {_cfg(c)}", K.attention.attention(q, k, v, decode=False, config=_as_dict(c)), want, 2e-2)
    pw, w32 = _random_blocks("q4_1", 300, 1024, dev, K)
    x1, xm = torch.randn(1, 1024, device=dev, dtype=bf), torch.randn(70, 1024, device=dev, dtype=bf)
    for c in K.qmatmul._qgemv_tuned.configs:
        check(f"qgemv q4_1 {_cfg(c)}", K.qmatmul.qlinear(x1, pw, gemv=True, config=_as_dict(c)), x1.float() @ w32.t(), 2e-2)
    for c in K.qmatmul._qmatmul_tuned.configs:
        check(f"qmatmul q4_1 {_cfg(c)}", K.qmatmul.qlinear(xm, pw, gemv=False, config=_as_dict(c)), xm.float() @ w32.t(), 2e-2)


def _as_dict(c) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _cfg(c) -> str:
    return ",".join(f"{v}" for v in c.kwargs.values()) + f" w{c.num_warps} s{c.num_stages}"


@guarded("end to end: random SmolLM2-135M-shaped Q4_1 decoder (isthmus --target triton)")
def sec_e2e(ctx):
    import numpy as np
    import torch
    if REPO.name != "isthmus":                 # make `import isthmus` find this checkout
        link_dir = tempfile.mkdtemp(prefix="isthmus-gpu-check-")
        os.symlink(REPO, os.path.join(link_dir, "isthmus"))
        sys.path.insert(0, link_dir)
    try:
        import isthmus
        from isthmus.compiler.frontends import Model
        from isthmus.compiler.frontends.llama import build_llama
        from isthmus.compiler.quant import quantize
    except ImportError as e:
        log(f"  skipped: the isthmus package does not import here ({e})")
        return
    cfg = (dict(n_layers=30, hidden=576, ffn=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152)
           if not ctx.quick else dict(n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=97))
    cfg.update(rms_eps=1e-5, rope_theta=100000.0, context_length=2048)
    rng = np.random.default_rng(0)
    D, F, H, KVH, hd, V = (cfg[k] for k in ("hidden", "ffn", "n_heads", "n_kv_heads", "head_dim", "vocab_size"))

    def mat(r, c, qtype="q4_1"):
        return quantize((rng.standard_normal((r, c), dtype=np.float32) / np.sqrt(c)), qtype)

    def norm_w():
        return (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)

    w = {"token_embd.weight": mat(V, D, "q8_0"), "output_norm.weight": norm_w()}
    for i in range(cfg["n_layers"]):
        p = f"blk.{i}"
        w.update({f"{p}.attn_norm.weight": norm_w(), f"{p}.ffn_norm.weight": norm_w(),
                  f"{p}.attn_q.weight": mat(H * hd, D), f"{p}.attn_k.weight": mat(KVH * hd, D),
                  f"{p}.attn_v.weight": mat(KVH * hd, D), f"{p}.attn_output.weight": mat(D, H * hd),
                  f"{p}.ffn_gate.weight": mat(F, D), f"{p}.ffn_up.weight": mat(F, D), f"{p}.ffn_down.weight": mat(D, F)})
    model = Model(build_llama(cfg, w, rope_layout="interleaved", name="smollm2-shaped"), "random", "test", cfg)
    log(f"  built {cfg['n_layers']}-layer model, {sum(x.nbytes for x in w.values()) / 2**20:.0f} MiB of weights")
    exe = isthmus.compile(model, target="triton")
    log(f"  compiled for triton ({exe.act_dtype}) in {exe.compile_seconds:.1f} s")
    prompt = [int(t) for t in rng.integers(0, V, 16)]
    dec = exe.decoder()
    t0 = time.perf_counter()
    got = dec.step(prompt)
    log(f"  first prefill (compiles + autotunes) {time.perf_counter() - t0:.1f} s")
    want = isthmus.compile(model, target="reference").decoder().step(prompt)
    cos = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
    log(f"  logits vs reference: cosine {cos:.5f}, argmax {int(got.argmax())} vs {int(want.argmax())}")
    if not cos >= 0.99:
        FAILURES.append(f"e2e logits cosine {cos:.4f} < 0.99")
    n_prompt, n_gen = (128, 64) if not ctx.quick else (8, 4)
    long_prompt = [int(t) for t in rng.integers(0, V, n_prompt)]
    t0 = time.perf_counter()
    dec = exe.decoder()                     # compile and tune the timed shapes first
    dec.step(long_prompt)
    for _ in range(3):
        dec.step([1])
    log(f"  warm-up (compiles + autotunes the {n_prompt}-token prefill and decode) {time.perf_counter() - t0:.1f} s")
    sync = torch.cuda.synchronize if not ctx.cpu else (lambda: None)
    dec = exe.decoder()
    sync()
    t0 = time.perf_counter()
    dec.step(long_prompt)
    sync()
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n_gen):
        dec.step([i % V])
    sync()
    t_decode = time.perf_counter() - t0
    ROWS.append(("e2e prefill", f"{n_prompt} tokens", f"{n_prompt / t_prefill:,.0f} tok/s", "-", "-", "-", ""))
    ROWS.append(("e2e decode", f"{n_gen} tokens", f"{n_gen / t_decode:,.0f} tok/s", "-", "-", "-",
                 f"{t_decode / n_gen * 1e3:.2f} ms/token"))
    log(f"  prefill {n_prompt} tokens: {n_prompt / t_prefill:,.0f} tok/s; decode: {n_gen / t_decode:,.1f} tok/s "
        f"({t_decode / n_gen * 1e3:.2f} ms/token)")
    exe.profiling, steps = True, 8          # where a decode step's time goes (synchronised per op)
    for i in range(steps):
        dec.step([i % V])
    exe.profiling = False
    for p in exe.profile()[:8]:
        log(f"    {p.op:10s} {p.calls // steps:4d} calls/token {p.seconds / steps * 1e3:7.3f} ms/token")


# -- ahead-of-time compile --------------------------------------------------------------------------

def compile_only(K, arch: int) -> int:
    """Record the launches the GPU sections make and compile each (every tuning config) for sm_<arch>."""
    import torch
    bf, f16, e = torch.bfloat16, torch.float16, torch.empty

    def work():
        K.softmax.softmax(e(8192, 8192, dtype=f16))
        for s in (1, 2, 3):
            K.softmax.softmax(e(8192, 8192, dtype=f16), persistent=s)
            K.norm.rmsnorm(e(16384, 4096, dtype=bf), e(4096, dtype=bf), persistent=s)
        K.softmax.softmax(e(3, 20001, dtype=f16))
        K.norm.rmsnorm(e(16384, 4096, dtype=bf), e(4096, dtype=bf))
        K.norm.rmsnorm(e(7, 576, dtype=bf), e(576, dtype=bf), residual=e(7, 576, dtype=bf))
        K.norm.layernorm(e(7, 768), e(768), e(768))
        for layout in ("half", "interleaved"):
            K.rope.rope(e(1, 9, 7, 64, dtype=bf), torch.zeros(1, 7, dtype=torch.int64), layout=layout)
        K.rope.rope(e(1, 9, 7, 64, dtype=bf), torch.zeros(1, 7, dtype=torch.int64), dim=32)
        K.elementwise.swiglu(e(7, 3072, dtype=bf))
        for kind in K.elementwise.ACTIVATIONS:
            K.elementwise.activation(e(7, 100, dtype=bf), kind)
        for op in K.elementwise.BINARY:
            K.elementwise.binary(e(7, 100, dtype=bf), e(100, dtype=bf), op)
        for d in (64, 80, 128):
            K.attention.attention(e(4, 32, 2048, d, dtype=bf), e(4, 8, 2048, d, dtype=bf), e(4, 8, 2048, d, dtype=bf))
            K.attention.attention(e(1, 8, 100, d, dtype=bf), e(1, 2, 130, d, dtype=bf), e(1, 2, 130, d, dtype=bf))
            K.attention.attention(e(8, 32, 1, d, dtype=bf), e(8, 8, 4096, d, dtype=bf), e(8, 8, 4096, d, dtype=bf),
                                  splits=5)       # split-KV + combine (a GPU picks the splits from its SMs)
            K.attention.attention(e(1, 9, 1, d, dtype=bf), e(1, 3, 40, d, dtype=bf), e(1, 3, 40, d, dtype=bf))
        K.matmul.matmul(e(4096, 4096, dtype=bf), e(4096, 4096, dtype=bf))
        K.matmul.matmul(e(300, 200, dtype=f16), e(200, 136, dtype=f16))
        K.matmul.linear(e(1, 576, dtype=bf), e(1536, 576, dtype=bf), e(1536, dtype=bf))
        K.matmul.linear(e(77, 576, dtype=bf), e(1536, 576, dtype=bf), residual=e(77, 1536, dtype=bf))
        K.matmul.linear(e(77, 576), e(1536, 576))
        for qt in ("q4_0", "q4_1", "q8_0"):
            n, k = 1536, 576
            qs = e(n, k // 2, dtype=torch.uint8) if qt != "q8_0" else e(n, k, dtype=torch.int8)
            pw = K.qmatmul.PackedWeight(qt, n, k, qs, e(n, k // 32, dtype=f16),
                                        e(n, k // 32, dtype=f16) if qt == "q4_1" else None)
            K.qmatmul.qlinear(e(1, k, dtype=bf), pw)
            K.qmatmul.qlinear(e(1, k, dtype=bf), pw, residual=e(1, n, dtype=bf))
            K.qmatmul.qlinear(e(300, k, dtype=bf), pw)
            K.embedding.embedding(pw, torch.zeros(5, dtype=torch.int64), dtype=bf)
        K.embedding.embedding(e(100, 576, dtype=bf), torch.zeros(5, dtype=torch.int64))

    launches = K._aot.record(work)
    log(f"compiling {len(launches)} launches (every tuning config) for sm_{arch} with triton {K._util.triton.__version__}")
    return K._aot.compile_all(launches, arch=arch, log=log)


# -- main -------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a dry run of the script)")
    ap.add_argument("--cpu", action="store_true", help="run the kernels under TRITON_INTERPRET=1 on CPU tensors")
    ap.add_argument("--compile-only", action="store_true", help="compile every kernel config for a GPU, run nothing")
    ap.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (default 90)")
    ap.add_argument("--budget", type=float, default=200.0, help="skip sections that would start after this many seconds")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: "
                    "copy,softmax,rmsnorm,matmul,attention,decode,quant,e2e,odd,configs")
    args = ap.parse_args()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    elif args.compile_only:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")
    try:
        import torch
        K = load_kernels()
    except Exception as e:   # noqa: BLE001
        traceback.print_exc()
        print(f"setup failed: {e}", file=sys.stderr)
        return 2
    if args.compile_only:
        failures = compile_only(K, args.arch)
        log(f"{failures} variant(s) failed to compile" if failures else "every variant compiled")
        return 1 if failures else 0
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu (interpreter) or --compile-only", file=sys.stderr)
        return 2
    dev = "cpu" if args.cpu else "cuda"
    torch.manual_seed(0)
    ctx = SimpleNamespace(args=args, k=K, dev=dev, cpu=args.cpu, quick=args.quick, copy_gbs=0.0)
    if not args.cpu:
        p = torch.cuda.get_device_properties(0)
        log(f"device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
            f"torch {torch.__version__}, triton {K._util.triton.__version__}")
    skip = set(filter(None, args.skip.split(",")))
    sections = [("copy", sec_copy), ("softmax", sec_softmax), ("rmsnorm", sec_rmsnorm), ("matmul", sec_matmul),
                ("attention", sec_attention), ("decode", sec_decode), ("quant", sec_quant), ("e2e", sec_e2e),
                ("odd", sec_odd), ("configs", sec_configs)]
    for name, fn in sections:
        if name not in skip:
            fn(ctx)
    print()
    head = ("kernel", "shape", "triton", "peer", "peer is", "ratio", "target")
    widths = [max(len(str(r[i])) for r in [head, *ROWS]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *ROWS]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if ctx.copy_gbs:
        print(f"(torch clone bandwidth on this device: {ctx.copy_gbs:,.0f} GB/s)")
    print()
    if FAILURES:
        print(f"{len(FAILURES)} FAILURE(S):")
        for f in FAILURES:
            print(f"  - {f}")
        return 1
    log("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile kernel launches for a GPU on a machine without one (triton ships ptxas).

`record(fn)` runs `fn` with launches recorded instead of run (see _util.RECORD); `compile_all`
compiles each recorded launch for the target, every autotune config of a tuned kernel
included, and reports shared memory per variant. It catches what the interpreter cannot:
type errors of loop-carried values, tl.dot shape limits, shared memory over the chip's limit.
"""

from __future__ import annotations

import time

import torch
import triton

from . import _util

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
        torch.int8: "*i8", torch.int32: "*i32", torch.int64: "*i64"}


def record(fn) -> list:
    saved, _util.RECORD = _util.RECORD, []
    try:
        fn()
        return _util.RECORD
    finally:
        _util.RECORD = saved


def _jit_and_heuristics(kernel):
    heur = {}
    fn = kernel
    while not hasattr(fn, "arg_names") or hasattr(fn, "values") or hasattr(fn, "configs"):
        if hasattr(fn, "values"):        # triton.heuristics
            heur.update(fn.values)
        fn = fn.fn
    return fn, heur


def _signature(jit, args, constexprs):
    sig, consts, attrs = {}, {}, {}
    positional = [n for n in jit.arg_names if n not in constexprs]
    if len(positional) != len(args):
        raise TypeError(f"{jit.__name__}: {len(args)} args for parameters {positional}")
    named = dict(zip(positional, args))
    for i, name in enumerate(jit.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        v = named[name]
        if isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
            aligned = v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            sig[name] = "i1"
            aligned = False
        elif isinstance(v, int) and v == 1:   # the launcher specialises 1 to a constant (unit strides)
            sig[name] = "constexpr"
            consts[name] = 1
            continue
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            aligned = v % 16 == 0
        elif isinstance(v, float):
            sig[name] = "fp32"
            aligned = False
        else:
            raise TypeError(f"{jit.__name__}: cannot type argument {name}={v!r}")
        if aligned:          # as the launcher specialises: 16-byte aligned pointers, ints divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def variants(launches):
    """(name, jit fn, (signature, constexprs, attrs), options, label) for every launch x autotune config."""
    seen = set()
    for kernel, tuned, args, config, constexprs in launches:
        configs = [None]
        jit, heur = _jit_and_heuristics(tuned if tuned is not None else kernel)
        if tuned is not None:       # what the autotuner would time: its configs after pruning
            configs = list(tuned.configs)
            prune = getattr(tuned, "early_config_prune", None)
            if prune is not None:
                positional = [n for n in jit.arg_names if n not in constexprs and n not in heur
                              and n not in configs[0].kwargs]
                configs = prune(configs, dict(zip(positional, args)), **constexprs)
        for c in configs:
            if c is None:
                opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
                meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
            else:
                opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
                meta = dict(c.kwargs)
            cx = {**constexprs, **meta}
            positional = [n for n in jit.arg_names if n not in cx and n not in heur]
            named = dict(zip(positional, args))
            for name, f in heur.items():
                cx[name] = f({**named, **cx})
            sig, consts, attrs = _signature(jit, args, cx)
            key = (jit.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
                   tuple(sorted(attrs)), tuple(sorted(opts.items())))
            if key in seen:
                continue
            seen.add(key)
            label = ", ".join(f"{k}={v}" for k, v in consts.items() if k.isupper())
            yield jit.__name__, jit, (sig, consts, attrs), opts, label


def _ptxas_usage(ptx: str, arch: int) -> str:
    """'R regs, S B spilled' from ptxas -v, or '' when ptxas cannot be found."""
    import os
    import re
    import subprocess
    import tempfile

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exes = [os.path.join(bin_dir, n) for n in ("ptxas", "ptxas-blackwell") if os.path.exists(os.path.join(bin_dir, n))]
    r = None
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        for exe in exes:          # the ptxas that knows this PTX version
            r = subprocess.run([exe, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(d, "k.o")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
    if r is None or r.returncode != 0:
        return ""
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return f"{regs.group(1) if regs else '?':>3s} regs {spill.group(1) if spill else '?':>4s} B spill"


def compile_all(launches, arch: int = 90, smem_limit: int = 232448, only: str = "", log=print) -> int:
    """Compile every variant (whose kernel name contains `only`) for sm_<arch>; returns the number of failures."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for name, jit, (sig, consts, attrs), opts, label in variants(launches):
        if only not in name:
            continue
        t0 = time.perf_counter()
        usage = ""
        try:
            ck = triton.compile(triton.compiler.ASTSource(jit, sig, constexprs=consts, attrs=attrs), target=target,
                                options=opts)
            smem = ck.metadata.shared
            usage = _ptxas_usage(ck.asm["ptx"], arch)
            status = "ok" if smem <= smem_limit else f"FAIL: {smem} B shared memory > {smem_limit}"
            failures += smem > smem_limit
        except Exception as e:   # noqa: BLE001  (report every failing variant, then fail)
            failures += 1
            smem, status = 0, f"FAIL: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        log(f"  {name:18s} {label[:72]:72s} w{opts.get('num_warps', 4)} s{opts.get('num_stages', 3)} "
            f"smem {smem // 1024:3d} KiB {usage} {time.perf_counter() - t0:5.1f}s {status}")
    return failures

"""pytest-benchmark figures of the NPU lowering: `pytest benchmarks/test_bench_npu_lowering.py --benchmark-only`
(add `-m slow` for the ones that need the default model). docs/npu-performance.md quotes them.

Each benchmark measures host wall time (compiling, or simulating) and records the *modeled* figures
in extra_info: cycles, FLOP utilisation, the decode step against its HBM-bandwidth bound. The
peer is numpy doing the same matmul in fp32 on the host, for scale.
"""

import time

import numpy as np
import pytest

from isthmus.compiler.lower.npu.profile_tables import decode_figures, matmul_figures


def test_matmul_1024x4096x4096_bf16(benchmark):
    """Lowering x[1024, 4096] @ W[4096, 4096] and scheduling it on the datacenter preset."""
    f = benchmark.pedantic(matmul_figures, args=(1024, 4096, 4096, "bf16", "datacenter"), rounds=1, iterations=1)
    benchmark.extra_info.update(modeled_cycles=f["cycles"], flop_utilisation=round(f["flop_utilisation"], 4),
                                tensor_busy=round(f["tensor_busy"], 4), instructions=len(f["program"]))
    assert f["flop_utilisation"] >= 0.85


def test_peer_numpy_matmul_1024x4096x4096(benchmark):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 4096)).astype(np.float32)
    b = rng.standard_normal((4096, 4096)).astype(np.float32)
    benchmark.pedantic(lambda: a @ b, rounds=3, iterations=1)


@pytest.fixture(scope="module")
def default_model():
    from isthmus.compiler.frontends import load_model
    from isthmus.models import pull
    return load_model(pull(progress=False))


@pytest.mark.slow
def test_compile_default_model(benchmark, default_model):
    import isthmus
    exe = benchmark.pedantic(isthmus.compile, args=(default_model,), kwargs={"target": "npu"}, rounds=3, iterations=1)
    t0 = time.perf_counter()
    exe.runtime.program(1, 64)
    benchmark.extra_info["first_decode_program_s"] = round(time.perf_counter() - t0, 2)
    benchmark.extra_info["weight_bytes"] = exe.image.weight_bytes


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16x3", "bf16", "f32"])
def test_decode_step(benchmark, default_model, precision):
    """One simulated decode step (host time) and its modeled figures."""
    from isthmus.compiler.lower.npu.target import lower_npu
    from isthmus.compiler.passes.pipeline import run_pipeline
    exe = lower_npu(run_pipeline(default_model.graph), model=default_model, precision=precision)
    dec = exe.decoder()
    logits = dec.step(default_model.tokenizer.encode("The capital of France is"))
    tok = [int(logits.argmax())]
    benchmark.pedantic(lambda: dec.step(tok), rounds=3, iterations=1)
    f = decode_figures(exe, window=64)
    benchmark.extra_info.update(modeled_cycles=f["cycles"], modeled_us=round(f["seconds"] * 1e6, 1),
                                weight_bytes=f["weight_bytes"], hbm_bound_cycles=round(f["hbm_bound_cycles"]),
                                hbm_ratio=round(f["hbm_ratio"], 2), tensor_bound_cycles=f["tensor_bound_cycles"])

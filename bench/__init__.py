"""`isthmus bench`: a fixed set of comparisons, isthmus against a peer doing the same work, printed
side by side (the figures docs/performance.md quotes). Where both sides are engines with threads of
their own (kernels, onnx, model), each runs in its own process with its own settings and the two take
turns, best of several rounds (isolated.py).

Groups (each a function `(quick, log) -> list[Row]`):
  kernels  numba kernels vs numpy (ops.py)
  onnx     isthmus's ONNX import + numba vs onnxruntime on one-node models (ops.py)
  model    the default model's prefill (38, 271 tokens) and decode vs llama.cpp (model.py)
  quant    decode and prefill per GGUF quantization type (Q4_K_M ... Q5_1) vs llama.cpp on the same files (quant.py)
  npu      modeled cycles of compiled programs vs the machine's bounds (npu.py)
  tee      seal/unseal vs AES-256-GCM alone (tee.py)

The asv suite (benchmarks/asv_suite/, asv.conf.json) tracks figures across commits; this command answers
"where does isthmus stand against its peers on this machine, now".
"""

from __future__ import annotations

import time

GROUPS = ("kernels", "onnx", "model", "quant", "npu", "tee")


def _group(name: str):
    from isthmus.bench import model, npu, ops, quant, tee
    return {"kernels": ops.kernels, "onnx": ops.onnx, "model": model.model, "quant": quant.quant, "npu": npu.npu,
            "tee": tee.tee}[name]


def run(groups=GROUPS, quick: bool = False, log=print) -> list:
    """Every row of the chosen groups, in order. `log` gets one progress line per step."""
    rows = []
    for name in groups:
        t0 = time.perf_counter()
        log(f"{name} ...")
        rows += _group(name)(quick=quick, log=log)
        log(f"{name}: {time.perf_counter() - t0:.1f} s")
    return rows

"""The modeled NPU (datacenter preset, timing model only: deterministic, so any change is a real
change): programs the compiler emits against the bounds the machine sets. The decode step is also
shown with the core's share of the chip's HBM bandwidth, where HBM bounds it
(docs/npu-performance.md explains both).

ratio = bound / modeled cycles, the fraction of the bound reached (1.0 is the bound itself).
docs/npu-performance.md explains each bound.
"""

from __future__ import annotations

from dataclasses import replace

from isthmus.bench.measure import Row
from isthmus.npu.config import load_config

CORE_SHARE_BYTES_PER_S = 2.9e12 / 8      # examples/npu/datacenter-core-share.json


def npu(quick: bool = False, log=print) -> list[Row]:
    from isthmus.compiler.lower.npu.profile_tables import decode_figures, matmul_figures

    log("  matmul 1024x4096x4096 bf16")
    mm = matmul_figures(1024, 4096, 4096, "bf16", "datacenter")
    rows = [Row("npu", "matmul bf16", "1024x4096x4096", "npu", mm["cycles"], "tensor-engine peak (FLOPs)",
                mm["ideal_cycles"], "cycles")]
    from isthmus.models import DEFAULT_MODEL, REGISTRY, cache_path, is_pulled

    precisions = ("bf16",) if quick else ("bf16", "bf16x3")
    if not is_pulled():
        return rows + [Row("npu", f"decode step {p}", DEFAULT_MODEL, "npu", None, "HBM bound", None, "cycles",
                           note=f"{DEFAULT_MODEL} not pulled: run `isthmus pull`") for p in precisions]
    from isthmus.compiler.frontends import load_model
    from isthmus.compiler.lower.npu.target import lower_npu
    from isthmus.compiler.passes.pipeline import run_pipeline

    model = load_model(cache_path(REGISTRY[DEFAULT_MODEL]))
    graph = run_pipeline(model.graph)
    for p in precisions:
        log(f"  decode step {p}")
        f = decode_figures(lower_npu(graph, model=model, precision=p), window=64)
        case, shape = f"decode step {p}", "SmolLM2, window 64"
        rows.append(Row("npu", case, shape, "npu", f["cycles"], "HBM bound (weight bytes / bandwidth)",
                        f["hbm_bound_cycles"], "cycles"))
        rows.append(Row("npu", case, shape, "npu", f["cycles"], "tensor-engine bound (its matmuls)",
                        f["tensor_bound_cycles"], "cycles"))
        # where HBM, not the PE array, bounds a matvec: the core's share of the chip's bandwidth
        f = decode_figures(lower_npu(graph, model=model, config=replace(load_config(), name="core share",
                                                                        hbm_bytes_per_s=CORE_SHARE_BYTES_PER_S),
                                     precision=p), window=64)
        rows.append(Row("npu", case, "SmolLM2, window 64, HBM 362.5 GB/s", "npu", f["cycles"],
                        "HBM bound (weight bytes / bandwidth)", f["hbm_bound_cycles"], "cycles"))
    return rows

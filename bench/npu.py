"""The modeled NPU (timing model only: deterministic, so any change is a real change): programs the
compiler emits against their roofline, max(tensor-engine bound, vector/act bound, compulsory HBM
traffic / bandwidth); the peer column names the bound that binds. Presets: `core` (one Trainium2
NeuronCore with its 1/8 share of the chip's HBM bandwidth), `edge`, and `chip` (eight cores, the
decode step tensor-parallel, against the chip's HBM bound); docs/npu-performance.md explains each
bound and the legacy `datacenter` preset.

ratio = roofline / modeled cycles, the fraction of the roofline reached (1.0 is the roofline itself).
"""

from __future__ import annotations

from isthmus.bench.measure import Row


def _row(case: str, shape: str, cycles: int, roof) -> Row:
    return Row("npu", case, shape, "npu", cycles, f"roofline ({roof.binding} binds)", roof.cycles, "cycles")


def npu(quick: bool = False, log=print) -> list[Row]:
    from isthmus.compiler.lower.npu.profile_tables import decode_figures, matmul_figures
    from isthmus.npu.config import load_config
    from isthmus.npu.programs import tiled_matmul
    from isthmus.npu.timing import roofline, schedule

    log("  matmul 512^3 bf16 (the tiled example program)")
    cfg = load_config("core")
    prog = tiled_matmul(cfg)
    rows = [_row("matmul bf16, core", "512x512x512", schedule(prog, cfg).cycles, roofline(prog, cfg))]
    log("  matmul 1024x4096x4096 bf16")
    mm = matmul_figures(1024, 4096, 4096, "bf16", "core")
    rows.append(_row("matmul bf16, core", "1024x4096x4096", mm["cycles"], mm["roofline"]))
    rows.append(Row("npu", "matmul bf16", "1024x4096x4096, core", "npu", mm["cycles"],
                    "tensor-engine peak (FLOPs)", mm["ideal_cycles"], "cycles"))
    from isthmus.models import DEFAULT_MODEL, REGISTRY, cache_path, is_pulled

    cases = [("core", "bf16")] if quick else [("core", "bf16"), ("core", "bf16x3"), ("edge", "bf16")]
    quantized = [] if quick else [("int8", "bf16"), ("q4", "bf16")]
    if not is_pulled():
        return rows + [Row("npu", f"decode step {p}, {c}", DEFAULT_MODEL, "npu", None, "roofline", None, "cycles",
                           note=f"{DEFAULT_MODEL} not pulled: run `isthmus pull`") for c, p in cases]
    from isthmus.compiler.frontends import load_model
    from isthmus.compiler.lower.npu.target import lower_npu
    from isthmus.compiler.passes.pipeline import run_pipeline

    model = load_model(cache_path(REGISTRY[DEFAULT_MODEL]))
    graph = run_pipeline(model.graph)
    for config, p in cases:
        log(f"  decode step {p} on {config}")
        exe = lower_npu(graph, model=model, config=config, precision=p)
        if exe.spec is None:        # a model the decoder lowering does not take
            rows.append(Row("npu", f"decode step {p}, {config}", "SmolLM2, window 64", "npu", None, "roofline",
                            None, "cycles", note=f"not lowered: head_dim exceeds {config}'s partitions"))
            continue
        f = decode_figures(exe, window=64)
        rows.append(_row(f"decode step {p}, {config}", "SmolLM2, window 64", f["cycles"], f["roofline"]))
    if not quick:
        from isthmus.compiler.lower.npu.profile_tables import batch_figures
        log("  decode batch 16 on core")
        exe = lower_npu(graph, model=model, precision="bf16")
        one, b16 = batch_figures(exe, 1, 64), batch_figures(exe, 16, 64)
        rows.append(_row("decode batch 16 bf16, core", "SmolLM2, window 64", b16["cycles"], b16["roofline"]))
        rows.append(Row("npu", "decode batch 16 bf16, core", "SmolLM2, window 64", "npu", b16["tokens_per_s"],
                        "8x batch 1's tokens/s (target)", 8 * one["tokens_per_s"], "tok/s", higher_is_better=True))
        from isthmus.compiler.lower.npu.llama_matcher import match_llama
        from isthmus.compiler.lower.npu.tp_decoder import tp_decode_figures
        log("  decode step bf16 on chip (8 cores, tensor parallel)")
        f = tp_decode_figures(match_llama(graph), 64, "bf16", 4096)
        rows.append(Row("npu", "decode step bf16, chip (8 cores)", "SmolLM2, window 64", "npu", f["cycles"],
                        "the chip's HBM bound (weights once at 8 cores' bandwidth)", f["hbm_bound_cycles"], "cycles",
                        note=f"{f['speedup']:.2f}x one core's {f['one_core_cycles']:,} cycles; the all-reduces "
                             "over the core-to-core link included; issue 19's target: <= 1.5x the bound"))
    for w, p in quantized:          # weights stored quantized in HBM, dequantized on chip
        log(f"  decode step {w} weights on core")
        f = decode_figures(lower_npu(graph, model=model, precision=p, weights=w), window=64)
        rows.append(_row(f"decode step {w} weights, core", f"SmolLM2, window 64, HBM {f['roofline'].hbm_bytes / 1e6:.0f} MB",
                         f["cycles"], f["roofline"]))
    return rows

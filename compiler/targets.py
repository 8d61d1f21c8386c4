"""The target registry: each target's name, its pass pipeline and the function that lowers the
optimised graph for it; the default target of this machine; and `compile_model` (pipeline, then
lowering)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from isthmus.compiler.executable import Executable
from isthmus.compiler.ir import Graph
from isthmus.compiler.passes.pipeline import FUSED_PIPELINE, PIPELINE
from isthmus.errors import InputError, UnsupportedError


@dataclass(frozen=True)
class Target:
    name: str
    pipeline: list          # [(pass name, pass)], run in order before lowering
    lower: Callable         # lower(graph, model=...) -> Executable; imports its backend when called


# Each lowering imports its backend (numba, torch + triton) inside the call, so naming a target
# costs nothing until it is used.
def _reference(graph, model=None):
    return Executable(graph, "reference", model=model)


def _numba(graph, model=None):
    from isthmus.compiler.lower.numba import lower_numba
    return lower_numba(graph, model=model)


def _triton(graph, model=None):
    from isthmus.compiler.lower.triton import lower_triton
    return lower_triton(graph, model=model)


def _npu(graph, model=None, **options):
    from isthmus.compiler.lower.npu.target import lower_npu
    return lower_npu(graph, model=model, **options)


REGISTRY: dict[str, Target] = {t.name: t for t in (
    Target("reference", PIPELINE, _reference),
    Target("numba", FUSED_PIPELINE, _numba),
    Target("triton", FUSED_PIPELINE, _triton),
    Target("npu", PIPELINE, _npu),
)}
TARGETS = tuple(REGISTRY)


def default_target() -> str:
    """What `isthmus chat` and `isthmus.compile` use when no target is named: triton with a CUDA
    GPU and triton installed, else numba when it imports, else the numpy reference.
    `ISTHMUS_TARGET` overrides."""
    import importlib.util
    import os

    forced = os.environ.get("ISTHMUS_TARGET")
    if forced:
        return forced
    if importlib.util.find_spec("triton") is not None and _cuda_available():
        return "triton"
    if importlib.util.find_spec("numba") is not None:
        return "numba"
    return "reference"


def _cuda_available() -> bool:
    import importlib.util
    import sys

    if importlib.util.find_spec("torch") is None:
        return False
    if "torch" not in sys.modules and not _has_nvidia_device():
        return False       # don't pay torch's import on a machine without an NVIDIA device
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _has_nvidia_device() -> bool:
    import os
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


BATCH_INVARIANT_TARGETS = ("reference", "numba")


def compile_model(model, target: str | None = None, *, passes=None, dump_dir=None, on_pass=None,
                  batch_invariant: bool = False, **options) -> Executable:
    """Run the target's pass pipeline (or `passes`) over a Model (or bare Graph) and lower it. `options` go
    to the lowering (the npu target's: config, precision, weights, max_context, ...). `batch_invariant`:
    each token computed as it would be alone (`Executable.batch_invariant`; the CPU targets)."""
    from isthmus.compiler.passes.pipeline import run_pipeline

    name = target or default_target()
    if name not in REGISTRY:
        raise InputError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    target = REGISTRY[name]
    if options and name != "npu":
        raise InputError(f"target {name!r} takes no options ({', '.join(sorted(options))})")
    if batch_invariant and name not in BATCH_INVARIANT_TARGETS:
        raise UnsupportedError(f"batch-invariant execution is built for the {' and '.join(BATCH_INVARIANT_TARGETS)} "
                               f"targets, not {name!r}")
    graph = model if isinstance(model, Graph) else model.graph
    meta = None if isinstance(model, Graph) else model
    t0 = time.perf_counter()
    graph = run_pipeline(graph, passes=target.pipeline if passes is None else passes, dump_dir=dump_dir,
                         on_pass=on_pass)
    try:
        exe = target.lower(graph, model=meta, **options)
    except ImportError as e:
        raise UnsupportedError(f"target {name!r} is not available here ({e}); use --target reference") from None
    exe.compile_seconds = time.perf_counter() - t0
    exe.batch_invariant = bool(batch_invariant)
    return exe

"""The target registry: each target's name and the function that lowers an optimised graph for it,
the default target of this machine, and `compile_model` (pass pipeline, then lowering)."""

from __future__ import annotations

import time

from isthmus.compiler.executable import Executable
from isthmus.compiler.ir import Graph
from isthmus.errors import InputError, UnsupportedError

TARGETS = ("reference", "numba", "triton", "npu")


# Each non-reference target lowers the optimised graph in its own module: "module:function".
LOWERINGS = {
    "numba": "isthmus.compiler.lower.numba:lower_numba",
    "triton": "isthmus.compiler.lower.triton:lower_triton",
    "npu": "isthmus.compiler.lower.npu.target:lower_npu",
}


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


def compile_model(model, target: str | None = None, *, passes=None, dump_dir=None, on_pass=None) -> Executable:
    """Run the pass pipeline over a Model (or bare Graph) and lower it for `target`."""
    import importlib

    from isthmus.compiler.passes.pipeline import run_pipeline

    target = target or default_target()
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    graph = model if isinstance(model, Graph) else model.graph
    meta = None if isinstance(model, Graph) else model
    t0 = time.perf_counter()
    graph = run_pipeline(graph, passes=passes, dump_dir=dump_dir, on_pass=on_pass)
    if target == "reference":
        exe = Executable(graph, target, model=meta)
    else:
        module, fn = LOWERINGS[target].split(":")
        try:
            lower = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise UnsupportedError(f"target {target!r} is not available here ({e}); use --target reference") from None
        exe = lower(graph, model=meta)
    exe.compile_seconds = time.perf_counter() - t0
    return exe

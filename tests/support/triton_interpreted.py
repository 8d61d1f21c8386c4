"""Importing triton in its interpreter (TRITON_INTERPRET=1, CPU tensors), for tests/kernels/test_triton_*.py."""

from __future__ import annotations

import importlib
import os

import pytest

TRITON_IMPORTED_BEFORE = ("triton was imported without TRITON_INTERPRET=1 earlier in this process; run "
                          "tests/kernels/test_triton_*.py in a process of their own")


def import_interpreted(*modules: str) -> list:
    """Import triton with TRITON_INTERPRET=1 set (triton.jit reads it when it decorates), then each of
    `modules`, returned in order; the variable is as it was afterwards. Skips the calling test module
    when torch or triton is missing, or when triton was imported earlier without the interpreter."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("torch")
        triton = pytest.importorskip("triton")
        if type(triton.language.sum).__name__ != "InterpretedFunction":
            pytest.skip(TRITON_IMPORTED_BEFORE, allow_module_level=True)
        return [importlib.import_module(m) for m in modules]
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved

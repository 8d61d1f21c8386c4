"""Output comparison for `isthmus run --check`, in the manner of polygraphy's comparator."""

from __future__ import annotations

import numpy as np

from isthmus.errors import InputError, UnsupportedError


def compare(actual: dict, expected: dict, tolerance: float, label: str = "expected", out=print) -> bool:
    """Print max abs / rel error per output; pass where |a - e| <= tol * (1 + |e|) everywhere."""
    ok = True
    out(f"{'output':<24}{'max abs err':>14}{'max rel err':>14}  vs {label}")
    for name, e in expected.items():
        if name not in actual:
            out(f"{name:<24}{'missing':>14}")
            ok = False
            continue
        a, e = np.asarray(actual[name]), np.asarray(e)
        if a.shape != e.shape:
            out(f"{name:<24}shape {a.shape} vs {e.shape}")
            ok = False
            continue
        if a.dtype.kind == "b" or e.dtype.kind == "b":
            a, e = a.astype(np.int8), e.astype(np.int8)
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        diff = np.abs(a64 - e64)
        both_nan = np.isnan(a64) & np.isnan(e64)
        diff = np.where(both_nan, 0.0, diff)
        abs_err = float(np.nanmax(diff, initial=0.0)) if not np.isnan(diff).any() else float("nan")
        rel_err = float(np.max(diff / np.maximum(np.abs(e64), 1e-12), initial=0.0))
        passed = bool(np.all(diff <= tolerance * (1.0 + np.abs(e64))))
        ok &= passed
        out(f"{name:<24}{abs_err:>14.3e}{rel_err:>14.3e}  {'PASS' if passed else 'FAIL'}")
    return ok


def onnxruntime_outputs(path, inputs: dict) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UnsupportedError("--check onnxruntime needs onnxruntime: pip install onnxruntime") from None
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, inputs)))
    except Exception as e:  # onnxruntime raises its own hierarchy for bad feeds
        raise InputError(f"onnxruntime could not run {path}: {str(e).splitlines()[0]}") from None

"""llama.cpp's own quantizer (ggml_quantize_chunk from the libggml-base that llama-cpp-python
ships), called through ctypes: realistic blocks of any ggml type for tests and benchmarks, made
by code that shares nothing with isthmus. `quantize` returns None where llama-cpp-python is
not installed."""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np


@functools.cache
def _ggml():
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    return f


def available() -> bool:
    return _ggml() is not None


def quantize(x: np.ndarray, type_id: int) -> np.ndarray | None:
    """Rows of `x` (2-D f32) quantized by llama.cpp to ggml type `type_id`: uint8 [rows, bytes per row]."""
    f = _ggml()
    if f is None:
        return None
    x = np.ascontiguousarray(x, np.float32)
    rows, cols = x.shape
    dst = np.zeros(rows * cols * 4 + 1024, np.uint8)
    n = f(int(type_id), x.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    return dst[:n].reshape(rows, -1).copy()

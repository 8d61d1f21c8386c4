"""One OpenBLAS on one thread for the length of a call, where running its own thread pool would
fight ours: Numba's parallel kernels call scipy's BLAS from their work items
(kernels/numba/threads.py), and the NPU simulator calls numpy's on small tiles (npu/sim.py).

numpy's and scipy's wheels each carry an OpenBLAS: numpy's is ILP64, its names ending in 64_;
scipy's (what Numba's np.dot reaches through scipy.linalg.cython_blas) is LP64, unsuffixed. The
library is found by those names in /proc/self/maps; elsewhere (another BLAS, no /proc) this does
nothing. A top-level helper like errors.py, so that kernels/ and npu/ share it without importing
each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib

# which -> (a module that loads that library, the symbol suffixes to try in order)
_LIBRARIES = {"numpy": ("numpy", ("64_", "_64_", "")), "scipy": ("scipy.linalg.cython_blas", ("",))}


@functools.cache
def _threads(which: str):
    """(get_num_threads, set_num_threads) of the OpenBLAS `which` ("numpy" or "scipy") uses, or None."""
    module, suffixes = _LIBRARIES[which]
    try:
        importlib.import_module(module)
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line and ".so" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for suffix in suffixes:
                for prefix in ("scipy_openblas", "openblas"):
                    get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                    set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and set_ is not None:
                        get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                        return get, set_
    except (OSError, ImportError, AttributeError):
        pass
    return None


@contextlib.contextmanager
def single_threaded(which: str):
    """Run `which`'s OpenBLAS on the calling thread only; the previous thread count comes back after."""
    lib = _threads(which)
    before = lib[0]() if lib else 1
    if before != 1:
        lib[1](1)
    try:
        yield
    finally:
        if before != 1:
            lib[1](before)

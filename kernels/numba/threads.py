"""The thread pools behind the numba target, chosen here so that no environment variable is
needed for the best speed (docs/performance.md, "Threads", has the measurements).

* One pool does all the work: Numba's (OpenMP where libgomp exists, else its workqueue, whose
  launches measured 1.2-2.8x slower here; TBB last, as it is rarely installed and was not
  measured). Prefill matmuls run BLAS inside that pool's work items, one single-threaded BLAS call
  per item (`serial_blas`), instead of BLAS's own pool: two pools on the same cores took turns
  spinning and sleeping, which made a 38-token prefill 3.2x slower on a 2-core host.
* Its workers spin briefly after each parallel launch (libgomp's default policy), so the ~120
  launches of a decode step do not each pay a wake-up.

A user who sets NUMBA_THREADING_LAYER, NUMBA_NUM_THREADS or OMP_WAIT_POLICY keeps their setting.
"""

from __future__ import annotations

import contextlib
import ctypes

import numba

LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def configure() -> None:
    """Pick the threading layer; must run before the first parallel launch (kernels/numba/__init__)."""
    numba.config.THREADING_LAYER_PRIORITY = LAYER_PRIORITY


_SCIPY_BLAS: list = []


def _scipy_openblas():
    """(get_num_threads, set_num_threads) of the OpenBLAS that scipy's cython_blas (what Numba's
    np.dot calls) is linked to, or None (another BLAS, or no /proc to find it by). scipy's is the
    LP64 one, with unsuffixed names; numpy's wheels carry an ILP64 one whose names end in 64_."""
    if _SCIPY_BLAS:
        return _SCIPY_BLAS[0]
    _SCIPY_BLAS.append(None)
    try:
        import scipy.linalg.cython_blas  # noqa: F401 - loads the library we look for

        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line and ".so" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for prefix in ("scipy_openblas", "openblas"):
                get = getattr(lib, f"{prefix}_get_num_threads", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads", None)
                if get is not None and set_ is not None:
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    _SCIPY_BLAS[0] = (get, set_)
                    return _SCIPY_BLAS[0]
    except (OSError, ImportError, AttributeError):
        pass
    return None


@contextlib.contextmanager
def serial_blas():
    """BLAS calls made inside Numba's parallel kernels run on the calling worker only."""
    lib = _scipy_openblas()
    before = lib[0]() if lib else 1
    if before != 1:
        lib[1](1)
    try:
        yield
    finally:
        if before != 1:
            lib[1](before)

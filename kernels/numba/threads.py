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

import numba

from isthmus.openblas import single_threaded

LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def configure() -> None:
    """Pick the threading layer; must run before the first parallel launch (kernels/numba/__init__)."""
    numba.config.THREADING_LAYER_PRIORITY = LAYER_PRIORITY


def serial_blas():
    """BLAS calls made inside Numba's parallel kernels run on the calling worker only."""
    return single_threaded("scipy")

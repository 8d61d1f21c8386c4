"""CPU kernels compiled with Numba: one file per op family, each holding its kernels and the
shape rules that pick one (`linear.py` chooses matvec or dequantize+BLAS by the number of rows).

Every kernel is `@njit(cache=True)`: the first start compiles (one to two minutes for the whole
set on 2 cores) and writes machine code to `__pycache__`; later starts load it in about a second
(`lower_numba` does that up front, so it counts as load time, not as the first prompt's).
Numba's cache tracks each kernel's own file only: after editing simd.py (whose helpers are
inlined into the other files' kernels) delete kernels/numba/__pycache__.

Threading (threads.py chooses; docs/performance.md measures):
  * Kernels parallelise with `prange`; each prange is one parallel launch, so the fused kernels
    keep to one launch each and a decode step of the default model makes ~151 (5 per layer:
    QKV, attention, attention output, gate/up, down; attention is one kernel batched or not,
    so that a sequence's numbers do not depend on its batch).
  * One pool, Numba's: prefill matmuls call BLAS single-threaded inside its work items.
"""

# Fast-math flags for the kernels: reassociation lets LLVM vectorise reductions; no `nnan`/`ninf`,
# because masked scores and fully masked rows carry -inf and must stay exact.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)
PJIT = dict(JIT, parallel=True)


from isthmus.kernels.numba.threads import configure as _configure_threads  # noqa: E402

_configure_threads()

"""pytest-benchmark micro-benchmarks of the Numba kernels and their numpy references
(run: pytest benchmarks/test_bench_numba.py --benchmark-only): statistics while working on one
kernel, both sides in pytest's process. The peer comparison, numba and numpy each in its own
process taking turns, is `isthmus bench --only kernels` (or `python benchmarks/bench_ops_numba.py`,
with the issue's targets); both time the same cases."""

import pytest

pytest.importorskip("numba")

from isthmus.bench.ops import kernel_cases  # noqa: E402

CASES = list(kernel_cases(quick=True))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_op(benchmark, case, impl):
    name, shape, build = case
    benchmark.group = f"{name} {'x'.join(map(str, shape))}"
    benchmark(build[impl]())

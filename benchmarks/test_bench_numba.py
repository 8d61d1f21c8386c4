"""pytest-benchmark micro-benchmarks of the Numba kernels against numpy, side by side
(run: pytest benchmarks/test_bench_numba.py --benchmark-only). The ratio table with the
issue's targets is `python benchmarks/bench_ops_numba.py`; `isthmus bench --only kernels` times the same cases."""

import pytest

pytest.importorskip("numba")

from isthmus.bench.ops import kernel_cases  # noqa: E402

CASES = list(kernel_cases(quick=True))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_op(benchmark, case, impl):
    name, shape, mine, theirs = case
    benchmark.group = f"{name} {'x'.join(map(str, shape))}"
    benchmark(mine if impl == "numba" else theirs)

"""pytest-benchmark micro-benchmarks of the Numba kernels against numpy, side by side
(run: pytest benchmarks/test_bench_numba.py --benchmark-only). The ratio table with the
issue's targets is `python benchmarks/bench_ops_numba.py`."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("numba")

_spec = importlib.util.spec_from_file_location("bench_ops_numba", Path(__file__).with_name("bench_ops_numba.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
CASES = list(_mod.cases(quick=True))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_op(benchmark, case, impl):
    name, shape, mine, theirs = case
    benchmark.group = f"{name} {'x'.join(map(str, shape))}"
    benchmark(mine if impl == "numba" else theirs)

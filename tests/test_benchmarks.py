"""The asv suite (benchmarks/asv_suite, asv.conf.json) keeps working: `asv check` passes, and every
benchmark runs once as `asv run --quick` runs it (asv_runner's own discovery and benchmark objects,
here in one process): setup, one call with its first parameter set, teardown. A setup that raises
NotImplementedError is asv's n/a (no llama.cpp, say) and is counted, not failed; the modules that
need the default model pull it, as the other `slow` tests do."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "asv_suite"
NEEDS_MODEL = {"bench_model"}
QUICK = {"number": 1, "repeat": 1, "warmup_time": 0, "rounds": 1}     # what `asv run --quick` sets


def test_asv_check():
    pytest.importorskip("asv")
    r = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out


@pytest.fixture
def discovery():
    """asv_runner's discovery; it adds an importer for the suite to sys.meta_path, removed afterwards."""
    discovery = pytest.importorskip("asv_runner.discovery")
    saved = list(sys.meta_path)
    yield discovery
    sys.meta_path[:] = saved


@pytest.mark.parametrize("module", [pytest.param(p.stem, marks=[pytest.mark.slow] if p.stem in NEEDS_MODEL else [])
                                    for p in sorted(SUITE.glob("bench_*.py"))])
def test_every_benchmark_runs_once(module, discovery, capsys, request):
    from asv_runner._aux import update_sys_path

    if module in NEEDS_MODEL:
        request.getfixturevalue("default_model_path")       # pulled, as for the other slow tests
    update_sys_path(str(SUITE))
    found = [b for b in discovery.disc_benchmarks(str(SUITE)) if b.name.startswith(module + ".")]
    assert found, f"no benchmarks in {module}"
    skipped, caches = [], {}
    for b in found:
        b = discovery.get_benchmark_from_name(str(SUITE), b.name + ("-0" if b.params else ""), extra_params=QUICK)
        if b.setup_cache_key is not None:         # once per key, as asv does
            if b.setup_cache_key not in caches:
                caches[b.setup_cache_key] = b.do_setup_cache()
            b.set_cache(caches[b.setup_cache_key])
        if b.do_setup():
            skipped.append(b.name)
            continue
        try:
            result = b.do_run()
        finally:
            b.do_teardown()
        value = result["samples"][0] if isinstance(result, dict) else result
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (b.name, result)
    if len(skipped) == len(found):
        pytest.skip(f"every benchmark of {module} is n/a here: {capsys.readouterr().out.strip()}")

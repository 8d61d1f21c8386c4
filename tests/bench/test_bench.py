"""`isthmus bench`: every comparison it prints is made, checked and written; figures themselves are
timings and are not asserted (docs/performance.md quotes them)."""

import json
import os
import sys

import pytest

from isthmus.bench import run
from isthmus.bench.isolated import Worker, WorkerError, interleave
from isthmus.bench.measure import Row
from isthmus.bench.report import markdown, table
from isthmus.cli import main


def test_ratio_is_isthmus_over_peer_in_the_better_direction():
    assert Row("g", "c", "s", "e", 2.0, "p", 8.0, "us").ratio == 4.0                # 4x less time
    assert Row("g", "c", "s", "e", 30.0, "p", 10.0, "tok/s", True).ratio == 3.0     # 3x the throughput
    assert Row("g", "c", "s", "e", 1000, "bound", 900, "cycles").ratio == 0.9       # 90 % of a bound
    assert Row("g", "c", "s", "e", None, "p", 1.0, "us", note="absent").ratio is None
    assert Row("g", "c", "s", "e", 1.0, "p", None, "us").to_dict()["ratio"] is None


def test_onnx_group_agrees_with_onnxruntime_before_timing():
    pytest.importorskip("onnxruntime")
    rows = run(["onnx"], quick=True, log=lambda m: None)
    assert {r.case for r in rows} == {"Softmax", "LayerNormalization", "RMSNormalization", "Gelu", "MatMul"}
    for r in rows:
        assert r.peer == "onnxruntime"
        assert "DIFFER" not in r.note, r
        if not r.note:                      # an onnxruntime too old for an opset says so in the note
            assert r.value > 0 and r.peer_value > 0 and r.ratio == pytest.approx(r.peer_value / r.value)


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "--quick", "--only", "tee", "--only", "npu", "--json", str(out_json),
                 "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out_json.read_text())
    assert doc["command"] == "isthmus bench --quick --only tee --only npu" and doc["quick"] is True
    assert doc["machine"]["cores"] >= 1
    groups = {r["group"] for r in doc["rows"]}
    assert groups == {"tee", "npu"}
    for r in doc["rows"]:
        assert r["peer"] in printed and r["case"] in printed       # every peer side by side
        if r["value"] and r["peer_value"]:
            assert f"{r['ratio']:.2f}x" in printed
    mm = next(r for r in doc["rows"] if r["case"] == "matmul bf16")
    assert mm["peer_value"] == 2 * 1024 * 4096 * 4096 / (2 * 128 * 128)      # the FLOP-peak bound, in cycles
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_has_a_line_per_comparison():
    rows = [Row("kernels", "rmsnorm", "1x576", "numba", 5.0, "numpy reference", 25.0, "us"),
            Row("model", "decode", "64 tokens", "numba", None, "llama.cpp", None, "tok/s", True, note="not installed")]
    md = markdown(rows).splitlines()
    assert len(md) == 2 + len(rows)
    assert "**5.00x**" in md[2] and "not installed" in md[3] and md[3].endswith("| - |")
    assert "5.00x" in table(rows)


@pytest.mark.parametrize("argv, needle", [(["bench", "--only", "gpu"], "unknown bench group(s) gpu"),
                                          (["bench", "--quick", "--fast"], "--fast")])
def test_bad_arguments_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    assert main(["bench", "--only", "tee", "--plot", "x.png"]) == 2
    captured = capsys.readouterr()
    assert "isthmus[plot]" in captured.err and captured.out == ""


def test_without_the_default_model_the_rows_say_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path))           # an empty model cache
    rows = run(["model"], quick=True, log=lambda m: None)
    assert [(r.case, r.shape) for r in rows] == [("prefill", "38-token prompt"), ("prefill", "271-token prompt"),
                                                 ("decode", "64 tokens")]
    assert all(r.value is None and r.ratio is None and "isthmus pull" in r.note for r in rows)
    assert "isthmus pull" in table(rows)


def test_without_llama_cpp_the_quant_rows_say_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import llama_cpp -> ImportError
    rows = run(["quant"], quick=True, log=lambda m: None)
    assert [(r.case, r.shape) for r in rows] == [("decode Q4_K_M", "synthetic Llama"),
                                                 ("decode Q4_K_M", "smollm2-135m-instruct")]
    assert all(r.value is None and "peers" in r.note for r in rows)


@pytest.mark.slow
def test_quant_group_races_llama_cpp_on_files_of_each_type(monkeypatch, tmp_path, default_model_path):
    pytest.importorskip("llama_cpp")
    from isthmus.bench.quant import quantized_file, tensor_types

    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    os.symlink(default_model_path, tmp_path / "models" / os.path.basename(default_model_path))   # as pulled
    synthetic = quantized_file("synthetic Llama", "Q6_K", log=lambda m: None)
    assert set(tensor_types(synthetic)) == {"Q6_K", "F32"}            # widths of 256: stored as the type asked
    rows = run(["quant"], quick=True, log=lambda m: None)
    assert [(r.case, r.shape) for r in rows] == [
        ("decode Q4_K_M", "synthetic Llama"), ("prefill Q4_K_M", "synthetic Llama"),
        ("decode Q4_K_M", "smollm2-135m-instruct"), ("prefill Q4_K_M", "smollm2-135m-instruct")]
    for r in rows:
        assert r.value > 0 and r.peer_value > 0 and "q4_k x" in r.note and "q6_k x" in r.note


def test_each_engine_runs_in_a_process_of_its_own_with_its_own_environment(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")        # what a shell or CI may have set for isthmus
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    monkeypatch.setenv("ISTHMUS_BENCH_PROBE", "parent")
    with Worker("builtins:dict", env={"ISTHMUS_BENCH_PROBE": "a"}) as a, Worker("builtins:dict", x=1) as b:
        ia, ib = a.info(), b.info()
        assert b.call("get", "x") == 1 and a.call("get", "x") is None      # each its own engine
    assert len({os.getpid(), a.pid, b.pid}) == 3 and (ia["pid"], ib["pid"]) == (a.pid, b.pid)
    assert ia["env"]["ISTHMUS_BENCH_PROBE"] == "a" and ib["env"]["ISTHMUS_BENCH_PROBE"] == "parent"
    for env in (ia["env"], ib["env"]):
        assert not [k for k in env if k.startswith(("OMP_", "GOMP_", "KMP_"))]    # the OpenMP runtime's defaults
        assert env["PATH"] == os.environ["PATH"]                                   # the rest passes through
    assert a.proc.poll() is not None and b.proc.poll() is not None                # ended with the block


def test_a_worker_reports_failures_and_a_missing_peer_as_import_error():
    with pytest.raises(ImportError, match="no_such_engine_module"):
        Worker("no_such_engine_module:Engine")
    with Worker("builtins:dict") as w:
        with pytest.raises(WorkerError, match="KeyError"):
            w.call("pop", "absent")
        assert w.call("setdefault", "k", 2) == 2                # the worker goes on after a failure


def test_a_numpy_worker_never_loads_numba():
    with Worker("isthmus.bench.ops:KernelSide", "numpy", True) as w:
        cases = w.call("cases")
        assert "numba" not in w.info()["modules"]
    assert ("matvec q8_0", (49152, 576)) in cases


def test_engines_take_turns_one_at_a_time():
    order = []
    got = interleave({"A": "a", "B": "b"}, lambda name, w: order.append(name) or w + str(len(order)), rounds=3,
                     pause=0)
    assert order == ["A", "B", "B", "A", "A", "B"]
    assert got == {"A": ["a1", "a4", "a5"], "B": ["b2", "b3", "b6"]}


@pytest.mark.slow
def test_model_group_measures_both_engines_on_the_same_tokens(default_model_path):
    rows = run(["model"], quick=True, log=lambda m: None)
    assert [r.case for r in rows] == ["prefill", "prefill", "decode"]
    for r in rows:
        assert r.value > 0 and r.unit == "tok/s"
        if not r.note:                                # llama-cpp-python installed
            assert r.peer_value > 0 and r.ratio == pytest.approx(r.value / r.peer_value)


@pytest.mark.slow
def test_isthmus_and_llama_cpp_continue_the_same_tokens_alike(default_model_path):
    """The two engines the model group races do the same work: same token ids in, same greedy
    tokens out (llama.cpp's logits read from its context, not the stale `Llama.scores`)."""
    pytest.importorskip("llama_cpp")
    with Worker("isthmus.bench.model:IsthmusEngine", str(default_model_path)) as ours, \
            Worker("isthmus.bench.model:LlamaCppEngine", str(default_model_path)) as llama:
        chat, ids = ours.call("chat"), ours.call("ids", 38)
        assert len(ids) == 38
        for prompt in (chat, ids):
            assert ours.call("greedy", prompt, 8) == llama.call("greedy", prompt, 8)

"""The `isthmus` command end to end, as a user runs it: real processes, real files."""

import subprocess
import sys

import numpy as np
import pytest


def isthmus(*args, cwd=None, timeout=300):
    r = subprocess.run([sys.executable, "-m", "isthmus.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_lists_the_commands():
    rc, out, _ = isthmus("--help")
    assert rc == 0
    for cmd in ("pull", "info", "compile", "run", "chat"):
        assert cmd in out


def test_bad_flag_is_one_line(tmp_path):
    rc, _, err = isthmus("chat", "hi", "--max-tokens", "lots", cwd=tmp_path)
    assert_one_line_error(rc, err, "--max-tokens")


def test_missing_model_file(tmp_path):
    rc, _, err = isthmus("info", tmp_path / "nope.gguf")
    assert_one_line_error(rc, err, "nope.gguf")


def test_random_bytes_model(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    rc, _, err = isthmus("chat", "hi", "--model", bad)
    assert_one_line_error(rc, err, "random.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])
def test_truncated_gguf(tmp_path, default_model_path, keep):
    data = default_model_path.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    rc, _, err = isthmus("chat", "hi", "--model", bad)
    assert_one_line_error(rc, err, "truncated.gguf")


@pytest.mark.slow
def test_chat_answers_paris_greedily(default_model_path):
    rc, out, err = isthmus("chat", "What is the capital of France?", "--verbose")
    assert rc == 0, err
    assert "Paris" in out
    for field in ("load duration:", "prompt eval count:", "prompt eval rate:", "eval count:", "eval rate:"):
        assert field in err
    rate = float(err.split("\neval rate:")[1].split()[0])
    assert rate > 0


@pytest.mark.slow
def test_prompt_longer_than_context(default_model_path):
    rc, out, err = isthmus("chat", "word " * 9000)
    assert_one_line_error(rc, err, "context window is 8192")


@pytest.mark.slow
def test_info_reports_the_model(default_model_path):
    rc, out, err = isthmus("info", "smollm2-135m-instruct")
    assert rc == 0, err
    assert "llama" in out and "q4_1" in out and "134.5M" in out
    assert "attention" in out and "30" in out


@pytest.mark.slow
def test_compile_dump_ir_shows_every_pass(default_model_path):
    from isthmus.compiler.passes.pipeline import FUSED_PIPELINE

    rc, out, err = isthmus("compile", default_model_path, "--dump-ir", "--target", "numba")
    assert rc == 0, err
    for name, _ in FUSED_PIPELINE:
        assert f"IR after {name} " in out
    assert "compiled" in err
    # the fusion pass's groups, after the IR it analysed: per layer one norm+QKV+rope+cache kernel,
    # one attention kernel, the output projection with its residual, norm+gate/up+swiglu, down+residual
    fused = out[out.index("IR after fusion "):]
    assert out.count("# group ") == fused.count("# group ") > 0
    assert fused.count("linear epilogue=qkv norm: rmsnorm linear reshape transpose rope linear reshape transpose "
                       "rope linear reshape transpose concat concat") == 30                # SmolLM2-135M's layers
    assert fused.count("linear epilogue=swiglu norm: rmsnorm linear linear swiglu") == 30
    assert fused.count("attention: attention transpose reshape") == 30
    assert "decoder(input_ids=%input_ids, position_ids=%position_ids, logits=%logits)" in fused
    rc, out, err = isthmus("compile", default_model_path, "--dump-ir", "--target", "reference")
    assert rc == 0 and "IR after fusion" not in out and "# group" not in out


@pytest.mark.slow
@pytest.mark.parametrize("target, tolerance", [("reference", "1e-4"), ("numba", "2e-2")])
def test_run_with_reference_check(tmp_path, default_model, default_model_path, target, tolerance):
    feeds = {v.name: np.zeros((1, 3, 0, 64), np.float32) for v in default_model.graph.inputs
             if v.name.startswith("past_")}
    feeds["input_ids"] = np.array([[1, 504, 3458, 282, 4649]], np.int64)
    feeds["position_ids"] = np.arange(5, dtype=np.int64)[None]
    np.savez(tmp_path / "in.npz", **feeds)
    rc, out, err = isthmus("run", default_model_path, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz",
                           "--target", target, "--check", "reference", "--tolerance", tolerance)
    assert rc == 0, out + err
    assert "logits" in out and "PASS" in out and "FAIL" not in out
    with np.load(tmp_path / "out.npz") as z:
        assert z["logits"].shape == (1, 5, 49152)
        assert z["present_key.0"].shape == (1, 3, 5, 64)


@pytest.mark.slow
def test_run_with_bad_inputs_file(tmp_path, default_model_path):
    (tmp_path / "in.npz").write_bytes(b"not a zip")
    rc, _, err = isthmus("run", default_model_path, "--inputs", tmp_path / "in.npz")
    assert_one_line_error(rc, err, "in.npz")


def test_npu_options_reach_the_npu_lowering_and_nothing_else(tmp_path):
    """--npu-config / --npu-precision / --npu-weights (chat, run, compile, serve): the npu target's
    options from the command line, no environment variable needed; with another target they are
    refused, not ignored."""
    from tiny_models import write_tiny_chat_gguf    # tests/support

    path = write_tiny_chat_gguf(tmp_path / "tiny-chat.gguf")
    rc, out, err = isthmus("compile", str(path), "--target", "npu", "--npu-config", "edge", "--npu-precision", "bf16",
                           "--npu-weights", "int8")
    assert rc == 0, err
    assert "compiled" in out and "npu" in out
    rc, out, err = isthmus("compile", str(path), "--target", "npu", "--npu-config", "chip")   # 4 heads on 8 cores
    assert_one_line_error(rc, err, "does not split over its 8 cores")
    for argv in (["compile", str(path), "--npu-config", "chip"],
                 ["compile", str(path), "--target", "numba", "--npu-weights", "int8"],
                 ["chat", "hi", "--model", str(path), "--npu-precision", "bf16"]):
        rc, out, err = isthmus(*argv)
        assert_one_line_error(rc, err, "applies to --target npu")
    rc, out, err = isthmus("compile", str(path), "--target", "npu", "--npu-config", "no-such-preset")
    assert rc != 0 and "Traceback" not in err and "no-such-preset" in err

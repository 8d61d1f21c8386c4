"""`isthmus npu asm|disasm|run` end to end, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_runner import one_line_error  # tests/support

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "npu"


def isthmus(*args, cwd=None):
    r = subprocess.run([sys.executable, "-m", "isthmus.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return r.returncode, r.stdout, r.stderr



def test_asm_disasm_run_with_trace_and_outputs(tmp_path):
    src = EXAMPLES / "softmax.s"
    rc, out, err = isthmus("npu", "asm", src, "-o", tmp_path / "s.bin")
    assert rc == 0, err
    assert "15 instructions, 5 labels" in out
    rc, text, err = isthmus("npu", "disasm", tmp_path / "s.bin")
    assert rc == 0, err
    assert 'tensor_reduce sbuf.f32[0:128]+0x100{1:1}, sbuf.f32[0:128]{64:1}, op=max @"softmax.max"' in text
    (tmp_path / "s2.s").write_text(text)
    rc, _, err = isthmus("npu", "asm", tmp_path / "s2.s")
    assert rc == 0 and (tmp_path / "s2.bin").read_bytes() == (tmp_path / "s.bin").read_bytes()

    x = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    rc, out, err = isthmus("npu", "run", tmp_path / "s.bin", "--inputs", tmp_path / "in.npz", "-o",
                           tmp_path / "out.npz", "--trace", tmp_path / "t.json")
    assert rc == 0, err
    for needle in ("config core", "cycles", "engine", "busy", "stall", "TFLOP/s", "GB/s", "dma_copy"):
        assert needle in out
    y = np.load(tmp_path / "out.npz")["y"]
    np.testing.assert_allclose(y.sum(axis=1), 1, rtol=1e-5)
    assert "traceEvents" in json.loads((tmp_path / "t.json").read_text())


def _cycles(out: str) -> int:
    return int(out.split(":")[1].split("cycles")[0].replace(",", ""))


def test_run_configs_and_serial_change_the_cycles(tmp_path):
    slow, fast = tmp_path / "slow.json", tmp_path / "fast.json"
    slow.write_text(json.dumps({"clock_hz": 1e9, "dma_latency_cycles": 1000}))
    fast.write_text(json.dumps({"act_fixed_cycles": 1, "vector_fixed_cycles": 1}))
    cycles = set()
    for flags in ((), ("--config", fast), ("--config", slow)):
        rc, out, err = isthmus("npu", "run", EXAMPLES / "softmax.s", *flags)
        assert rc == 0, err
        cycles.add(_cycles(out))
    assert len(cycles) == 3
    rc, out, err = isthmus("npu", "run", EXAMPLES / "matmul_512.s")
    rc2, out2, err2 = isthmus("npu", "run", EXAMPLES / "matmul_512.s", "--serial")
    assert rc == rc2 == 0, err + err2
    assert "FORCE_SERIAL" in out2 and _cycles(out2) > 2 * _cycles(out)


@pytest.mark.parametrize("args,needles", [
    (("npu", "run", "nope.s"), ("nope.s: no such file",)),
    (("npu", "disasm", "bad.bin"), ("bad.bin", "bad magic")),
    (("npu", "asm", "bad.s"), ("bad.s:2:", "unknown instruction 'jump'")),
    (("npu", "run", "ok.s", "--config", "huge"), ("unknown NPU config 'huge'",)),
    (("npu", "run", EXAMPLES / "softmax.s", "--config", "edge"), ("instruction #0", "exceeds the 32 partitions")),
    (("npu", "run", "ok.s", "--config", "cfg.json"), ("unknown NPU config field(s) colour",)),
    (("npu", "run", "dead.s"), ("instruction #0 `sem_wait engine=tensor, sem=1, value=1`", "semaphore deadlock")),
    (("npu", "run", "ok.s", "--inputs", "none.npz"), ("none.npz: no such file",)),
    (("npu", "frob",), ("invalid choice",)),
])
def test_user_errors_are_one_line(tmp_path, args, needles):
    (tmp_path / "bad.bin").write_bytes(b"\x7fELF garbage")
    (tmp_path / "bad.s").write_text("halt\njump 0\n")
    (tmp_path / "ok.s").write_text("halt\n")
    (tmp_path / "dead.s").write_text("sem_wait engine=tensor, sem=1, value=1\n")
    (tmp_path / "cfg.json").write_text('{"colour": 3}')
    one_line_error(*isthmus(*args, cwd=tmp_path)[::2], *needles)

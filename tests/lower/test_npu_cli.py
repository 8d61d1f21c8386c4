"""`isthmus profile MODEL --target npu`: the per-op table and a Perfetto trace naming graph nodes."""

import json

import pytest

import isthmus
from isthmus.cli import main
from tiny_models import tiny_llama_model  # tests/support, on pythonpath


def _tiny_model():
    return tiny_llama_model()


def test_profile_prints_ops_and_writes_a_trace(monkeypatch, tmp_path, capsys):
    model = _tiny_model()
    monkeypatch.setattr(isthmus, "load", lambda name, **kw: model)
    trace = tmp_path / "decode.json"
    assert main(["profile", "tiny", "--target", "npu", "--trace", str(trace), "--prefill"]) == 0
    out = capsys.readouterr().out
    for op in ("linear", "attention", "rmsnorm", "rope", "embedding"):
        assert op in out
    assert "share" in out and "bound" in out and "HBM-bandwidth bound" in out
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["name"].split(":")[0] for e in events if e.get("ph") == "X"}
    assert {"blk.0.q", "blk.1.attn", "logits"} <= names


def test_profile_by_node_and_errors(monkeypatch, capsys):
    model = _tiny_model()
    monkeypatch.setattr(isthmus, "load", lambda name, **kw: model)
    assert main(["profile", "tiny", "--by", "node", "--limit", "0", "--precision", "bf16"]) == 0
    assert "blk.1.down" in capsys.readouterr().out
    assert main(["profile", "tiny", "--target", "numba"]) == 2            # only the NPU has a modeled profile
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_and_chat_on_the_npu(default_model_path, capsys):
    assert main(["compile", str(default_model_path), "--target", "npu"]) == 0
    assert "compiled" in capsys.readouterr().out
    assert main(["chat", "Say hi", "--model", str(default_model_path), "--target", "npu", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()

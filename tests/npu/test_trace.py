"""Chrome/Perfetto traces: valid JSON, one track per engine, slices named by label and instruction."""

import json

import numpy as np

from isthmus.npu import programs, sim, trace
from isthmus.npu.config import load_config


def test_trace_has_one_track_per_engine_and_labelled_slices(tmp_path):
    cfg = load_config("datacenter")
    prog = programs.tiled_matmul(cfg)
    result = sim.run(prog, {"AT": np.zeros((512, 512)), "B": np.zeros((512, 512))})
    path = tmp_path / "t.json"
    trace.write_trace(path, prog, result.timeline, cfg)
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    tracks = {e["args"]["name"]: e["tid"] for e in events if e.get("name") == "thread_name"}
    assert set(tracks) == {e.upper() for e in result.stats.engines}
    assert len(set(tracks.values())) == len(tracks)
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(result.timeline.order)
    names = {e["name"] for e in slices}
    assert "C[3,3]: matmul" in names and "load AT[0,0]: dma_copy" in names
    mm = next(e for e in slices if e["name"] == "C[0,0]: matmul")
    assert mm["tid"] == tracks["TENSOR"] and mm["args"]["text"].startswith("matmul psum.f32")
    assert mm["args"]["flops"] == 2 * 128 * 128 * 128 and mm["args"]["label"] == "C[0,0]"
    for tid in tracks.values():                                   # in-order engines: slices never overlap
        track = sorted((e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid"] == tid)
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(track, track[1:]))
    end = max(e["ts"] + e["dur"] for e in slices)
    assert abs(end - result.stats.seconds * 1e6) < 1e-6

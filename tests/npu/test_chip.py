"""Several cores (npu/chip.py, npu/collectives.py): a ring all-reduce built from dma_core and
sem_signal_core against numpy, the link's cost, cores timed concurrently, errors, per-core traces."""

import json
import math

import numpy as np
import pytest

from isthmus.errors import NpuError
from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.chip import ChipProgram, run_chip, schedule_chip, write_chip_trace
from isthmus.npu.collectives import RECV_SEM, all_reduce_program
from isthmus.npu.config import load_config
from isthmus.npu.timing import schedule

CHIP = load_config("chip")


@pytest.mark.parametrize("cores", [2, 8])
def test_ring_all_reduce_sums_every_cores_block(cores):
    chip = all_reduce_program("chip", cores, 256)
    x = np.random.default_rng(cores).standard_normal((cores * 128, 256)).astype(np.float32)
    r = run_chip(chip, {"x": x})
    want = x.reshape(cores, 128, 256).astype(np.float64).sum(0)
    np.testing.assert_allclose(r.outputs["y"].reshape(cores, 128, 256), np.broadcast_to(want, (cores, 128, 256)),
                               rtol=1e-5, atol=1e-5)
    # 2 (n-1) ring steps, each at least a link transfer of one chunk, the remote signal's latency and
    # (reduce-scatter) an add: the cores run concurrently, so the whole takes about that, not n times it
    chunk = 128 * 256 // cores * 4 // 128                     # bytes per partition of one chunk
    step = CHIP.link_latency_cycles + math.ceil(chunk * 128 / CHIP.link_bytes_per_cycle) + CHIP.link_latency_cycles
    floor = 2 * (cores - 1) * step
    assert floor < r.cycles < 1.4 * floor + 3000, (r.cycles, floor)
    assert len(r.stats) == cores and all(s.ops["dma_core"].count == 2 * (cores - 1) for s in r.stats)


def test_dma_core_cost_is_the_links():
    b0, b1 = ProgramBuilder(CHIP), ProgramBuilder(CHIP)
    t0, t1 = b0.sbuf(1024, "f32"), b1.sbuf(1024, "f32")
    b0.memset(t0.ap(), value=2.0)
    b0.wait("dma0", b0.signal("vector"))
    b0.dma_core(t1.ap(), t0.ap(), core=1, queue=0)
    b0.sem_signal_core(engine="dma0", core=1, sem=RECV_SEM)
    b1.sem_wait(engine="dma3", sem=RECV_SEM, value=1)
    y = b1.tensor("y", (128, 1024), "f32", "output")
    b0.tensor("y", (128, 1024), "f32", "output")
    b1.dma_copy(y[:, :], t1.ap(), queue=3)
    r = run_chip(ChipProgram([b0.build(), b1.build()]))
    assert (r.outputs["y"] == 2.0).all()
    tl0, tl1 = r.timeline.timelines
    k = next(i for i in tl0.order if b0.build().instructions[i].op == "dma_core")
    assert tl0.end[k] - tl0.start[k] == CHIP.link_latency_cycles + math.ceil(128 * 1024 * 4 / CHIP.link_bytes_per_cycle)
    wait = next(i for i in tl1.order if b1.build().instructions[i].op == "sem_wait")
    assert tl1.start[wait] == tl0.end[k + 1] + CHIP.link_latency_cycles     # the signal after it, plus the hop


def test_chip_errors():
    b0, b1 = ProgramBuilder(CHIP), ProgramBuilder(CHIP)
    b1.sem_wait(engine="vector", sem=RECV_SEM, value=1)
    with pytest.raises(NpuError, match="core 1: instruction #0 .*semaphore deadlock"):
        schedule_chip(ChipProgram([b0.build(), b1.build()]))
    b = ProgramBuilder(CHIP)
    t = b.sbuf(8, "f32")
    b.dma_core(t.ap(), t.ap(), core=1, queue=0)
    with pytest.raises(NpuError, match="a core-to-core instruction: run the chip program"):
        schedule(b.build(), CHIP)
    with pytest.raises(NpuError, match="core 0 is not another core"):
        schedule_chip(ChipProgram([_send_to(0), ProgramBuilder(CHIP).build()]))      # to itself
    with pytest.raises(NpuError, match="for 9 cores on config chip, which has 8"):
        schedule_chip(ChipProgram([ProgramBuilder(CHIP).build() for _ in range(9)]))
    a, c = ProgramBuilder(CHIP), ProgramBuilder(CHIP)
    a.tensor("x", (4, 4), "f32")
    c.tensor("x", (8, 4), "f32")
    with pytest.raises(NpuError, match="tensor x differs between core 0 and core 1"):
        ChipProgram([a.build(), c.build()])


def _send_to(core):
    b = ProgramBuilder(CHIP)
    t = b.sbuf(8, "f32")
    b.dma_core(t.ap(), t.ap(), core=core, queue=0)
    return b.build()


def test_chip_trace_has_a_track_group_per_core(tmp_path):
    chip = all_reduce_program("chip", 8, 256)
    r = run_chip(chip, {"x": np.zeros((8 * 128, 256), np.float32)})
    path = tmp_path / "chip.json"
    write_chip_trace(path, chip, r.timeline, CHIP)
    events = json.loads(path.read_text())["traceEvents"]
    groups = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert groups == {c + 1: f"core {c} (chip)" for c in range(8)}
    for c in range(8):
        names = {e["name"] for e in events if e["ph"] == "X" and e["pid"] == c + 1}
        assert {"dma_core", "sem_signal_core", "tensor_tensor"} <= names and "load: dma_copy" in names

"""Several cores (npu/chip.py, npu/collectives.py): a ring all-reduce built from dma_core (each send
counting its arrival on the receiver's semaphore) against numpy, the link's cost, a remote signal's hop
against a signalling DMA's, cores timed concurrently, errors, per-core traces."""

import json
import math

import numpy as np
import pytest

from isthmus.errors import NpuError
from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.chip import ChipProgram, critical_path, run_chip, schedule_chip, write_chip_trace
from isthmus.npu.collectives import RECV_SEM, all_reduce_program
from isthmus.npu.config import load_config
from isthmus.npu.timing import schedule

CHIP = load_config("chip")


@pytest.mark.parametrize("cores", [2, 8])
def test_ring_all_reduce_sums_every_cores_block(cores):
    chip = all_reduce_program("chip", cores, 256)
    x = np.random.default_rng(cores).standard_normal((cores * 128, 256)).astype(np.float32)
    r = run_chip(chip, {"x": x}, check_races=True)      # (the first adds wait for the load they add into)
    want = x.reshape(cores, 128, 256).astype(np.float64).sum(0)
    np.testing.assert_allclose(r.outputs["y"].reshape(cores, 128, 256), np.broadcast_to(want, (cores, 128, 256)),
                               rtol=1e-5, atol=1e-5)
    # 2 (n-1) ring steps, each at least a link transfer of one chunk (its arrival counted as it lands: one
    # link latency a step, not a second for a separate remote signal) and (reduce-scatter) an add, plus the
    # load and the store: the cores run concurrently, so the whole takes about that, not n times it
    # (2 cores 2,952 cycles, 8 cores 8,986)
    chunk = 128 * 256 // cores * 4 // 128                     # bytes per partition of one chunk
    step = CHIP.link_latency_cycles + math.ceil(chunk * 128 / CHIP.link_bytes_per_cycle)
    floor = 2 * (cores - 1) * step
    load = CHIP.dma_latency_cycles + math.ceil(128 * 256 * 4 / CHIP.hbm_bytes_per_cycle)
    assert floor + 2 * load < r.cycles < floor + 2 * load + 250 * (cores - 1), (r.cycles, floor)
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


def test_transfers_share_only_the_resource_they_use():
    """A transfer shares bandwidth with its core's queues busy over the same resource when it starts: a
    weight load beside a link send takes the core's whole HBM share (the send moves no HBM bytes) and the
    send the whole link; a second HBM load started beside a first shares the HBM share with it."""
    nbytes = 128 * 1024 * 4

    def durations(second):
        b0 = ProgramBuilder(CHIP)
        x = b0.tensor("x", (128, 1024), "f32", "input")
        t0, t1, t2 = (b0.sbuf(1024, "f32") for _ in range(3))
        if second == "send":
            b0.dma_core(t0.ap(), t1.ap(), core=1, queue=0)     # first, at cycle 0: busy when the load starts
        else:
            b0.dma_copy(t0.ap(), x[:, :], queue=0)
        b0.dma_copy(t2.ap(), x[:, :], queue=1)
        tl = schedule_chip(ChipProgram([b0.build(), ProgramBuilder(CHIP).build()])).timelines[0]
        assert tl.start[0] == tl.start[1] == 0
        return tl.end[0] - tl.start[0], tl.end[1] - tl.start[1]

    alone = CHIP.dma_latency_cycles + math.ceil(nbytes / CHIP.hbm_bytes_per_cycle)
    send, load = durations("send")
    assert send == CHIP.link_latency_cycles + math.ceil(nbytes / CHIP.link_bytes_per_cycle)
    assert load == alone                                       # (counted with the send before: 2x its bytes' time)
    first, second = durations("load")
    assert first == alone and second == CHIP.dma_latency_cycles + math.ceil(2 * nbytes / CHIP.hbm_bytes_per_cycle)


def test_signalling_dma_core_counts_its_arrival():
    """`dma_core ... signal=1` adds 1 to the receiver's semaphore when its data has landed (its end): the
    waiter starts one link latency earlier than after a separate `sem_signal_core`, and the race check
    orders the receiver's read after the DMA's write through it (without it, the read races)."""
    from isthmus.npu.chip import LoadedChip

    def pair(signal):
        b0, b1 = ProgramBuilder(CHIP), ProgramBuilder(CHIP)
        t0, t1 = b0.sbuf(1024, "f32"), b1.sbuf(1024, "f32")
        b0.memset(t0.ap(), value=3.0)
        b0.wait("dma0", b0.signal("vector"))
        b0.dma_core(t1.ap(), t0.ap(), core=1, queue=0, signal=signal, sem=RECV_SEM)
        b1.sem_wait(engine="dma3", sem=RECV_SEM, value=1)
        y = b1.tensor("y", (128, 1024), "f32", "output")
        b0.tensor("y", (128, 1024), "f32", "output")
        b1.dma_copy(y[:, :], t1.ap(), queue=3)
        return ChipProgram([b0.build(), b1.build()])

    r = run_chip(pair(1), check_races=True)
    assert (r.outputs["y"] == 3.0).all()
    tl0, tl1 = r.timeline.timelines
    k = next(i for i in tl0.order if pair(1).cores[0].instructions[i].op == "dma_core")
    wait = next(i for i in tl1.order if pair(1).cores[1].instructions[i].op == "sem_wait")
    assert tl1.start[wait] == tl0.end[k]
    with pytest.raises(NpuError, match="semaphore deadlock"):       # signal=0: nothing counts on core 1
        schedule_chip(pair(0))
    unordered = _without(pair(1), 1, lambda ins: ins.op == "sem_wait")       # core 1 reads without waiting
    with pytest.raises(NpuError, match=r"core 0: .*`dma_core.*signal=1.*data race with core 1's .*`dma_copy"):
        LoadedChip(unordered, check_races=True)


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
        assert {"dma_core", "tensor_tensor"} <= names and "load: dma_copy" in names


def _mlp_chip(layers=2):
    from isthmus.compiler.lower.npu.tensor_parallel import tp_mlp_program
    rng = np.random.default_rng(0)
    gate, up = (rng.standard_normal((512, 256)).astype(np.float32) * 0.05 for _ in range(2))
    down = rng.standard_normal((256, 512)).astype(np.float32) * 0.05
    return tp_mlp_program(gate, up, down, np.ones(256, np.float32), 1e-5, 1, "chip", layers=layers)[0]


def _without(chip, core, pick):
    """`chip` with core `core`'s first instruction for which `pick(ins)` holds changed by it (None: removed)."""
    from isthmus.npu.isa import Program
    prog = chip.cores[core]
    i = next(i for i, ins in enumerate(prog.instructions) if pick(ins))
    new = pick(prog.instructions[i])
    ins = prog.instructions[:i] + ([new] if new is not True else []) + prog.instructions[i + 1:]
    cores = list(chip.cores)
    cores[core] = Program(ins, prog.tensors, prog.hbm_bytes)
    return ChipProgram(cores)


def test_race_check_over_the_cores_catches_a_seeded_race():
    """The chip's race check (races.check_chip_races) orders every core's engines together: the one-hop
    all-reduce passes; without core 3's wait for its peers' partials, the reduce that reads its receive
    slots races with their dma_core writes into them; waiting for one arrival too few races with the last."""
    from isthmus.npu.chip import LoadedChip
    from isthmus.npu.isa import Instruction
    from isthmus.compiler.lower.npu.tensor_parallel import RECV_SEMS
    chip = _mlp_chip()
    LoadedChip(chip, check_races=True)
    recv = lambda ins: ins.op == "sem_wait" and ins["sem"] == RECV_SEMS[0]       # noqa: E731
    dropped = _without(chip, 3, lambda ins: recv(ins) or None)
    with pytest.raises(NpuError, match=r"core 3: instruction #\d+ `tensor_reduce.*data race with core \d's "
                                       r"instruction #\d+ `dma_core.*core=3"):
        LoadedChip(dropped, check_races=True)
    LoadedChip(dropped)                              # the timing happens to serialise them: only the check sees it
    short = _without(chip, 3, lambda ins: recv(ins) and Instruction(
        "sem_wait", dict(ins.args, value=ins["value"] - 1), ins.label))
    with pytest.raises(NpuError, match="core 3: .*data race with core .*dma_core"):
        LoadedChip(short, check_races=True)


def test_critical_path_walks_back_from_the_last_instruction_across_cores():
    """The chain that sets a chip's cycles: it ends where the chip ends, each entry starts when the one
    before it ends (its queue predecessor) or at a signal's arrival (a wait released from another core),
    and the ring all-reduce's chain crosses cores over its dma_core arrivals."""
    chip = all_reduce_program("chip", 4, 256)
    ctl = schedule_chip(chip, CHIP)
    path = critical_path(chip, ctl, CHIP)
    assert path[-1][3] == ctl.cycles and path[0][2] == 0
    assert all(b[2] >= a[3] for a, b in zip(path, path[1:]))
    assert len({c for c, *_ in path}) > 1
    assert any(chip.cores[c].instructions[i].op == "dma_core" for c, i, *_ in path)

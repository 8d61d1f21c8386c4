"""Machine rules: uninitialised memory reads as NaN; every violation raises NpuError naming the instruction."""

import numpy as np
import pytest

from isthmus.errors import IsthmusError, NpuError
from isthmus.npu import sim
from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.isa import AP


def _fails(prog, *needles, config="datacenter", serial=False, inputs=None):
    with pytest.raises(NpuError) as e:
        sim.run(prog, inputs or {}, config, serial=serial)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_npu_errors_are_user_errors():
    assert issubclass(NpuError, IsthmusError)


def test_uninitialised_sbuf_reads_as_nan():
    b = ProgramBuilder()
    x = b.tensor("x", (128, 8), "f32")
    y = b.tensor("y", (128, 16), "bf16", "output")
    t, u = b.sbuf(16, "f32"), b.sbuf(16, "bf16")
    b.dma_copy(t[:, 0:8], x[:, :], queue=0)                 # only the first 8 columns are written
    b.sem_signal(engine="dma0", sem=0)
    b.sem_wait(engine="act", sem=0, value=1)
    b.activate(u.ap(), t.ap(), func="exp")
    b.sem_signal(engine="act", sem=1)
    b.sem_wait(engine="dma1", sem=1, value=1)
    b.dma_copy(y[:, :], u.ap(), queue=1)
    out = sim.run(b.build(), {"x": np.zeros((128, 8))}).outputs["y"].astype(np.float32)
    assert (out[:, :8] == 1).all()
    assert np.isnan(out[:, 8:]).all()


def test_fresh_psum_and_unwritten_outputs_are_nan():
    b = ProgramBuilder()
    y = b.tensor("y", (4, 4), "f32", "output")
    b.dma_copy(y[:, :], b.sbuf(4, "f32", 4).ap(), queue=0)
    assert np.isnan(sim.run(b.build()).outputs["y"]).all()


def _one(op, /, *aps, **fields):
    b = ProgramBuilder()
    b.memset(AP("sbuf", "f32", 0, 4, 0x8000, ((4, 1),)), value=0.0)   # instruction #0, so the culprit is #1
    b.emit(op, *aps, **fields)
    return b.build()


def test_sbuf_overflow_names_the_instruction():
    big = AP("sbuf", "f32", 0, 128, 196_608 - 256, ((128, 1),))
    msg = _fails(_one("memset", big, value=1.0), "instruction #1", "memset sbuf.f32[0:128]+0x2ff00{128:1}",
                 "SBUF overflow", "196608 bytes")
    assert msg.startswith("instruction #1 `")


def test_builder_refuses_to_allocate_past_sbuf():
    b = ProgramBuilder("edge")
    b.sbuf(3000, "f32")
    with pytest.raises(NpuError, match="sbuf is full"):
        b.sbuf(2000, "f32")


def test_partition_range_past_128():
    _fails(_one("memset", AP("sbuf", "f32", 100, 64, 0, ((4, 1),)), value=0.0), "instruction #1",
           "partition range 100:164", "128 partitions")


def test_misaligned_access():
    _fails(_one("memset", AP("sbuf", "bf16", 0, 4, 3, ((4, 1),)), value=0.0), "instruction #1", "misaligned",
           "offset 0x3", "bf16 element size 2")


def test_misaligned_matmul_partition_start():
    prog = _one("matmul", AP("psum", "f32", 0, 16, 0, ((16, 1),)), AP("sbuf", "bf16", 16, 16, 0, ((16, 1),)),
                AP("sbuf", "bf16", 16, 16, 64, ((16, 1),)))
    _fails(prog, "instruction #1", "misaligned stationary", "partition start 16", "multiple of 32")


def test_psum_bank_crossing():
    prog = _one("matmul", AP("psum", "f32", 0, 16, 1024, ((512, 1),)), AP("sbuf", "bf16", 0, 32, 0, ((16, 1),)),
                AP("sbuf", "bf16", 0, 32, 64, ((512, 1),)))
    _fails(prog, "instruction #1", "cross a 2048-byte PSUM bank")


@pytest.mark.parametrize("k,m,n,what", [(32, 130, 8, "M (stationary columns) = 130"),
                                        (32, 16, 600, "N (moving columns) = 600")])
def test_matmul_limits(k, m, n, what):
    prog = _one("matmul", AP("psum", "f32", 0, min(m, 128), 0, ((n, 1),)), AP("sbuf", "bf16", 0, k, 0, ((m, 1),)),
                AP("sbuf", "bf16", 0, k, 4096, ((n, 1),)))
    _fails(prog, "instruction #1", what)


def test_matmul_dtype_rules():
    prog = _one("matmul", AP("psum", "f32", 0, 8, 0, ((8, 1),)), AP("sbuf", "i8", 0, 32, 0, ((8, 1),)),
                AP("sbuf", "i8", 0, 32, 64, ((8, 1),)))
    _fails(prog, "instruction #1", "dtypes: stationary i8, moving i8, dst f32")
    prog = _one("matmul", AP("psum", "f32", 0, 8, 0, ((8, 1),)), AP("sbuf", "bf16", 0, 32, 0, ((8, 1),)),
                AP("sbuf", "f16", 0, 32, 64, ((8, 1),)))
    _fails(prog, "dtypes: stationary bf16, moving f16")


def test_engines_reach_only_their_memories():
    hbm = AP("hbm", "f32", 0, 4, 0, ((4, 1),), 4)
    b = ProgramBuilder()
    b.tensor("x", (4, 4), "f32", "scratch")
    b.memset(hbm, value=0.0)
    with pytest.raises(NpuError, match="dst is in HBM, which the vector engine cannot access"):
        sim.run(b.build())
    b = ProgramBuilder()
    b.tensor("x", (4, 4), "f32", "scratch")
    b.dma_copy(hbm, AP("psum", "f32", 0, 4, 0, ((4, 1),)), queue=0)
    with pytest.raises(NpuError, match="src is in PSUM, which the dma engine cannot access"):
        sim.run(b.build())


def test_shape_mismatch():
    prog = _one("tensor_tensor", AP("sbuf", "f32", 0, 4, 0, ((8, 1),)), AP("sbuf", "f32", 0, 4, 64, ((8, 1),)),
                AP("sbuf", "f32", 0, 8, 128, ((8, 1),)), op="add")
    _fails(prog, "instruction #1", "shape mismatch", "src1 (8, 8)")


def test_hbm_out_of_range():
    b = ProgramBuilder()
    b.tensor("x", (4, 4), "f32")
    b.dma_copy(AP("sbuf", "f32", 0, 4, 0, ((4, 1),)), AP("hbm", "f32", 0, 4, 64, ((4, 1),), 4), queue=0)
    _fails(b.build(), "instruction #0", "past the 0x40 bytes of HBM", inputs={"x": np.zeros((4, 4))})


def test_gather_index_out_of_range_at_run_time():
    b = ProgramBuilder()
    b.tensor("table", (10, 8), "f32")
    idx = b.sbuf(1, "i32", 4)
    b.iota(idx.ap(), base=7, pcoef=1)                        # 7, 8, 9, 10: the last is out of range
    b.sem_signal(engine="vector", sem=0)
    b.sem_wait(engine="dma0", sem=0, value=1)
    b.dma_gather(b.sbuf(8, "f32", 4).ap(), AP("hbm", "f32", 0, 10, 0, ((8, 1),), 8), idx.ap(), queue=0)
    _fails(b.build(), "instruction #3", "dma_gather", "gather index 10 (dst partition 3)", "10 rows",
           inputs={"table": np.zeros((10, 8))})


def test_semaphore_deadlock_names_the_waiting_instruction():
    b = ProgramBuilder()
    b.memset(b.sbuf(4, "f32", 4).ap(), value=0.0)
    b.sem_wait(engine="tensor", sem=5, value=1)              # nobody signals 5
    b.sem_signal(engine="vector", sem=6)
    _fails(b.build(), "instruction #1", "sem_wait engine=tensor, sem=5, value=1", "semaphore deadlock",
           "never gets past 0")


def test_cyclic_wait_deadlock():
    b = ProgramBuilder()
    b.sem_wait(engine="tensor", sem=0, value=1)
    b.sem_signal(engine="tensor", sem=1)
    b.sem_wait(engine="vector", sem=1, value=1)
    b.sem_signal(engine="vector", sem=0)
    _fails(b.build(), "instruction #0", "semaphore deadlock", "1 other engine(s) blocked")


def test_serial_order_deadlock_where_concurrent_order_is_fine():
    """Program order is the FORCE_SERIAL order: a wait before its signal in program order deadlocks there."""
    b = ProgramBuilder()
    b.sem_wait(engine="tensor", sem=0, value=1)
    b.sem_signal(engine="vector", sem=0)
    prog = b.build()
    sim.run(prog)
    _fails(prog, "instruction #0", "FORCE_SERIAL", serial=True)


def test_queue_and_semaphore_must_exist_in_the_config():
    b = ProgramBuilder()
    b.sem_signal(engine="dma5", sem=0)
    _fails(b.build(), "DMA queue 5 does not exist (2 queues)", config="edge")
    b = ProgramBuilder()
    b.sem_signal(engine="tensor", sem=20)
    _fails(b.build(), "semaphore 20 does not exist (16 semaphores)", config="edge")


def test_hbm_capacity_and_force_serial_environment(monkeypatch):
    b = ProgramBuilder("edge")
    b.tensor("huge", (1 << 17, 1 << 15), "f32", "scratch")            # 16 GiB
    _fails(b.build(), "needs 17,179,869,184 bytes of HBM; config edge has 8,589,934,592", config="edge")
    b = ProgramBuilder()
    b.sem_wait(engine="tensor", sem=0, value=1)
    b.sem_signal(engine="vector", sem=0)
    monkeypatch.setenv("ISTHMUS_NPU_FORCE_SERIAL", "1")
    _fails(b.build(), "FORCE_SERIAL")


def test_inputs_are_checked():
    b = ProgramBuilder()
    b.tensor("x", (4, 4), "f32")
    prog = b.build()
    _fails(prog, "missing input x (f32[4, 4])")
    _fails(prog, "unknown input(s) y", inputs={"x": np.zeros((4, 4)), "y": 1})
    _fails(prog, "input x: expected shape (4, 4), got (4,)", inputs={"x": np.zeros(4)})


def test_halt_stops_the_program():
    b = ProgramBuilder()
    y = b.tensor("y", (4, 4), "f32", "output")
    t = b.sbuf(4, "f32", 4)
    b.memset(t.ap(), value=2.0)
    b.sem_signal(engine="vector", sem=0)
    b.sem_wait(engine="dma0", sem=0, value=1)
    b.dma_copy(y[:, :], t.ap(), queue=0)
    b.halt()
    b.memset(t.ap(), value=float("nan"))
    b.sem_wait(engine="tensor", sem=9, value=1)              # would deadlock if it ran
    result = sim.run(b.build())
    assert (result.outputs["y"] == 2).all()
    assert len(result.timeline.order) == 4

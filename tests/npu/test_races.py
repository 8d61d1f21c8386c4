"""The race check: engines touching the same memory need a semaphore between them."""

import numpy as np
import pytest

from isthmus.errors import NpuError
from isthmus.npu import sim
from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.isa import AP
from isthmus.npu.races import overlap, footprint_box


def _tile(offset=0, cols=16):
    return AP("sbuf", "f32", 0, 8, offset, ((cols, 1),))


def test_read_after_write_without_a_semaphore_is_a_race():
    b = ProgramBuilder()
    b.memset(_tile(), value=1.0)                               # VECTOR writes
    b.activate(_tile(256), _tile(), func="exp")                # ACT reads, unordered
    with pytest.raises(NpuError) as e:
        sim.run(b.build())
    msg = str(e.value)
    assert msg.startswith("instruction #1 `activate") and "data race with instruction #0 `memset" in msg
    assert "one writing" in msg and "\n" not in msg
    sim.run(b.build(), check_races=False)                      # the check can be turned off


def test_write_after_read_and_write_after_write():
    b = ProgramBuilder()
    b.activate(_tile(256), _tile(), func="exp")                # ACT reads
    b.memset(_tile(8, cols=4), value=0.0)                      # VECTOR overwrites part of what ACT read
    with pytest.raises(NpuError, match="data race with instruction #0"):
        sim.run(b.build())
    b = ProgramBuilder()
    b.memset(_tile(), value=0.0)
    b.dma_copy(_tile(32, cols=8), AP("sbuf", "f32", 0, 8, 1024, ((8, 1),)), queue=0)
    with pytest.raises(NpuError, match="both writing"):
        sim.run(b.build())


def test_semaphores_order_accesses_transitively():
    b = ProgramBuilder()
    b.memset(_tile(), value=2.0)                               # VECTOR
    b.wait("tensor", b.signal("vector"))
    b.wait("act", b.signal("tensor"))                          # ACT learns VECTOR's past through TENSOR
    b.activate(_tile(256), _tile(), func="square")
    b.wait("vector", b.signal("act"))
    b.memset(_tile(), value=5.0)                               # VECTOR again, after ACT read
    result = sim.run(b.build())
    assert (result.machine.view(_tile(256)) == 4.0).all()


def test_disjoint_hbm_blocks_on_two_queues_are_not_a_race_but_overlapping_ones_are():
    def two_stores(col_b):
        b = ProgramBuilder()
        c = b.tensor("C", (8, 64), "f32", "output")
        t = b.sbuf(32, "f32", 8)
        b.memset(t.ap(), value=1.0)
        done = b.signal("vector")
        for q, col in ((0, 0), (1, col_b)):
            b.wait(f"dma{q}", done)
            b.dma_copy(c[:, col:col + 32], t.ap(), queue=q)
        return b.build()

    assert (sim.run(two_stores(32)).outputs["C"] == 1).all()
    with pytest.raises(NpuError, match="data race"):
        sim.run(two_stores(16))


@pytest.mark.parametrize("a,b,want", [
    (AP("hbm", "f32", 0, 8, 0, ((32, 1),), 64), AP("hbm", "f32", 0, 8, 128, ((32, 1),), 64), False),
    (AP("hbm", "f32", 0, 8, 0, ((32, 1),), 64), AP("hbm", "f32", 0, 8, 124, ((32, 1),), 64), True),
    (AP("hbm", "f32", 0, 4, 0, ((64, 1),), 64), AP("hbm", "f32", 0, 4, 1024, ((64, 1),), 64), False),
    (AP("hbm", "f32", 0, 4, 0, ((64, 1),), 64), AP("hbm", "f32", 0, 4, 768, ((64, 1),), 64), True),
    (AP("sbuf", "f32", 0, 64, 0, ((8, 1),)), AP("sbuf", "f32", 64, 64, 0, ((8, 1),)), False),
    (AP("sbuf", "f32", 0, 64, 0, ((8, 1),)), AP("psum", "f32", 0, 64, 0, ((8, 1),)), False),
])
def test_footprint_overlap(a, b, want):
    assert overlap(footprint_box(a), footprint_box(b)) is want is overlap(footprint_box(b), footprint_box(a))


def test_loaded_program_runs_repeatedly_from_fresh_memory():
    b = ProgramBuilder()
    x = b.tensor("x", (8, 16), "f32")
    y = b.tensor("y", (8, 16), "f32", "output")
    t = b.sbuf(16, "f32", 8)
    b.dma_copy(t[:, 0:8], x[:, 0:8], queue=0)                  # half the tile stays unwritten
    b.wait("act", b.signal("dma0"))
    b.activate(t.ap(), t.ap(), func="exp")
    b.wait("dma1", b.signal("act"))
    b.dma_copy(y[:, :], t.ap(), queue=1)
    loaded = sim.LoadedProgram(b.build())
    for value in (0.0, 1.0):
        out = loaded.run({"x": np.full((8, 16), value)}).outputs["y"]
        np.testing.assert_allclose(out[:, :8], np.exp(value), rtol=1e-6)
        assert np.isnan(out[:, 8:]).all()

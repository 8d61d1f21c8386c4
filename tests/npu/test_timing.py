"""The timing model: cost formulas, overlap through semaphores, FORCE_SERIAL, and the tiled matmul acceptance test."""

import math

import ml_dtypes
import numpy as np
import pytest

from isthmus.npu import programs, races, sim, timing
from isthmus.npu.builder import ProgramBuilder
from isthmus.npu.config import load_config
from isthmus.npu.isa import AP

CFG = load_config("datacenter")


def _cycles_of(emit, config=CFG):
    b = ProgramBuilder(config)
    emit(b)
    prog = b.build()
    tl = timing.schedule(prog, load_config(config))
    return [tl.end[i] - tl.start[i] for i in range(len(prog))], tl


@pytest.mark.parametrize("dt,n,want", [("bf16", 512, 512 + 16), ("bf16", 32, 64 + 16), ("f32", 100, 4 * 100 + 16),
                                       ("i8", 200, 200 + 16)])
def test_matmul_cost(dt, n, want):
    acc = "i32" if dt == "i8" else "f32"
    (c,), _ = _cycles_of(lambda b: b.matmul(AP("psum", acc, 0, 128, 0, ((n, 1),)),
                                            AP("sbuf", dt, 0, 128, 0, ((128, 1),)),
                                            AP("sbuf", dt, 0, 128, 4096, ((n, 1),))))
    assert c == want == max(n, CFG.tensor_min_moving) * (CFG.tensor_fp32_passes if dt == "f32" else 1) \
        + CFG.tensor_fixed_cycles


@pytest.mark.parametrize("engine,fixed", [("vector", CFG.vector_fixed_cycles), ("act", CFG.act_fixed_cycles)])
def test_dequant_cost_on_either_engine(engine, fixed):
    """A 4-bit dequant of 512 values a partition: E = dst elements, at one a cycle, plus the engine's fixed cost."""
    (c,), tl = _cycles_of(lambda b: b.dequant(AP("sbuf", "bf16", 0, 128, 0, ((512, 1),)),
                                              AP("sbuf", "u8", 0, 128, 2048, ((256, 1),)),
                                              AP("sbuf", "bf16", 0, 128, 4096, ((16, 1),)),
                                              AP("sbuf", "bf16", 0, 128, 4160, ((16, 1),)),
                                              group=32, packed=1, engine=engine))
    assert c == 512 + fixed and tl.engine == [engine]


def test_vector_act_sync_and_dma_costs():
    t = AP("sbuf", "f32", 0, 128, 0, ((4, 25), (25, 1)))
    big = AP("sbuf", "bf16", 0, 128, 4096, ((128, 1),))
    hbm = AP("hbm", "bf16", 0, 128, 0, ((128, 1),), 128)
    costs, _ = _cycles_of(lambda b: (
        b.tensor_tensor(t, t, t, op="add"), b.activate(t, t, func="exp"), b.sem_signal(engine="act", sem=0),
        b.tensor("x", (128, 128), "bf16"), b.dma_copy(big, hbm, queue=0)))
    assert costs == [100 + CFG.vector_fixed_cycles, 100 + CFG.act_fixed_cycles, CFG.sync_cycles,
                     CFG.dma_latency_cycles + math.ceil(128 * 128 * 2 / (CFG.hbm_bytes_per_s / CFG.clock_hz))]


def test_engines_overlap_and_force_serial_adds_up():
    t = AP("sbuf", "f32", 0, 128, 0, ((256, 1),))
    b = ProgramBuilder()
    b.tensor_tensor(t, t, t, op="add")                        # VECTOR
    b.activate(AP("sbuf", "f32", 0, 128, 2048, ((256, 1),)), AP("sbuf", "f32", 0, 128, 4096, ((256, 1),)), func="exp")
    prog = b.build()
    v, a = 256 + CFG.vector_fixed_cycles, 256 + CFG.act_fixed_cycles
    assert timing.schedule(prog, CFG).cycles == max(v, a)
    assert timing.schedule(prog, CFG, serial=True).cycles == v + a


def test_semaphores_order_engines_and_count_stalls():
    t = AP("sbuf", "f32", 0, 128, 0, ((256, 1),))
    b = ProgramBuilder()
    b.tensor_tensor(t, t, t, op="add")
    b.sem_signal(engine="vector", sem=3)
    b.sem_wait(engine="act", sem=3, value=1)
    b.activate(AP("sbuf", "f32", 0, 128, 2048, ((256, 1),)), t, func="exp")
    prog = b.build()
    tl = timing.schedule(prog, CFG)
    v, s = 256 + CFG.vector_fixed_cycles, CFG.sync_cycles
    assert tl.start[1] == v and tl.end[1] == v + s                    # signal after the add
    assert tl.start[2] == v + s and tl.reach[2] == 0                  # wait released by the signal
    assert tl.start[3] == v + 2 * s
    st = timing.stats(prog, tl, CFG)
    assert st.engines["act"].stall == v + s and st.engines["vector"].stall == 0
    assert st.cycles == v + 2 * s + 256 + CFG.act_fixed_cycles


def test_dma_queues_share_hbm_bandwidth():
    nbytes = 128 * 1024 * 2
    src = AP("hbm", "bf16", 0, 128, 0, ((1024, 1),), 1024)
    costs, tl = _cycles_of(lambda b: (b.tensor("x", (128, 1024), "bf16"),
                                      b.dma_copy(AP("sbuf", "bf16", 0, 128, 0, ((1024, 1),)), src, queue=0),
                                      b.dma_copy(AP("sbuf", "bf16", 0, 128, 4096, ((1024, 1),)), src, queue=1)))
    per = CFG.hbm_bytes_per_s / CFG.clock_hz
    assert costs == [CFG.dma_latency_cycles + math.ceil(nbytes / per),
                     CFG.dma_latency_cycles + math.ceil(2 * nbytes / per)]
    assert tl.start == [0, 0]


@pytest.mark.parametrize("preset,ratio", [("core", 1.10), ("datacenter", 1.07)])
def test_tiled_matmul_512_matches_numpy_and_is_near_its_roofline(preset, ratio):
    """C = A @ B, 512x512x512 bf16: within issue 19's 1.10x of its roofline on `core`, far below serial.

    The roofline is max(tensor-engine bound, vector/act bound, HBM bytes / bandwidth). The tensor
    engine must run every matmul: each [K=128, M=128] x [128, N=128] step costs max(128,
    tensor_min_moving) + tensor_fixed_cycles = 144 cycles and there are (512/128)^3 = 64 of them, the
    last tile's 4 run as 8 of half width (80 each, so its first half is stored while the second is
    multiplied): 9,280 cycles (8,192 at the pure FLOP peak). HBM: 1.5 MB at 259 B/cycle on `core` is
    6,074 cycles, so the tensor engine binds on both presets. What is left over it on `core`: the first
    two 32 KB loads (482 cycles before the first matmul can start), the tensor engine's 19 sem_waits and
    sem_signals (loads merged into one token per group by the join queue) and the last half tile's
    eviction and store (409): 10,203 cycles, 1.0995x (1.107x the 9,216 of unsplit matmuls).
    """
    cfg = load_config(preset)
    prog = programs.tiled_matmul(cfg, 512, 512, 512, "bf16", tile_n=128)
    bound = 60 * (max(128, cfg.tensor_min_moving) + cfg.tensor_fixed_cycles) + 8 * (64 + cfg.tensor_fixed_cycles)
    assert bound == timing.engine_bound(prog, cfg, "tensor") == 9280
    roof = timing.roofline(prog, cfg)
    assert roof.binding == "tensor" and roof.cycles == bound and roof.hbm < bound
    races.check_races(prog, timing.schedule(prog, cfg))

    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(ml_dtypes.bfloat16)
    bm = rng.standard_normal((512, 512)).astype(ml_dtypes.bfloat16)
    result = sim.run(prog, {"AT": a.T, "B": bm}, cfg)
    exact = a.astype(np.float64) @ bm.astype(np.float64)
    got = result.outputs["C"].astype(np.float64)
    np.testing.assert_allclose(got, exact, rtol=2 ** -8, atol=1e-3)             # bf16 output rounding
    assert np.mean(got == exact.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)) > 0.99

    cycles = result.stats.cycles
    serial = sim.run(prog, {"AT": a.T, "B": bm}, cfg, serial=True).stats.cycles
    print(f"tiled matmul 512^3 bf16 on {preset}: {cycles} cycles, roofline {roof.cycles} "
          f"(+{cycles / roof.cycles - 1:.1%}), serial {serial}")
    assert bound <= cycles <= ratio * roof.cycles
    assert serial > 2 * cycles

    st = result.stats
    assert st.flops >= 2 * 512 ** 3 and st.ops["matmul"].flops == 2 * 512 ** 3
    assert st.hbm_read_bytes == 2 * 512 * 512 * 2 and st.hbm_write_bytes == 512 * 512 * 2
    assert 0.7 < st.achieved_flops / cfg.peak_flops <= 1          # 8,192 / cycles
    table = st.table()
    for needle in ("tensor", "dma15", "matmul", "TFLOP/s achieved", "GB/s achieved"):
        assert needle in table


def test_edge_preset_is_slower():
    t = AP("sbuf", "f32", 0, 32, 0, ((256, 1),))
    b = ProgramBuilder("edge")
    b.tensor_tensor(t, t, t, op="add")
    edge = sim.run(b.build(), config="edge").stats
    assert edge.cycles == 256 + load_config("edge").vector_fixed_cycles
    assert edge.seconds > 256 / CFG.clock_hz

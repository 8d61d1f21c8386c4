"""Modeled performance figures of the NPU lowering (timing model only, no functional simulation),
each against its roofline: max(tensor-engine bound, vector/act bound, compulsory HBM traffic /
bandwidth). docs/npu-performance.md quotes them and explains the bounds."""

from pathlib import Path

import pytest

from isthmus.compiler.lower.npu.profile_tables import decode_figures, matmul_figures

CORE_SHARE = Path(__file__).resolve().parents[2] / "examples" / "npu" / "datacenter-core-share.json"


def test_matmul_1024x4096x4096_bf16_reaches_95_percent_of_tensor_peak_on_core():
    """On `core` the tensor engine binds (HBM: 50 MB against 1.05M tensor cycles); the weight pieces
    load in 128 KB DMAs, so the first matmuls wait for their first K tiles only. Measured: 95.07 %."""
    f = matmul_figures(1024, 4096, 4096, "bf16", "core")
    assert f["roofline"].binding == "tensor"
    assert f["flop_utilisation"] >= 0.95, f["flop_utilisation"]
    assert f["cycles"] <= 1.03 * f["roofline"].cycles, (f["cycles"], f["roofline"].cycles)
    assert f["tensor_busy"] >= f["flop_utilisation"]


@pytest.fixture(scope="module")
def pipelined(default_model):
    from isthmus.compiler.passes.pipeline import run_pipeline
    return run_pipeline(default_model.graph)


@pytest.mark.slow
@pytest.mark.parametrize("precision,binds", [("bf16", "hbm"), ("bf16x3", "hbm"), ("f32", "tensor")])
def test_decode_step_is_within_1_2x_of_its_roofline_on_core(default_model, pipelined, precision, binds):
    """One decode step of SmolLM2-135M on `core` (a NeuronCore with its 362.5 GB/s share of the
    chip's HBM): HBM binds in bf16 and bf16x3 (the weight ring keeps the DMA queues streaming), the
    tensor engine in f32 (4 passes per matmul). Measured: 1.040x, 1.039x, 1.034x."""
    from isthmus.compiler.lower.npu.target import lower_npu
    exe = lower_npu(pipelined, model=default_model, precision=precision)
    assert exe.config.name == "core" and exe.config.hbm_bytes_per_s == 2.9e12 / 8
    f = decode_figures(exe, window=64)
    roof = f["roofline"]
    assert roof.binding == binds
    assert roof.hbm_bytes >= f["weight_bytes"]                  # every weight, plus the KV window and logits
    assert f["cycles"] <= 1.2 * roof.cycles, (f["cycles"], roof.cycles)
    assert f["memory"]["spills"] == []


@pytest.mark.slow
def test_decode_step_on_the_legacy_datacenter_preset_is_tensor_bound(default_model, pipelined):
    """The legacy preset gives one core the whole chip's 2.9 TB/s: a decode matmul streams one moving
    column, which costs 64 (tensor_min_moving) + 16 cycles per 128x128 weight tile, at most 205
    weights per cycle against HBM's 1036, so the tensor engine binds; the step stays within 1.2x of it.
    The JSON config of a core's share gives `core`'s figure."""
    from isthmus.compiler.lower.npu.target import lower_npu
    f = decode_figures(lower_npu(pipelined, model=default_model, config="datacenter", precision="bf16"), window=64)
    assert f["roofline"].binding == "tensor" and f["cycles"] <= 1.2 * f["roofline"].cycles
    share = decode_figures(lower_npu(pipelined, model=default_model, config=CORE_SHARE, precision="bf16"), window=64)
    core = decode_figures(lower_npu(pipelined, model=default_model, config="core", precision="bf16"), window=64)
    assert share["cycles"] == core["cycles"]


@pytest.mark.slow
@pytest.mark.parametrize("weights,precision,ratio,bytes_ratio", [("int8", "bf16", 1.14, 0.58), ("int8", "bf16x3", 1.18, 0.62),
                                                                 ("q4", "bf16", 1.16, 0.40), ("q4", "bf16x3", 1.18, 0.43),
                                                                 ("fp8", "bf16", 1.13, 0.53)])
def test_decode_step_with_quantized_weights_on_core(default_model, pipelined, weights, precision, ratio, bytes_ratio):
    """Weights stored quantized in HBM and converted on chip: the step's HBM bytes fall 1.7x (int8: the
    file's Q4_1 blocks in a byte, an f16 scale and min per 32), 2.6x (q4; the head in int8) and 1.9x
    (fp8, per channel) but the tensor engine binds it (a decode matmul takes at most 205 weights a
    cycle, HBM brings 259 8-bit ones), so each is measured against its own roofline, whose tensor term
    it is; issue 19 asks for 1.2x. Measured: int8 1.138x (bf16) / 1.178x (bf16x3); q4 1.158x / 1.175x;
    fp8 1.121x. The unpacking and the block scales keep VECTOR and ACT ~90 % as busy as the tensor
    engine: the weight stream converts in units of 4 x 128 values a partition, in the matmuls' order,
    wherever VECTOR/ACT would idle before their next instruction (weights.WeightStream), and a
    blocked linear makes its min terms while its matmuls run (block_linear.py)."""
    from isthmus.compiler.lower.npu.target import lower_npu
    exe = lower_npu(pipelined, model=default_model, weights=weights, precision=precision)
    f = decode_figures(exe, window=64)
    roof = f["roofline"]
    bf16 = 274_490_000                                     # the bf16 step's compulsory HBM bytes
    assert roof.binding == "tensor" and roof.hbm_bytes <= bytes_ratio * bf16, (roof.binding, roof.hbm_bytes)
    assert f["cycles"] <= ratio * roof.cycles, (f["cycles"], roof.cycles)
    assert f["memory"]["spills"] == []

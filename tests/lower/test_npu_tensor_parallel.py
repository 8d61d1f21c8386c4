"""Tensor parallelism on the `chip` preset (compiler/lower/npu/tensor_parallel.py): a Llama MLP block split
over 8 cores (gate/up by outputs, down by inputs, a one-hop all-reduce of DMAs between cores with
semaphores), simulated on the chip against numpy and against the same block on one core, and timed with
the cores concurrent (deterministic modeled cycles)."""

import numpy as np
import pytest

from isthmus.compiler.lower.npu.tensor_parallel import tp_mlp_figures, tp_mlp_program
from isthmus.npu.chip import run_chip
from isthmus.npu.sim import run

EPS = 1e-5


def weights(D, F, seed=0):
    rng = np.random.default_rng(seed)
    gate, up = (rng.standard_normal((F, D)).astype(np.float32) * 0.05 for _ in range(2))
    down = rng.standard_normal((D, F)).astype(np.float32) * 0.05
    norm = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    return gate, up, down, norm


def reference(x, gate, up, down, norm, layers):
    for _ in range(layers):
        h = x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * norm
        g, u = h @ gate.T, h @ up.T
        x = x + (g / (1 + np.exp(-g)) * u) @ down.T
    return x


@pytest.mark.parametrize("D,F,rows,layers", [(256, 512, 1, 3), (576, 1536, 4, 2)])
def test_tensor_parallel_mlp_matches_numpy_and_one_core(D, F, rows, layers):
    gate, up, down, norm = weights(D, F)
    x = np.random.default_rng(1).standard_normal((rows, D)).astype(np.float32)
    chip, inputs = tp_mlp_program(gate, up, down, norm, EPS, rows, "chip", layers=layers)
    assert len(chip.cores) == 8
    got = run_chip(chip, {**inputs, "x": x}).outputs["y"]
    want = reference(x, gate, up, down, norm, layers)
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()         # bf16 weights and activations
    one, inputs1 = tp_mlp_program(gate, up, down, norm, EPS, rows, "core", cores=1, layers=layers)
    alone = run(one, {**inputs1, "x": x}, config="core").outputs["y"]
    # the same products; only the order of the partial sums' additions differs
    assert np.abs(got - alone).max() <= 1e-5 * np.abs(alone).max()


def test_tensor_parallel_mlp_timing_smollm2_shapes():
    """30 MLP blocks of SmolLM2's shapes (576 -> 1536 -> 576), decode (one row), bf16: the figures of
    docs/npu-performance.md ("Eight cores")."""
    gate, up, down, norm = weights(576, 1536)
    one = tp_mlp_figures(gate, up, down, norm, EPS, 1, layers=1)
    assert (one["cycles"], one["one_core_cycles"]) == (9_472, 33_206)
    f = tp_mlp_figures(gate, up, down, norm, EPS, 1, layers=30)
    assert (f["cycles"], f["one_core_cycles"]) == (128_258, 648_656)
    assert f["speedup"] >= 5.0                      # 5.06x
    assert f["hbm_ratio"] <= 1.67                   # 1.668x the chip's HBM bound (collectives included)

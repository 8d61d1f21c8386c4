"""Quantized weights on the NPU (int8, fp8 e4m3, q4: compiler/lower/npu/quant_weights.py), stored
quantized in HBM and dequantized on chip after each DMA. Oracles: numpy for the host quantization
and packing, and the reference target run on the *same* quantized weights for the decoder (so the
comparison isolates the lowering from the quantization's own rounding)."""

import numpy as np
import pytest

import isthmus
from isthmus.compiler.lower.npu.llama_matcher import match_llama
from isthmus.compiler.lower.npu.quant_weights import choose_format, quantize
from isthmus.compiler.lower.npu.target import lower_npu
from isthmus.compiler.lower.npu.weights import dense_f32, make_weight, pack_layout
from isthmus.compiler.passes.pipeline import run_pipeline
from isthmus.errors import InputError
from isthmus.kernels.numba.weight_pack import pack
from tiny_models import tiny_llama_model  # tests/support, on pythonpath

CFG = dict(n_layers=2, hidden=64, ffn=96, n_heads=6, n_kv_heads=2, head_dim=16, vocab_size=131,
           rms_eps=1e-5, rope_theta=10000.0, context_length=256)


def test_quantize_error_bounds():
    w = np.random.default_rng(0).standard_normal((96, 200)).astype(np.float32)
    w[5] = 0                                                     # a padding row stays zero
    for fmt, bound in (("int8", lambda q: np.abs(w).max(axis=1, keepdims=True) / 254 * 1.0001),
                       ("fp8", lambda q: np.abs(w) * 2.0 ** -4 + 1e-30),
                       ("q4", lambda q: np.repeat(q.group_scale, 32, axis=0) / 2 * 1.0001 + np.abs(w) * 2.0 ** -8)):
        q = quantize(w, fmt)
        err = np.abs(q.dequantized() - w)
        assert (err <= bound(q)).all(), fmt
        if fmt != "q4":                                          # q4's blocks run across outputs
            assert (q.dequantized()[5] == 0).all()
    assert set(np.unique(quantize(w, "q4").values)) <= set(range(16))


def test_choose_format():
    class Q:
        def __init__(self, qtype):
            self.qtype = qtype
    assert choose_format(Q("q8_0"), 64, "auto") == "int8"
    assert choose_format(Q("q4_1"), 64, "auto") == "q4"
    assert choose_format(Q("q4_1"), 131, "auto") == "int8"       # q4 blocks are 32 outputs
    assert choose_format(np.zeros((4, 4)), 4, "auto") == "bf16"
    assert choose_format(Q("q4_1"), 64, "fp8") == "fp8"
    with pytest.raises(InputError, match="one of bf16, int8, fp8, q4, auto"):
        choose_format(Q("q4_1"), 64, "int4")


def test_q4_packing_round_trips_through_the_piece_layout():
    """The packed nibbles and group tables, unpacked by the layout the on-chip loads assume, give back
    exactly the quantized weight (pack_layout is checked against the packing kernel too)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 320)).astype(np.float32)
    assert np.array_equal(pack(w, "f32", 128, 128)[0], pack_layout(w, 128, 128))
    pw = make_weight("w", w, "bf16", 128, 128, fmt="q4")
    vals = np.empty(pw.qdata.size * 2, np.float32)
    vals[0::2], vals[1::2] = pw.qdata & 15, pw.qdata >> 4
    per = np.repeat(pw.gscale.astype(np.float32), 32) * vals + np.repeat(pw.gzero.astype(np.float32), 32)
    q = quantize(w, "q4")
    want = (q.values.reshape(8, 32, 320) * q.group_scale[:, None] + q.group_zero[:, None]).reshape(256, 320)
    np.testing.assert_array_equal(per, pack_layout(want, 128, 128))
    assert pw.nbytes == 256 * 320 * 5 // 8                        # 4 bits + a bf16 scale and zero per 32


def _reference_on_quantized_weights(image, model=None):
    return _reference_exe(image, model).decoder()


def _reference_exe(image, model=None):
    """The reference target on a fresh copy of the model (default: the tiny one) with each linear
    replaced by its quantized-dequantized values in the format the lowering chose for it (the tied
    head gets its own copy: the embedding stays as stored)."""
    model = model or tiny_llama_model(CFG, seed=0, quant="q4_1")
    spec = match_llama(model.graph)
    for L, lw in zip(spec.layers, image.weights):
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            t = getattr(L, name).inputs[1]
            if lw[name].fmt != "bf16":
                t.data = quantize(dense_f32(t.data), lw[name].fmt).dequantized()
    t = spec.head.inputs[1]
    spec.head.inputs[1] = model.graph.add_constant(
        "head.quantized", quantize(dense_f32(t.data), image.head.fmt).dequantized())
    return isthmus.compile(model, target="reference")


@pytest.mark.parametrize("fmt,precision,tol", [("int8", "bf16x3", 1e-4), ("fp8", "bf16x3", 1e-4),
                                               ("q4", "bf16x3", 1e-4), ("q4", "bf16", 3e-2)])
def test_decoder_with_quantized_weights_matches_the_reference_on_the_same_weights(fmt, precision, tol):
    model = tiny_llama_model(CFG, seed=0, quant="q4_1")
    exe = lower_npu(run_pipeline(model.graph), model=model, weights=fmt, precision=precision, check_races=True)
    formats = exe.image.formats
    assert formats.get(fmt, 0) >= 8 and set(formats) <= {fmt, "int8", "bf16"}   # q4: see choose_format
    ref, dec = _reference_on_quantized_weights(exe.image), exe.decoder()
    for ids in ([5, 17, 99, 3, 42], [7], [8, 9, 10]):         # prefill (padded), decode, a 3-token chunk
        a, b = dec.step(ids), ref.step(ids)
        assert np.abs(a - b).max() <= tol * np.abs(b).max(), (fmt, np.abs(a - b).max() / np.abs(b).max())
    bf16 = lower_npu(run_pipeline(model.graph), model=model, precision="bf16")
    assert exe.image.weight_bytes < {"int8": 0.65, "fp8": 0.65, "q4": 0.45}[fmt] * bf16.image.weight_bytes


def test_quantized_weights_options():
    model = tiny_llama_model(CFG, seed=0, quant="q4_1")
    with pytest.raises(InputError, match="NPU weights must be one of"):
        lower_npu(run_pipeline(model.graph), model=model, weights="int3")
    with pytest.raises(InputError, match="run at precision bf16 or bf16x3, not f32"):
        lower_npu(run_pipeline(model.graph), model=model, weights="int8", precision="f32")


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.mark.slow
def test_default_model_int8_greedy_matches_the_reference_on_the_same_weights(default_model, default_model_path,
                                                                              default_exe):
    """SmolLM2-135M with int8 weights at bf16x3 on `core`: greedy 20-token continuations of the three
    test prompts are identical to the reference run on the same int8 weights, logits within 1e-4.
    Against the reference on the file's own Q4_1 weights the logits differ by ~4 % of their range
    (int8's rounding of the dequantized Q4_1 values, not the lowering: the reference on the int8
    weights differs as much) and the third prompt's near-tie flips at token 5."""
    from isthmus.compiler.frontends import load_model
    from isthmus.runtime.generate import generate
    from isthmus.runtime.sampling import SamplingParams
    exe = lower_npu(run_pipeline(default_model.graph), model=default_model, weights="int8", precision="bf16x3")
    ref = _reference_exe(exe.image, load_model(default_model_path))
    ids = default_model.tokenizer.encode(PROMPTS[0])
    a, b, orig = exe.decoder().step(ids), ref.decoder().step(ids), default_exe.decoder().step(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    assert np.abs(a - orig).max() <= 0.06 * np.abs(orig).max()
    params = SamplingParams(max_tokens=20, temperature=0.0)
    for prompt in PROMPTS:
        p_ids = default_model.tokenizer.encode(prompt)
        want, got = list(generate(ref, p_ids, params)), list(generate(exe, p_ids, params))
        assert got == want and len(got) == 20, prompt

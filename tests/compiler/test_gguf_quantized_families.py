"""Quantized GGUF files of the families beyond llama and qwen2, against transformers reading the same file.

tests/compiler/test_gguf_architectures.py checks llama and qwen2 files whose linears the gguf
package's own quantizer wrote; this is the same check for qwen3 (per-head Q/K norms), phi3 (fused
QKV and gate/up, quantized fused), gemma2 and gemma3 (Gemma's norm weights + 1, the tied embedding
left f32 as the converter leaves it) and gpt2 (transposed Conv1D weights, biases).

The oracle is transformers loading the GGUF itself, dequantizing with the gguf package
(tests/support/hf_gguf.py: transformers_reading). Its GGUF reader does not recover these tiny
configs from the metadata, so it is given the model's own config; the weights are all the file's,
as the f32 check below shows: the same call on the unquantized file gives back the original
model's logits exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_gguf import hf_logits, hf_model, transformers_reading, write_gguf

import isthmus
from isthmus.compiler.frontends import load_model

ARCHS = ["qwen3", "phi3", "gemma2", "gemma3", "gpt2"]
# the formats the gguf package can quantize; Q4_1 and Q5_0 (also llama's and qwen2's) in the slow run
QUANTS = ["Q8_0", "Q4_0", "Q5_1"] + [pytest.param(q, marks=pytest.mark.slow) for q in ("Q4_1", "Q5_0")]
IDS = [3, 17, 5, 60, 22, 9, 41, 7, 2, 88, 14, 30, 20, 33, 1, 70, 19]     # past gemma's window of 4
PREFILL = 10
SIZES = dict(hidden_size=96, intermediate_size=256)        # every linear's rows a multiple of the 32-block


@pytest.fixture(scope="module", params=ARCHS)
def family(request):
    return request.param, hf_model(request.param, **SIZES)


def test_transformers_reads_the_f32_file_of_each_family_exactly(family, tmp_path):
    """The oracle's reading of the file: the f32 file gives back the original model's logits."""
    arch, hf = family
    write_gguf(hf, tmp_path / "f.gguf", arch)
    np.testing.assert_array_equal(hf_logits(transformers_reading(hf, tmp_path / "f.gguf"), IDS), hf_logits(hf, IDS))


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_files_match_transformers_reading_the_same_file(family, quant, tmp_path):
    """Quantization moves the logits by 0.07 % (gpt2, Q8_0) to 27 % (gemma3, Q4_1) of their range
    here; isthmus reads the same numbers at every step of a prefill and decode. Reference: 2e-6 of the
    range (measured up to 9e-7, gemma3's six layers; its f32 file alone gives 7e-7); numba, whose
    decode kernels quantize activations to i16 per 32-block: 1e-4 (measured up to 6.4e-5, gemma3)."""
    arch, hf = family
    write_gguf(hf, tmp_path / "q.gguf", arch, quant=quant)
    want = hf_logits(transformers_reading(hf, tmp_path / "q.gguf"), IDS)
    assert np.abs(want - hf_logits(hf, IDS)).max() > 1e-4 * np.ptp(want)      # the file is quantized
    model = load_model(tmp_path / "q.gguf")
    assert set(model.quantization()) >= {quant.lower()}
    for target, tol in (("reference", 2e-6), ("numba", 1e-4)):
        dec = isthmus.compile(model, target=target).decoder()
        got = [np.array(dec.step(IDS[:PREFILL]))] + [np.array(dec.step([t])) for t in IDS[PREFILL:]]   # copies:
        for i, row in enumerate(got):                                    # numba's logits are written in place
            np.testing.assert_allclose(row, want[PREFILL - 1 + i], rtol=0, atol=tol * np.ptp(want),
                                       err_msg=f"{target} step {i}")

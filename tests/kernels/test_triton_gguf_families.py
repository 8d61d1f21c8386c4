"""`--target triton` on GGUF files of phi3 and gemma3 against transformers, under TRITON_INTERPRET=1 (f32).

tests/kernels/test_triton_lowering.py steps gpt2, qwen2, llama3, gemma2 and qwen3 files; these two
add phi3's fused QKV and fused gate/up projections, and gemma3's per-head Q/K norms, 5:1 sliding
windows and local rotary base. Same check: the decoder's logits at every step of a 9-token prefill
and 4 decode steps (past gemma's window of 4) within 1e-4 of the range of transformers' logits on
the same weights; and (slow) the same for files whose linears are quantized.
"""

import numpy as np
import pytest

from triton_interpreted import import_interpreted  # noqa: E402  tests/support

import_interpreted("isthmus.compiler.lower.triton")

pytestmark = pytest.mark.usefixtures("triton_interpreter")     # tests/kernels/conftest.py

import isthmus  # noqa: E402
from hf_gguf import hf_logits, hf_model, transformers_reading, write_gguf  # noqa: E402
from isthmus.compiler.frontends import load_model  # noqa: E402

IDS = [3, 17, 5, 60, 22, 9, 41, 7, 2, 88, 14, 30, 20]
PREFILL = 9


@pytest.mark.parametrize("arch", ["phi3", "gemma3"])
def test_decoder_of_gguf_families_matches_transformers(arch, tmp_path):
    hf = hf_model(arch)
    want = hf_logits(hf, IDS)
    dec = isthmus.compile(load_model(write_gguf(hf, tmp_path / "m.gguf", arch)), target="triton").decoder()
    assert type(dec).__name__ == "TritonDecoder"
    got = [np.array(dec.step(IDS[:PREFILL]))] + [np.array(dec.step([t])) for t in IDS[PREFILL:]]
    for i, row in enumerate(got):
        np.testing.assert_allclose(row, want[PREFILL - 1 + i], rtol=0, atol=1e-4 * np.ptp(want), err_msg=f"step {i}")


@pytest.mark.slow           # 1-4 s each under the interpreter
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q5_1"])
@pytest.mark.parametrize("arch", ["phi3", "gemma3"])
def test_quantized_files_match_transformers_reading_the_same_file(arch, quant, tmp_path):
    """Linears quantized by the gguf package's quantizer (tests/compiler/test_gguf_quantized_families.py
    checks reference and numba on the same files); the triton decoder reads the same numbers as
    transformers (measured: up to 6e-7 of the range)."""
    hf = hf_model(arch, hidden_size=96, intermediate_size=256)
    path = write_gguf(hf, tmp_path / "q.gguf", arch, quant=quant)
    want = hf_logits(transformers_reading(hf, path), IDS)
    dec = isthmus.compile(load_model(path), target="triton").decoder()
    got = [np.array(dec.step(IDS[:PREFILL]))] + [np.array(dec.step([t])) for t in IDS[PREFILL:]]
    for i, row in enumerate(got):
        np.testing.assert_allclose(row, want[PREFILL - 1 + i], rtol=0, atol=1e-4 * np.ptp(want), err_msg=f"step {i}")

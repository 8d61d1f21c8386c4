"""K-quant GGUF files (llama.cpp's Q4_K_M: q4_k, with q6_k for the output or tied embedding and for
layer 1's V - phi3's and gpt2's fused QKV - and ffn_down) of every GGUF family, against
transformers reading the same file.

The files are committed (tests/data/kquant_families/, made by its make.py with llama.cpp's own
quantizer, llama-cpp-python of the `peers` extra), so these tests need no llama.cpp: tiny models
(2 layers, widths 256, so llama.cpp keeps its k-quants rather than falling back to q5_0 / q8_0)
trained a few steps on a fixed text, so greedy choices have margins. The oracle is transformers
loading the GGUF itself, dequantizing the k-quant blocks with the gguf package, independently of
isthmus (tests/support/hf_gguf.py: transformers_reading), given the config.json saved beside
each file (its GGUF reader does not recover these tiny configs from the metadata).
"""

from __future__ import annotations

import collections
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hf_gguf import hf_logits, transformers_reading

import isthmus
from isthmus.compiler.frontends import load_model
from isthmus.compiler.frontends.gguf import read_gguf
from isthmus.kernels.numba.kquant_simd import I8_FORMATS

DATA = Path(__file__).resolve().parents[1] / "data" / "kquant_families"
FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2"]
TEXT = "the quick brown fox jumps"     # make.py's training text begins so; its tokens are ASCII - 32
IDS = [ord(c) - 32 for c in TEXT][:16]       # past gemma's window of 4
PREFILL = 10                                 # more than 8 tokens: numba's prefill runs in f32
# numba's q4_k / q6_k decode dot products round activations to i8 per 256 values (llama.cpp's q8_K)
# where the host has AVX-512 VNNI, i16 elsewhere
NUMBA_TOL = 2e-2 if I8_FORMATS else 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(family, file, transformers' reading of it, isthmus's model of it)."""
    import transformers as tf

    arch = request.param
    path = DATA / arch / "q4_k_m.gguf"
    config = tf.AutoConfig.from_pretrained(DATA / arch)
    return arch, path, transformers_reading(SimpleNamespace(config=config), path), load_model(path)


def test_the_files_hold_llama_cpp_k_quants(family):
    arch, path, _, model = family
    types = collections.Counter(read_gguf(path).tensor_types.values())
    assert set(types) == {"F32", "Q4_K", "Q6_K"} and types["Q6_K"] >= 3, types      # norms and biases f32
    assert set(model.quantization()) >= {"q4_k", "q6_k"}


@pytest.mark.parametrize("target", ["reference", "numba"])
def test_k_quant_files_match_transformers_reading_the_same_file(family, target):
    """Every step of a 10-token prefill and 6 decode steps. Reference: 2e-6 of the logits' range;
    numba: 2e-2 with i8 activations (VNNI), 1e-4 otherwise."""
    arch, _, hf, model = family
    want = hf_logits(hf, IDS)
    tol = {"reference": 2e-6, "numba": NUMBA_TOL}[target]
    dec = isthmus.compile(model, target=target).decoder()
    got = [np.array(dec.step(IDS[:PREFILL]))] + [np.array(dec.step([t])) for t in IDS[PREFILL:]]   # copies:
    err = [np.abs(row - want[PREFILL - 1 + i]).max() / np.ptp(want) for i, row in enumerate(got)]  # in place
    print(f"{arch} {target}: prefill {err[0]:.2e}, decode max {max(err[1:]):.2e} of the range")
    for i, row in enumerate(got):
        np.testing.assert_allclose(row, want[PREFILL - 1 + i], rtol=0, atol=tol * np.ptp(want),
                                   err_msg=f"{arch} {target} step {i}")


def test_numba_greedy_continuation_is_transformers(family):
    """12 tokens after "the quick ": the text the models were trained on, "brown fox ju", in every
    family (greedy margins 4-88 % of the logits' range in transformers' reading of the files)."""
    import torch

    arch, _, hf, model = family
    prompt = IDS[:PREFILL]
    with torch.no_grad():         # the mask given: token 0 (' ') is also the pad token
        want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = want[0, len(prompt):].tolist()
    dec = isthmus.compile(model, target="numba").decoder()
    got, logits = [], dec.step(prompt)
    for _ in range(12):
        got.append(int(np.argmax(logits)))
        logits = dec.step(got[-1:])
    print(f"{arch} greedy: {TEXT[:PREFILL]!r} + {''.join(chr(t + 32) for t in got)!r}")
    assert got == want, (arch, "".join(chr(t + 32) for t in got), "".join(chr(t + 32) for t in want))
    assert "".join(chr(t + 32) for t in want) == "brown fox ju"        # not a choice between near-ties


def test_isthmus_info_shows_the_k_quant_types(capsys):
    from cli_runner import run

    rc, out, err = run(capsys, "info", DATA / "phi3" / "q4_k_m.gguf")
    assert rc == 0, err
    assert "architecture    phi3" in out
    line = next(x for x in out.splitlines() if x.startswith("quantization"))
    assert "q4_k x" in line and "q6_k x" in line, line

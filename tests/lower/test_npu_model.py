"""The default model (SmolLM2-135M-Instruct, Q4_1) on the NPU target end to end (slow: needs the
pulled model; each decode step simulates ~30k instructions)."""

import time

import numpy as np
import pytest

import isthmus
from isthmus.runtime.generate import generate
from isthmus.runtime.sampling import SamplingParams

pytestmark = pytest.mark.slow
from default_prompts import PROMPTS  # tests/support


@pytest.fixture(scope="module")
def npu_exe(default_model):
    return isthmus.compile(default_model, target="npu")


def test_compile_time(default_model):
    t0 = time.perf_counter()
    exe = isthmus.compile(default_model, target="npu")
    seconds = time.perf_counter() - t0
    assert exe.spec is not None and len(exe.spec.layers) == 30
    assert seconds < 10.0, f"compiling for the NPU took {seconds:.1f} s"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_reference(default_model, default_exe, npu_exe, prompt):
    ids = default_model.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    want = list(generate(default_exe, ids, params))
    got = list(generate(npu_exe, ids, params))
    tok = default_model.tokenizer
    assert got == want, (tok.decode(got), tok.decode(want))
    assert len(got) == 20


def test_logits_close_to_reference(default_model, default_exe, npu_exe):
    ids = default_model.tokenizer.encode(PROMPTS[0])
    ref, dec = default_exe.decoder(), npu_exe.decoder()
    a, b = ref.step(ids), dec.step(ids)
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
    a, b = ref.step([int(a.argmax())]), dec.step([int(b.argmax())])
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()

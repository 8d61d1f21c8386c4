"""Adding a decoder architecture touches its frontend only.

tests/support/sandwich_model.py defines an architecture no module of isthmus knows (its frontend
records the decoder interface under names of its own); every target's decoder, batched decoding
and greedy generation must agree with the architecture's numpy definition. (The triton target's
check is in tests/kernels/test_triton_lowering.py, which needs a process of its own.)
"""

from __future__ import annotations

import numpy as np
import pytest
from sandwich_model import CFG, numpy_logits, sandwich_model

import isthmus

PROMPT, MORE = [5, 17, 3, 44, 9, 71], [[12], [30], [2, 8]]


def _close(got, want):
    # f32 kernels (dot products of 64..96 terms, two layers, soft-capped logits up to 30) against an
    # f64 definition: 2e-4 of the logits' range, far below the gaps greedy decoding depends on here
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("target", ["reference", "numba", "npu"])
def test_every_target_decodes_the_new_architecture_as_its_definition_says(target):
    model = sandwich_model()
    exe = isthmus.compile(model, target=target)
    dec = exe.decoder()
    seen = list(PROMPT)
    _close(dec.step(PROMPT), numpy_logits(seen)[-1])
    for ids in MORE:
        seen += ids
        _close(dec.step(ids), numpy_logits(seen)[-1])
    assert dec.length == len(seen)
    if target == "numba":       # the fused qkv kernel found the interface's caches: decoding in place
        assert type(dec).__name__ == "NumbaDecoder"


def test_batched_decode_and_greedy_generation_follow_the_definition():
    from isthmus.compiler.batch import decode_batch
    from isthmus.runtime.generate import generate
    from isthmus.runtime.sampling import SamplingParams

    model = sandwich_model()
    ref = isthmus.compile(model, target="reference")
    decoders = [ref.decoder(), ref.decoder()]
    prompts = [PROMPT, PROMPT[:3]]
    for d, p in zip(decoders, prompts):
        d.step(p)
    got = decode_batch(ref, decoders, [11, 23])                    # one batched graph run for both
    _close(got[0], numpy_logits(PROMPT + [11])[-1])
    _close(got[1], numpy_logits(PROMPT[:3] + [23])[-1])

    params = SamplingParams(max_tokens=6, temperature=0.0)
    want, seq = [], list(PROMPT)
    for _ in range(6):
        want.append(int(np.argmax(numpy_logits(seq)[-1])))
        seq.append(want[-1])
    for target in ("reference", "numba"):
        assert list(generate(isthmus.compile(model, target=target), PROMPT, params)) == want, target


def test_the_kernel_targets_fuse_the_new_block_with_their_existing_groups():
    from isthmus.compiler.lower.plan import label

    exe = isthmus.compile(sandwich_model(), target="numba")
    per_layer = [label(st) for st in exe.plan.steps][1:1 + len(exe.plan.steps) // CFG["layers"]]
    assert per_layer[:2] == ["linear+norm+qkv", "attention"]
    assert "linear" in per_layer and "gelu" in per_layer and "rmsnorm" in per_layer

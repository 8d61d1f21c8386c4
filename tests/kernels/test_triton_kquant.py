"""`--target triton` on a tiny Llama in the GGUF block formats the triton kernels have no kernel
for (q5_0, q5_1, iq4_nl, q2_k..q6_k; tests/support/kquant_model.py): the lowering uploads those
weights dequantized, and the logits match the reference target (TRITON_INTERPRET=1, f32)."""

import numpy as np
import pytest

from triton_interpreted import import_interpreted  # noqa: E402  tests/support

import_interpreted("isthmus.compiler.lower.triton")

import ggml_ref  # noqa: E402  tests/support
import isthmus  # noqa: E402

pytestmark = [pytest.mark.usefixtures("triton_interpreter"),
              pytest.mark.skipif(not ggml_ref.available(), reason="needs llama-cpp-python (peers extra)")]


def test_decoder_matches_reference():
    from kquant_model import kquant_model

    model = kquant_model()
    ref = isthmus.compile(model, target="reference").decoder()
    dec = isthmus.compile(model, target="triton").decoder()
    assert type(dec).__name__ == "TritonDecoder"
    for ids in ([5, 17, 60, 3], [7], [8, 9]):
        want, got = ref.step(ids), dec.step(ids)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

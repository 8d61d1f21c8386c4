"""`--target triton` on a tiny Llama in the GGUF block formats the triton kernels have no kernel
for (q5_0, q5_1, iq4_nl, q2_k..q6_k; tests/support/kquant_model.py): the lowering uploads those
weights dequantized, and the logits match the reference target (TRITON_INTERPRET=1, f32)."""

import os

import numpy as np
import pytest

_SAVED = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"    # triton.jit reads it when it decorates: set before triton is imported
try:
    pytest.importorskip("torch")
    triton = pytest.importorskip("triton")
    if type(triton.language.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 earlier in this process; run "
                    "tests/kernels/test_triton_*.py in a process of their own", allow_module_level=True)
    import isthmus.compiler.lower.triton as LOWERING  # noqa: F401
finally:                                # the rest of the session sees the variable as it was
    if _SAVED is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED

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

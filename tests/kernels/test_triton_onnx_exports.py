"""`--target triton` (TRITON_INTERPRET=1 on CPU) on ONNX decoders as published: the committed
Optimum and onnxruntime-genai exports and a torch.onnx dynamo export with its cache (see
tests/compiler/test_onnx_published.py, which checks the other targets against onnxruntime and
transformers). Their decoder record names an attention mask, which the triton in-place decoder
does not feed: generation takes the functional decoder and gives the reference target's tokens.
"""

from pathlib import Path

import pytest

from triton_interpreted import import_interpreted  # noqa: E402  tests/support

import_interpreted("isthmus.compiler.lower.triton")

pytestmark = pytest.mark.usefixtures("triton_interpreter")     # tests/kernels/conftest.py

import isthmus  # noqa: E402
from isthmus.compiler.frontends import load_model  # noqa: E402
from isthmus.compiler.kv_cache import FunctionalDecoder  # noqa: E402
from isthmus.runtime.generate import generate  # noqa: E402
from isthmus.runtime.sampling import SamplingParams  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module", params=["optimum/llama", "optimum/gpt2", "genai/fp32", "genai/int4",
                                        "genai/int4-shared", "dynamocache-llama", "dynamo-gpt2"])
def folder(request, tmp_path_factory):
    if request.param.startswith("dynamo"):
        from onnx_exports import exported

        return exported(*request.param.split("-"), tmp_path_factory)[0]
    return DATA / request.param


def test_generation_on_triton_matches_the_reference_target(folder):
    model = load_model(folder)
    exe, ref = isthmus.compile(model, target="triton"), isthmus.compile(model, target="reference")
    assert isinstance(exe.decoder(), FunctionalDecoder)
    ids = [5, 6, 7, 8, 9, 10]
    ours = list(generate(exe, ids, SamplingParams(max_tokens=10), stop_ids=()))
    assert ours == list(generate(ref, ids, SamplingParams(max_tokens=10), stop_ids=()))

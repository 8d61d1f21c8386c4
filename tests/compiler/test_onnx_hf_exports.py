"""ONNX frontend on Hugging Face models as optimum exports them (the TorchScript exporter,
dynamic batch and sequence, an attention_mask input): tiny random-weight Llama and GPT-2
built from configs (nothing is downloaded), run against onnxruntime with left padding.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from isthmus.compiler.frontends.onnx import load_onnx  # noqa: E402
from isthmus.compiler.targets import compile_model  # noqa: E402

VOCAB = 100


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _export(model, path) -> str:
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(_LogitsOnly(model.eval()), (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes})
    return str(path)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    return _export(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("hf_llama") / "model.onnx")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=72, n_layer=2, n_head=3, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return _export(transformers.GPT2LMHeadModel(cfg), tmp_path_factory.mktemp("hf_gpt2") / "model.onnx")


def _compare(path):
    exe = compile_model(load_onnx(path))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b, s in ((1, 5), (2, 9)):
        feeds = {"input_ids": rng.integers(0, VOCAB, (b, s)).astype(np.int64),
                 "attention_mask": np.ones((b, s), np.int64)}
        feeds["attention_mask"][-1, :2] = 0        # left padding on the last row
        ours, theirs = exe.run(feeds)["logits"], sess.run(["logits"], feeds)[0]
        assert ours.shape == theirs.shape == (b, s, VOCAB)
        assert np.abs(ours - theirs).max() <= 1e-4
    return exe


def _attention_keeps_padding_mask(exe):
    nodes = [n for n in exe.graph.nodes if n.op == "attention"]
    assert len(nodes) == 2
    for n in nodes:       # the padding mask is data: kept as attention's 4th input, not causal
        assert n.attrs["causal"] is False and len(n.inputs) == 4


def test_hf_llama_sdpa(hf_llama):
    exe = _compare(hf_llama)
    hist = exe.graph.op_histogram()
    assert hist.get("rmsnorm") == 5 and hist.get("swiglu") == 2, hist
    assert "softmax" not in hist and "reduce_mean" not in hist
    _attention_keeps_padding_mask(exe)


def test_hf_gpt2_eager(hf_gpt2):
    exe = _compare(hf_gpt2)
    hist = exe.graph.op_histogram()
    assert hist.get("layernorm") == 5 and hist.get("gelu") == 2, hist
    assert "softmax" not in hist and "tanh" not in hist
    _attention_keeps_padding_mask(exe)

"""ONNX imports on the NPU target (the per-op lowering): a GPT-2 and a Llama exported by torch
(dynamo, a dynamic sequence) and Hugging Face's Llama and GPT-2 with a left-padded attention mask
(their boolean mask arithmetic runs on the host), against the reference target."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from isthmus.compiler.frontends.onnx import load_onnx  # noqa: E402
from isthmus.compiler.lower.npu.target import lower_npu  # noqa: E402
from isthmus.compiler.targets import compile_model  # noqa: E402

HERE = Path(__file__).parent


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("npu_onnx")
    dyn = _module(HERE.parent / "compiler" / "test_onnx_frontend.py", "_onnx_frontend_tests")
    hf = _module(HERE.parent / "compiler" / "test_onnx_hf_exports.py", "_onnx_hf_tests")
    torch.manual_seed(1)
    out = {"gpt2": dyn._export(dyn.TinyGPT2(), d / "gpt2.onnx")}
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    out["hf_llama"] = hf._export(transformers.LlamaForCausalLM(cfg), d / "hf_llama.onnx")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=72, n_layer=2, n_head=3, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    out["hf_gpt2"] = hf._export(transformers.GPT2LMHeadModel(cfg), d / "hf_gpt2.onnx")
    return out


@pytest.mark.parametrize("name", ["gpt2", "hf_llama", "hf_gpt2"])
def test_onnx_model_matches_reference(exports, name):
    graph = load_onnx(exports[name])
    ref = compile_model(graph, target="reference")
    exe = lower_npu(ref.graph, precision="bf16x3", check_races=True)
    rng = np.random.default_rng(0)
    for seq in (5, 9):
        if name.startswith("hf"):        # left padding: the padded rows' attention is fully masked
            feeds = {"input_ids": rng.integers(0, 100, (2, seq)), "attention_mask": np.ones((2, seq), np.int64)}
            feeds["attention_mask"][1, :2] = 0
        else:
            feeds = {"input_ids": rng.integers(0, 100, (1, seq))}
        want, got = ref.run(feeds)["logits"], exe.run(feeds)["logits"]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

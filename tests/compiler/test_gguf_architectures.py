"""GGUF files of each architecture isthmus reads, against transformers running the same weights.

tests/support/hf_gguf.py writes tiny random transformers models (llama, llama with llama3 rope
scaling, qwen2, qwen3, phi3, gemma2, gemma3, gpt2) as llama.cpp's converter lays them out; isthmus loads the file, and its
decoder's logits at every step of a prefill and decode must match the transformers model's (f32
both: within 1e-4 of the logits' range). The same tiny models saved by `save_pretrained`
(config.json + safetensors) go through the safetensors frontend against the same oracle. A setting
or tensor isthmus does not apply is an error naming it, never a run with wrong numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_gguf import hf_logits, hf_model, write_gguf

import isthmus
from isthmus.compiler.frontends import load_model
from isthmus.errors import UnsupportedError

ARCHS = ["llama", "llama3", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2"]
IDS = [3, 17, 5, 60, 22, 9, 41, 7, 2, 88, 14, 30, 20, 33, 1, 70, 19]     # 17 positions: past llama3's 16
PREFILL = 10


@pytest.fixture(scope="module", params=ARCHS)
def arch_file(request, tmp_path_factory):
    model = hf_model(request.param)
    path = write_gguf(model, tmp_path_factory.mktemp(request.param) / f"{request.param}.gguf", request.param)
    return request.param, model, path


@pytest.mark.parametrize("target", ["reference", "numba", "npu"])
def test_decoder_logits_match_transformers(arch_file, target):
    arch, hf, path = arch_file
    model = load_model(path)
    assert model.config["architecture"] == ("llama" if arch == "llama3" else arch)
    want = hf_logits(hf, IDS)
    dec = isthmus.compile(model, target=target).decoder()
    got = [np.array(dec.step(IDS[:PREFILL]))] + [np.array(dec.step([t])) for t in IDS[PREFILL:]]
    for i, row in enumerate(got):
        np.testing.assert_allclose(row, want[PREFILL - 1 + i], rtol=0, atol=1e-4 * np.ptp(want), err_msg=f"step {i}")
    if target == "numba":        # every family here decodes through the fused qkv kernel, in place
        assert type(dec).__name__ == "NumbaDecoder"


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2"])
def test_safetensors_checkpoints_of_the_families_match_transformers(arch, tmp_path):
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path)                      # config.json + model.safetensors, as published
    model = load_model(tmp_path)
    assert model.format == "safetensors" and model.config["architecture"] == ("llama" if arch == "llama3" else arch)
    want = hf_logits(hf, IDS)
    dec = isthmus.compile(model, target="numba").decoder()
    got = [np.array(dec.step(IDS[:PREFILL]))] + [np.array(dec.step([t])) for t in IDS[PREFILL:]]
    for i, row in enumerate(got):
        np.testing.assert_allclose(row, want[PREFILL - 1 + i], rtol=0, atol=1e-4 * np.ptp(want), err_msg=f"step {i}")


@pytest.mark.parametrize("arch, setting, said", [
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ("gemma2", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling on the sliding-window layers"),
    ("gemma3", {"layer_types": ["chunked_attention"] + ["full_attention"] * 5}, "layer_types holds 'chunked_attention'"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0},
                                    "sliding_attention": {"rope_type": "default"}}}, "rope scaling 'yarn'"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx True is not applied"),
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu' is not supported")])
def test_safetensors_settings_isthmus_does_not_apply_are_errors_naming_them(arch, setting, said, tmp_path):
    """config.json as saved, with one setting changed that transformers would apply."""
    import json

    hf_model(arch).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(UnsupportedError, match=said):
        load_model(tmp_path)


@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_bf16_safetensors_checkpoints_match_transformers_reading_them(arch, tmp_path):
    """bf16 weights (GPT-2's Conv1D transposed as 16-bit values, Gemma's norms widened to add their 1);
    GPT-2 laid out as openai-community/gpt2 is: no `transformer.` prefix, causal-mask buffers kept."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file, save_file

    hf_model(arch).to(torch.bfloat16).save_pretrained(tmp_path)
    if arch == "gpt2":
        sd = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
        for i in range(2):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    oracle = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    want = hf_logits(oracle, IDS)[-1]
    model = load_model(tmp_path)
    assert "bf16" in model.quantization()
    got = isthmus.compile(model, target="reference").decoder().step(IDS)
    np.testing.assert_allclose(np.reshape(got, -1), want, rtol=0, atol=1e-4 * np.ptp(want))


def test_multimodal_gemma3_and_stray_tensors_are_refused(tmp_path):
    import json

    from safetensors.numpy import save_file

    hf_model("gemma2").save_pretrained(tmp_path / "g")          # a gemma3 norm in a gemma2 checkpoint
    save_file({"model.layers.0.self_attn.q_norm.weight": np.zeros(16, np.float32)}, str(tmp_path / "g" / "x.safetensors"))
    with pytest.raises(UnsupportedError, match="tensor model.layers.0.self_attn.q_norm.weight is not applied"):
        load_model(tmp_path / "g")
    hf_model("gpt2").save_pretrained(tmp_path)
    stray = tmp_path / "extra.safetensors"
    save_file({"transformer.h.0.attn.c_attn.lora_A": np.zeros((4, 72), np.float32)}, str(stray))
    with pytest.raises(UnsupportedError, match="tensor transformer.h.0.attn.c_attn.lora_A is not part of the gpt2"):
        load_model(tmp_path)
    stray.unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gemma3"}))
    with pytest.raises(UnsupportedError, match="model_type 'gemma3' is the multimodal Gemma 3"):
        load_model(tmp_path)


def test_a_sliding_window_checkpoint_is_refused(tmp_path):
    hf_model("mistral", sliding_window=8).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError, match="sliding_window 8 is not applied"):
        load_model(tmp_path)


def test_llama3_rope_freqs_are_applied(tmp_path):
    """The file's rope_freqs change the logits measurably (2.6e-3 of the range here if dropped)."""
    from isthmus.compiler.frontends.gguf import read_gguf
    from isthmus.compiler.frontends.gguf_arch import config_from_gguf

    path = write_gguf(hf_model("llama3"), tmp_path / "l3.gguf", "llama3")
    config = config_from_gguf(read_gguf(path))
    assert len(config["rope_factors"]) == 6 and config["rope_factors"][1:] == [8.0] * 5
    assert 1.0 < config["rope_factors"][0] < 8.0                    # the smoothed band


def _error(tmp_path, **kw) -> str:
    path = write_gguf(hf_model("qwen2"), tmp_path / "q.gguf", "qwen2", **kw)
    with pytest.raises(UnsupportedError) as e:
        load_model(path)
    return str(e.value)


@pytest.mark.parametrize("key, value, said", [
    ("qwen2.rope.scaling.type", "yarn", "rope scaling 'yarn' is not supported"),
    ("qwen2.attention.sliding_window", 64, "qwen2.attention.sliding_window = 64 is a qwen2 setting isthmus does not apply"),
    ("qwen2.expert_count", 8, "qwen2.expert_count is 8: mixture-of-experts"),
    ("qwen2.attn_logit_softcapping", 50.0, "qwen2.attn_logit_softcapping = 50.0 is a qwen2 setting")])
def test_settings_isthmus_does_not_apply_are_errors_naming_them(tmp_path, key, value, said):
    assert said in _error(tmp_path, extra_metadata={key: value})


def test_tensors_isthmus_does_not_apply_are_errors_naming_them(tmp_path):
    message = _error(tmp_path, extra_tensors={"blk.0.attn_post_norm.weight": np.ones(72, np.float32)})
    assert "blk.0.attn_post_norm.weight" in message and "wrong numbers" in message


def test_an_unknown_architecture_names_the_supported_ones(tmp_path):
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "f.gguf"), "falcon")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="architecture 'falcon' is not supported; supported: llama, qwen2"):
        load_model(tmp_path / "f.gguf")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_windows_and_caps_matter(arch, tmp_path):
    """Without the sliding windows (and gemma2's soft caps) the same file gives other logits: the
    oracle test above would notice them missing."""
    from isthmus.compiler.frontends.gemma import build_gemma
    from isthmus.compiler.frontends.gguf import read_gguf
    from isthmus.compiler.frontends.gguf_arch import config_from_gguf

    path = write_gguf(hf_model(arch), tmp_path / "g.gguf", arch)
    f = read_gguf(path)
    config = config_from_gguf(f)
    assert config["sliding"] == ([True, False] if arch == "gemma2" else [True] * 5 + [False])
    full = isthmus.compile(load_model(path), target="reference").decoder().step(IDS)
    for change in ({"sliding": [False] * config["n_layers"]}, {"attn_softcap": 0.0, "final_softcap": 0.0}):
        if arch == "gemma3" and "attn_softcap" in change:
            continue
        from isthmus.compiler.frontends import Model
        g = build_gemma({**config, **change}, f.tensors)
        other = isthmus.compile(Model(g, "x", "gguf", config), target="reference").decoder().step(IDS)
        assert np.abs(other - full).max() > 1e-3 * np.ptp(full), change


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gemma2", "gpt2"])
def test_isthmus_info_and_chat_on_a_file_of_each_family(arch, tmp_path, capsys):
    """The CLI on a GGUF carrying a byte-level BPE vocabulary and a ChatML template: the reply is
    transformers' greedy continuation of the same prompt tokens."""
    import torch
    from cli_runner import run
    from gguf_vocabs import TEMPLATE, train_bpe

    vocab = train_bpe()
    hf = hf_model(arch, vocab_size=len(vocab[0]))
    path = write_gguf(hf, tmp_path / f"{arch}.gguf", arch, vocab=vocab, template=TEMPLATE)
    rc, out, err = run(capsys, "info", path)
    assert rc == 0 and f"architecture    {arch}" in out, err
    rc, out, err = run(capsys, "chat", "--model", path, "--max-tokens", "8", "the quick fox")
    assert rc == 0, err
    tok = load_model(path).tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "the quick fox"}]))
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=0)[0, len(prompt):].tolist()
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    assert out.strip() == tok.decode(ids).strip()


# the formats the gguf package can quantize (k-quant files, made by llama.cpp's own quantizer, are
# tests/compiler/test_gguf_quant_types.py's)
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_files_match_transformers_reading_the_same_file(arch, quant, tmp_path):
    """Linears quantized by the gguf package's own quantizer; the oracle is transformers loading the
    GGUF itself (it dequantizes with the gguf package; for these two families its reading of the f32
    files is exact). Quantization moves the logits by 0.4-6 % of their range; isthmus reads the same
    numbers (reference: 1e-6 of the range; numba, whose decode kernels quantize activations to i16
    per 32-block: 1e-4)."""
    import transformers as tf

    hf = hf_model(arch, hidden_size=96, intermediate_size=256)
    write_gguf(hf, tmp_path / "q.gguf", arch, quant=quant)
    oracle = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf")
    want = hf_logits(oracle, IDS)[-1]
    model = load_model(tmp_path / "q.gguf")
    assert set(model.quantization()) >= {quant.lower()}
    for target, tol in (("reference", 1e-6), ("numba", 1e-4)):
        got = isthmus.compile(model, target=target).decoder().step(IDS)
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.ptp(want), err_msg=target)

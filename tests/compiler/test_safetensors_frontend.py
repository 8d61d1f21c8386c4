"""The safetensors frontend against transformers: tiny random Llama checkpoints written by
`save_pretrained` (f32, f16, bf16, tied and untied embeddings, sharded) must give transformers'
logits, KV-cache decoding and greedy continuations; malformed folders end in one-line errors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import isthmus  # noqa: E402
from isthmus.compiler.frontends import load_model  # noqa: E402
from isthmus.compiler.frontends.safetensors import load_safetensors, read_safetensors  # noqa: E402
from isthmus.errors import ModelFormatError, UnsupportedError  # noqa: E402
from isthmus.runtime.generate import generate  # noqa: E402
from isthmus.runtime.sampling import SamplingParams  # noqa: E402

VOCAB = 300
# hidden 48 is not a multiple of 64; 6 query heads share 2 KV heads (GQA).
HF_CONFIG = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
                 rope_theta=500.0, bos_token_id=1, eos_token_id=2)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOL = 1e-4

# name -> (dtype saved, tie_word_embeddings, max_shard_size)
VARIANTS = {
    "f32": (torch.float32, False, None),
    "f32-tied": (torch.float32, True, None),
    "bf16": (torch.bfloat16, False, None),
    "bf16-tied": (torch.bfloat16, True, None),
    "f32-sharded": (torch.float32, False, "20KB"),
    "f16-tied-sharded": (torch.float16, True, "20KB"),
}


def _hf_tokenizer():
    """A byte-level BPE trained on a few lines, with chat control tokens, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog 42 times.",
                             "café naïve 日本語 🙂 — tokenizers say hello"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == VOCAB
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _randomize(model, seed):
    """Weights of a scale that gives O(1) activations and logits, unlike the 0.02-std init,
    so that a 1e-4 agreement means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def _save(folder, variant, seed=0):
    dtype, tied, shard = VARIANTS[variant]
    config = transformers.LlamaConfig(**HF_CONFIG, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    _randomize(model, seed)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    _hf_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(variant, isthmus Model, its reference Executable, the transformers oracle loaded from the same folder)."""
    folder = _save(tmp_path_factory.mktemp(request.param), request.param)
    model = load_model(folder)
    oracle = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, model, isthmus.compile(model, target="reference"), oracle


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("good"), "f32")


@pytest.fixture
def folder(good_folder, tmp_path):
    """A fresh copy of a valid f32 checkpoint, for a test to break."""
    return shutil.copytree(good_folder, tmp_path / "ckpt")


def _run(exe, ids, past=None, start=0):
    """One pass of the decoder graph over `ids` [batch, seq] after `past` (outputs of the previous pass)."""
    ids = np.asarray(ids, np.int64)
    feeds = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(start, start + ids.shape[1]), ids.shape)}
    for v in exe.graph.inputs:
        if v.name.startswith("past_"):
            shape = [ids.shape[0] if d == "batch" else 0 if isinstance(d, str) else d for d in v.shape]
            feeds[v.name] = np.zeros(shape, np.float32) if past is None else past["present" + v.name[4:]]
    return exe.run(feeds)


def _hf_logits(oracle, ids):
    with torch.no_grad():
        return oracle(torch.tensor(np.asarray(ids))).logits.numpy()


def _prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, VOCAB, n).tolist() for n in (1, 6, 23)]


# --- numerics against transformers -----------------------------------------------------------

def test_logits_match_transformers(checkpoint):
    _, _, exe, oracle = checkpoint
    for ids in _prompts():
        ours = _run(exe, [ids])["logits"]
        ref = _hf_logits(oracle, [ids])
        assert ours.shape == ref.shape == (1, len(ids), VOCAB)
        assert np.abs(ours - ref).max() <= TOL
        assert np.abs(ref).max() > 1.0      # the comparison is not between two near-zero arrays


def test_batched_logits_match_transformers(checkpoint):
    _, _, exe, oracle = checkpoint
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 9))
    assert np.abs(_run(exe, ids)["logits"] - _hf_logits(oracle, ids)).max() <= TOL


def test_kv_cache_decode_matches_one_full_pass(checkpoint):
    _, _, exe, oracle = checkpoint
    ids = _prompts()[2]
    full = _run(exe, [ids])["logits"][0]
    prefill = 9
    out = _run(exe, [ids[:prefill]])
    steps = [out["logits"][0]]
    for t in range(prefill, len(ids)):
        out = _run(exe, [ids[t:t + 1]], past=out, start=t)
        steps.append(out["logits"][0])
    assert out["present_key.0"].shape == (1, HF_CONFIG["num_key_value_heads"], len(ids), 8)
    cached = np.concatenate(steps)
    assert np.abs(cached - full).max() <= TOL
    assert np.abs(cached - _hf_logits(oracle, [ids])[0]).max() <= TOL


def test_greedy_continuation_matches_transformers(checkpoint):
    _, _, exe, oracle = checkpoint
    for ids in _prompts()[1:]:
        ours = list(generate(exe, ids, SamplingParams(max_tokens=16), stop_ids=()))
        with torch.no_grad():
            # eos_token_id=None as a keyword (not in a GenerationConfig, where None means "use the
            # model's") makes transformers run past the end token, as stop_ids=() does here.
            ref = oracle.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
        assert len(ours) == 16 and ours == ref


def test_the_numba_decoder_reads_every_dtype(checkpoint):
    """bf16 and f16 norms and embeddings reach the kernels as f32 (bf16 norms once failed to bind)."""
    _, model, _, oracle = checkpoint
    ids = _prompts()[2]
    dec = isthmus.compile(model, target="numba").decoder()
    got = np.stack([dec.step(ids[:9]).copy()] + [dec.step([t]).copy() for t in ids[9:]])
    want = _hf_logits(oracle, [ids])[0, 8:]
    assert np.abs(got - want).max() <= TOL


def test_config_and_weights_are_views(checkpoint):
    variant, model, _, _ = checkpoint
    c = model.config
    assert model.format == "safetensors" and model.is_decoder
    assert (c["hidden"], c["ffn"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["head_dim"]) == (48, 80, 2, 6, 2, 8)
    assert (c["rope_theta"], c["rms_eps"], c["context_length"], c["vocab_size"]) == (500.0, 1e-5, 64, VOCAB)
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert c["tied_embeddings"] == VARIANTS[variant][1]
    names = {v.name for v in model.graph.constants}
    assert ("output.weight" in names) != c["tied_embeddings"]
    for v in model.graph.constants:
        if v.name == "token_embd.weight" and variant.startswith("f16"):
            continue     # the one table widened to f32 (see load_safetensors)
        data = v.data.raw if hasattr(v.data, "raw") else v.data
        assert not data.flags.writeable and not data.flags.owndata, v.name   # a view of the mapped file
    expected = {"f32": "f32", "bf16": "bf16", "f16": "f16"}[variant.split("-")[0]]
    assert model.graph.constants[1].dtype == expected
    shards = list(Path(model.path).glob("*.safetensors"))
    assert len(shards) > 2 if "sharded" in variant else len(shards) == 1
    assert (Path(model.path) / "model.safetensors.index.json").exists() == ("sharded" in variant)


def test_tokenizer_matches_transformers(good_folder):
    model = load_model(good_folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(good_folder)
    tok = model.tokenizer
    assert tok is not None and tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2
    texts = ["hello world", " the  lazy\n\ndog 1234", "café 🙂 日本語", "<|im_start|>user\nhi<|im_end|>\n", ""]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids, text
        assert tok.decode(ids) == hf_tok.decode(ids), text
        assert tok.decode(ids, skip_special=True) == hf_tok.decode(ids, skip_special_tokens=True), text
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                {"role": "user", "content": "again"}]
    assert tok.apply_chat_template(messages) == hf_tok.apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
    assert model.chat_template == CHAT_TEMPLATE


def test_sentencepiece_style_tokenizer_json(tmp_path):
    """Llama 2's tokenizer.json shape: "▁" for spaces, <0xAB> byte tokens, Replace/ByteFallback/Fuse/Strip."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    from isthmus.compiler.frontends.hf_tokenizer import tokenizer_from_hf

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "\u2581abcdefghijklmnopqrstuvwxyz.,":
        vocab.setdefault(c, len(vocab))
    sp = "\u2581"
    merges = [(sp, "t"), ("h", "e"), (sp + "t", "he"), ("l", "l"), ("e", "ll"), (sp, "h"), (sp + "h", "ell")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = tokenizer_from_hf(tmp_path, json.loads((tmp_path / "tokenizer_config.json").read_text()))
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    for text in ["hello the world", "the café 日本 ok</s>", " x", "tell\n\nhe"]:
        ids = ours.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False).input_ids, text
        # The one documented difference: Strip drops the space before the first word of a decoded text.
        assert ours.decode(ids)[1:] == hf_tok.decode(ids), text


def test_bad_tokenizer_files(folder):
    from isthmus.compiler.frontends.hf_tokenizer import tokenizer_from_hf

    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    _one_line_error(UnsupportedError, lambda: load_model(folder), "tokenizer.json", "WordPiece")
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    _one_line_error(ModelFormatError, lambda: load_model(folder), "tokenizer.json")
    (folder / "tokenizer.json").write_text("{")
    _one_line_error(ModelFormatError, lambda: tokenizer_from_hf(folder), "tokenizer.json")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_text("[]")
    _one_line_error(ModelFormatError, lambda: load_model(folder), "tokenizer_config.json", "JSON object")
    (folder / "tokenizer_config.json").unlink()
    (folder / "chat_template.jinja").unlink()
    model = load_model(folder)
    assert model.tokenizer is None and model.chat_template is None


# --- the file reader ---------------------------------------------------------------------------

def test_reader_matches_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    rng = np.random.default_rng(0)
    tensors = {"a": torch.tensor(rng.standard_normal((3, 5)), dtype=torch.float32),
               "b": torch.tensor(rng.standard_normal(7), dtype=torch.float16),
               "c": torch.tensor(rng.standard_normal((2, 3, 4)), dtype=torch.bfloat16),
               "empty": torch.zeros((0, 4), dtype=torch.float32),
               "scalar": torch.tensor(2.5, dtype=torch.float32)}
    st.save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours = read_safetensors(tmp_path / "t.safetensors")
    assert set(ours) == set(tensors)
    for name, t in tensors.items():
        got = ours[name].dequantize() if hasattr(ours[name], "dequantize") else ours[name]
        assert got.shape == tuple(t.shape), name
        np.testing.assert_array_equal(np.asarray(got, np.float32), t.float().numpy(), err_msg=name)


def _write(path, tensors: dict, header_extra=None):
    """A safetensors file written from the format description, so tests can also write broken ones."""
    header, blobs, offset = dict(header_extra or {}), [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def _one_line_error(kind, fn, *match):
    with pytest.raises(kind) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message, message
    for m in match:
        assert m in message, message
    return message


def test_unsupported_dtype_names_the_tensor(tmp_path):
    _write(tmp_path / "x.safetensors", {"ids": ("I64", (2,), bytes(16)), "w": ("F32", (1,), bytes(4))})
    _one_line_error(UnsupportedError, lambda: read_safetensors(tmp_path / "x.safetensors"), "ids", "I64")


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b[:5], "only 5 bytes"),
    (lambda b: struct.pack("<Q", 10**9) + b[8:], "header claims"),
    (lambda b: b[:8] + b"\xff" * 8 + b[16:], "not valid JSON"),
    (lambda b: b[:-3], "truncated"),
])
def test_broken_files(folder, mutate, match):
    path = folder / "model.safetensors"
    path.write_bytes(mutate(path.read_bytes()))
    _one_line_error(ModelFormatError, lambda: load_model(folder), "model.safetensors", match)


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "needs 16 bytes"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}, "bad shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "bad data_offsets"),
    ({"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
    ([1, 2], "no dtype/shape"),
])
def test_bad_header_entries(tmp_path, entry, match):
    text = json.dumps({"w": entry}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(16))
    _one_line_error(ModelFormatError, lambda: read_safetensors(tmp_path / "x.safetensors"), match)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del cfg[k]
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite(folder, drop=(), add=None):
    """Rewrite model.safetensors without the tensors in `drop` and with those in `add`."""
    tensors = {k: ("F32", v.shape, v.tobytes()) for k, v in read_safetensors(folder / "model.safetensors").items()
               if k not in drop}
    tensors.update(add or {})
    _write(folder / "model.safetensors", tensors)


def test_missing_config(folder):
    (folder / "config.json").unlink()
    _one_line_error(ModelFormatError, lambda: load_safetensors(folder), "config.json", "no such file")


def test_config_is_not_json(folder):
    (folder / "config.json").write_text("{\"model_type\": \"llama\",")
    _one_line_error(ModelFormatError, lambda: load_model(folder), "config.json", "not valid JSON")


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": None}, "hidden_size is missing"),
    ({"num_attention_heads": "six"}, "num_attention_heads"),
    ({"num_key_value_heads": 4}, "not a multiple"),
    ({"eos_token_id": VOCAB}, "eos_token_id"),
    ({"intermediate_size": 96}, "blk.0.ffn_gate.weight has shape (80, 48), expected (96, 48)"),
    ({"num_hidden_layers": 3}, "blk.2.attn_norm.weight is missing"),
    ({"num_hidden_layers": 1}, "beyond the 1 layers"),
])
def test_bad_config_values(folder, changes, match):
    _edit_config(folder, **changes)
    _one_line_error(ModelFormatError, lambda: load_model(folder), match)


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "falcon"}, "'falcon'"),
    ({"model_type": "gemma3"}, "multimodal Gemma 3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0}}, "'yarn'"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "'longrope'"),
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding_window 16 is not applied"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "'gelu'"),
])
def test_unsupported_configs(folder, changes, match):
    _edit_config(folder, **changes)
    _one_line_error(UnsupportedError, lambda: load_model(folder), "config.json", match)


def test_llama3_rope_scaling_needs_its_parameters(folder):
    _edit_config(folder, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
    _one_line_error(ModelFormatError, lambda: load_model(folder), "config.json", "low_freq_factor is None")


def test_rope_theta_from_either_config_spelling(folder):
    _edit_config(folder, rope_parameters=None, rope_theta=1234.0, rope_scaling=None)
    assert load_model(folder).config["rope_theta"] == 1234.0


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    _one_line_error(ModelFormatError, lambda: load_model(folder), "no *.safetensors")


def test_missing_tensor(folder):
    _rewrite(folder, drop={"model.layers.1.mlp.up_proj.weight"})
    _one_line_error(ModelFormatError, lambda: load_model(folder), "blk.1.ffn_up.weight is missing")


def test_untied_without_lm_head(folder):
    _rewrite(folder, drop={"lm_head.weight"})
    _one_line_error(ModelFormatError, lambda: load_model(folder), "lm_head.weight is missing")


def test_tied_checkpoint_may_store_the_head_anyway(folder):
    _edit_config(folder, tie_word_embeddings=True)
    model = load_model(folder)
    assert "output.weight" not in {v.name for v in model.graph.constants}


def test_unexpected_tensor(folder):
    _rewrite(folder, add={"model.layers.0.self_attn.q_proj.bias": ("F32", (48,), bytes(192))})
    _one_line_error(UnsupportedError, lambda: load_model(folder), "q_proj.bias")


def test_old_rotary_buffer_is_ignored(folder):
    _rewrite(folder, add={"model.layers.0.self_attn.rotary_emb.inv_freq": ("F32", (4,), bytes(16))})
    assert load_model(folder).is_decoder


def test_sharded_index_problems(tmp_path):
    folder = _save(tmp_path / "ckpt", "f32-sharded")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]

    (folder / first).rename(folder / "moved")
    _one_line_error(ModelFormatError, lambda: load_model(folder), first, "no such file")
    (folder / "moved").rename(folder / first)

    home = index["weight_map"]["model.norm.weight"]
    elsewhere = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
    broken = dict(index, weight_map={**index["weight_map"], "model.norm.weight": elsewhere})
    index_path.write_text(json.dumps(broken))
    _one_line_error(ModelFormatError, lambda: load_model(folder), "model.norm.weight")

    index_path.write_text(json.dumps(dict(index, weight_map={"x": "../../etc/passwd"})))
    _one_line_error(ModelFormatError, lambda: load_model(folder), "not a file name inside the folder")

    index_path.write_text("[]")
    _one_line_error(ModelFormatError, lambda: load_model(folder), "weight_map")

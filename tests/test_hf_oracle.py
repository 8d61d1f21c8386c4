"""Hugging Face transformers as the oracle for the default GGUF model.

transformers reads the same GGUF file (`from_pretrained(folder, gguf_file=name)`, via the `gguf`
package), dequantizes it to f32, undoes llama.cpp's Q/K row permutation and runs its own Llama
with the half-split rope; isthmus keeps the GGUF rows and rotates with the interleaved layout.
The two paths share no code, so agreement checks the GGUF reader, the dequantizers, the rope
layout, the graph and the tokenizer at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from isthmus.runtime.generate import generate  # noqa: E402
from isthmus.runtime.sampling import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

TEXT = ("The Industrial Revolution began in Great Britain in the late eighteenth century, when new machines "
        "for spinning and weaving cotton moved work from homes into factories powered by water and steam.")
RAW_PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def hf(default_model_path):
    """(transformers model, transformers tokenizer) read from the default GGUF; about 40 s, once."""
    torch.set_num_threads(2)
    path = Path(default_model_path)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return model, tok


def _prompts(default_model):
    tok = default_model.tokenizer
    return {"raw": RAW_PROMPT, "chat": tok.apply_chat_template(CHAT, add_generation_prompt=True)}


def _run(exe, ids):
    ids = np.asarray([ids], np.int64)
    feeds = {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None, :]}
    for v in exe.graph.inputs:
        if v.name.startswith("past_"):
            feeds[v.name] = np.zeros([1 if d == "batch" else 0 if isinstance(d, str) else d for d in v.shape],
                                     np.float32)
    return exe.run(feeds)["logits"][0]


def test_logits_agree_with_transformers(default_model, default_exe, hf):
    model, _ = hf
    ids = default_model.tokenizer.encode(TEXT)[:32]
    assert len(ids) == 32
    ours = _run(default_exe, ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == ref.shape
    span = float(ref.max() - ref.min())
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-3 * span, f"max |diff| {diff:.3g} over a logit range of {span:.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_continuations_agree_with_transformers(default_model, default_exe, hf):
    model, hf_tok = hf
    tok = default_model.tokenizer
    for name, text in _prompts(default_model).items():
        ids = tok.encode(text)
        ours = list(generate(default_exe, ids, SamplingParams(max_tokens=NEW_TOKENS), stop_ids=()))
        with torch.no_grad():
            # Past the end token too, a stricter comparison than stopping at it. eos_token_id=None must be
            # a keyword: inside a GenerationConfig, None means "use the model's end token".
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                 pad_token_id=tok.eos_id)[0, len(ids):].tolist()
        assert len(ours) == NEW_TOKENS and ours == ref, name
        assert tok.decode(ours) == hf_tok.decode(ref), name


def test_tokenizer_agrees_with_transformers(default_model, hf):
    _, hf_tok = hf
    tok = default_model.tokenizer
    assert tok.apply_chat_template(CHAT) == hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    for text in [TEXT, *_prompts(default_model).values(), "naïve café 🙂 1234567 tokens\n\n  x"]:
        assert tok.encode(text) == hf_tok(text).input_ids, text


def test_hf_tokenizer_json_agrees_with_the_gguf_tokenizer(default_model, hf, tmp_path):
    """The tokenizer.json path (compiler/frontends/hf_tokenizer.py) on a real vocabulary: transformers writes
    the GGUF's tokenizer out as tokenizer.json, and isthmus must read it back to the same ids and text."""
    import json

    from isthmus.compiler.frontends.hf_tokenizer import tokenizer_from_hf

    _, hf_tok = hf
    hf_tok.save_pretrained(tmp_path)
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    gguf_tok = default_model.tokenizer
    ours = tokenizer_from_hf(tmp_path, tok_config, bos_id=gguf_tok.bos_id, eos_id=gguf_tok.eos_id,
                             chat_template=gguf_tok.chat_template)
    assert ours.vocab_size == gguf_tok.vocab_size
    assert ours.special_ids == gguf_tok.special_ids
    for text in [TEXT, *_prompts(default_model).values(), "naïve café 🙂 1234567 tokens\n\n  x"]:
        ids = gguf_tok.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == gguf_tok.decode(ids) == text
    every = list(range(gguf_tok.vocab_size))
    assert [ours.token_bytes(i) for i in every] == [gguf_tok.token_bytes(i) for i in every]

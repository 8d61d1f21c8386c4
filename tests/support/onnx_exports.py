"""Tiny Hugging Face decoders exported to ONNX the ways people publish them, for the tests of
the ONNX frontend on published exports (tests/compiler/test_onnx_published.py, the CLI tests).

Each export is a folder as its exporter leaves it: model.onnx beside config.json,
generation_config.json and the tokenizer files (tokenizer.json, tokenizer_config.json with the
chat template). The models are random-weight `transformers` configs (hidden sizes that are not
multiples of 64, GQA for Llama, 2 layers), trained for a few steps on a fixed text so that greedy
decoding has clear margins and 20-token continuations compare exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 300
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["hello world, the quick brown fox jumps over the lazy dog 42 times.",
        "café naïve 日本語 🙂 — tokenizers say hello"]


def hf_tokenizer():
    """A byte-level BPE trained on a few lines, with chat control tokens, as a transformers tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_model(arch: str, seed: int = 0, tied: bool = False):
    """A tiny random `transformers` decoder ("llama": GQA 6 query / 2 kv heads, hidden 48; "llama-hd16":
    3 query / 1 kv heads of 16;
    "gpt2": hidden 40, 4 heads), trained a few steps on TEXT; eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if arch in ("llama", "llama-hd16"):   # llama-hd16: head_dim 16, as onnxruntime's GroupQueryAttention needs
        heads = (3, 1) if arch == "llama-hd16" else (6, 2)
        cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=heads[0], num_key_value_heads=heads[1], vocab_size=VOCAB,
                                       max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0,
                                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    tok = hf_tokenizer()
    ids = torch.tensor([tok(" ".join(TEXT * 2))["input_ids"][:96]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(12):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model.eval()


def save_beside(model, folder: Path) -> None:
    """What an exporter writes beside model.onnx: config.json, generation_config.json, tokenizer files."""
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    hf_tokenizer().save_pretrained(folder)


def _logits_only(model):
    """input_ids, attention_mask -> logits, with no cache: the plain torch.onnx export of a HF decoder."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return LogitsOnly()


def _with_cache(model):
    """input_ids, attention_mask, position_ids, past_key.N / past_value.N -> logits, present_key.N /
    present_value.N: the cache as tensors, rebuilt into transformers' DynamicCache inside."""
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=model.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            kv = out.past_key_values.layers
            return (out.logits, *(t for layer in kv for t in (layer.keys, layer.values)))
    return WithCache()


def export_dynamo_with_cache(model, folder) -> Path:
    """torch.onnx.export(dynamo=True) of a decoder step with its KV cache as inputs and outputs
    (the naming torch.onnx users give it: past_key.N -> present_key.N), dynamic batch, seq, past."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    b, s, p = 2, 3, 4
    ids = torch.randint(3, VOCAB, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s)[None].expand(b, s)
    past = [torch.randn(b, heads, p, head_dim) for _ in range(2 * cfg.num_hidden_layers)]
    batch, seq, length = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    names = [f"past_{kv}.{i}" for i in range(cfg.num_hidden_layers) for kv in ("key", "value")]
    torch.onnx.export(_with_cache(model), (ids, mask, pos, *past), str(folder / "model.onnx"), dynamo=True,
                      input_names=["input_ids", "attention_mask", "position_ids", *names],
                      output_names=["logits", *("present" + n[4:] for n in names)],
                      dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim("total")}, {0: batch, 1: seq},
                                      tuple({0: batch, 2: length} for _ in names)),   # *past: one tuple
                      external_data=False, verbose=False)
    save_beside(model, folder)
    return folder


def export_dynamo(model, folder) -> Path:
    """torch.onnx.export(dynamo=True) of input_ids + attention_mask -> logits, dynamic batch and seq."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(_logits_only(model), (ids, mask), str(folder / "model.onnx"), dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                      external_data=False, verbose=False)
    save_beside(model, folder)
    return folder


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `ids`, `n` tokens, not stopping at the end token."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def left_padded_feeds(batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(3, VOCAB, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, seq), np.int64)}
    if batch > 1:
        feeds["attention_mask"][-1, :2] = 0        # left padding on the last row
    return feeds


def export_genai(model, folder, precision: str, *extra: str) -> Path:
    """onnxruntime-genai's model builder on the checkpoint of `model` (precision "fp32" or "int4",
    execution provider cpu): model.onnx (+ .data) beside genai_config.json and the tokenizer."""
    import subprocess
    import sys

    folder = Path(folder)
    src = folder / "source"
    if not (src / "config.json").exists():
        model.save_pretrained(src)
        save_beside(model, src)
    out = folder / precision
    r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(src), "-i", str(src),
                        "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(folder / "cache"),
                        *(["--extra_options", *extra] if extra else [])],
                       capture_output=True, text=True, timeout=300, cwd=folder)   # not the repo root: its kernels/ would shadow HF's
    if r.returncode:
        raise RuntimeError(f"the genai builder failed: {r.stderr[-2000:]}")
    return out


_EXPORTS: dict = {}


def exported(kind: str, arch: str, tmp_path_factory):
    """(folder, source model) of `hf_model(arch)` exported by `kind` ("dynamo" or "dynamocache"),
    made once per test session: several modules test the same exports, each a few seconds of torch
    export. Read-only: a test that edits a file copies the folder first."""
    if (kind, arch) not in _EXPORTS:
        export = export_dynamo if kind == "dynamo" else export_dynamo_with_cache
        source = hf_model(arch)
        _EXPORTS[kind, arch] = export(source, tmp_path_factory.mktemp(f"{kind}-{arch}")), source
    return _EXPORTS[kind, arch]

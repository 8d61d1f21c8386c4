"""Vocabularies for the GGUF tokenizer tests, trained in the test by libraries that share no code
with isthmus (SentencePiece by `sentencepiece`, the reference implementation; byte-level BPE by
Hugging Face `tokenizers`) and written into tiny 2-layer Llama GGUF files as llama.cpp's converter
writes them: tokens, scores, token types (and merges) under `tokenizer.ggml.*`. Imported as
`gguf_vocabs` (tests/support is on pytest's pythonpath)."""

from __future__ import annotations

import io

import numpy as np

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps.",
    "Ünïcödé text: naïve café, résumé, Ελληνικά, Россия, 日本語のテキスト.",
    "Numbers 12345 and 3.14159; code: def f(x):\n    return x**2\n",
    "  leading spaces, trailing spaces   and\ttabs\nnewlines\n\n",
    "I'm sure they'll say it's fine, don't you think? Yes!",
]
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKENS = ["<think>"]
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# llama.cpp's token types, from sentencepiece's piece kinds
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def train_spm(vocab_size: int = 400, model_type: str = "bpe", add_dummy_prefix: bool = True) -> bytes:
    """A SentencePiece model (the serialized proto) with byte fallback, trained on CORPUS."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=out, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        allow_whitespace_only_pieces=True, control_symbols=CONTROL_TOKENS, user_defined_symbols=USER_TOKENS,
        minloglevel=2)
    return out.getvalue()


def spm_vocab(proto: bytes) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores and llama.cpp token types, as convert_hf_to_gguf.py reads a tokenizer.model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else
                     USER_DEFINED if sp.id_to_piece(i) in USER_TOKENS else NORMAL)
    return tokens, scores, types


def train_bpe(vocab_size: int = 600) -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE (GPT-2 style) trained on CORPUS: tokens, merges and token types."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = CONTROL_TOKENS
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials,
        show_progress=False))
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges, [CONTROL if t in specials else NORMAL for t in tokens]


def write_spm_gguf(path, proto: bytes, **kwargs):
    """A tiny Llama GGUF whose vocabulary is the SentencePiece model `proto` (model "llama")."""
    tokens, scores, types = spm_vocab(proto)
    return write_vocab_gguf(path, tokens, types, scores=scores, **kwargs)


def write_vocab_gguf(path, tokens: list[str], types: list[int], *, scores=None, merges=None, pre: str | None = None,
                     add_space_prefix: bool | None = None, add_bos: bool | None = None, add_eos: bool | None = None,
                     template: str | None = TEMPLATE, seed: int = 0, name: str = "tiny-vocab", **extra):
    """A 2-layer random Llama with this vocabulary, as a GGUF file: model "gpt2" when `merges` are
    given, else "llama" (SentencePiece). `extra` adds metadata (key -> str, bool, int or list)."""
    import gguf

    V, D, F, H, KVH, hd = len(tokens), 64, 128, 4, 2, 16
    rng = np.random.default_rng(seed)

    def mat(rows, cols, scale=1.0):
        return (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    for key, value in [("context_length", 256), ("embedding_length", D), ("block_count", 2),
                       ("feed_forward_length", F), ("attention.head_count", H), ("attention.head_count_kv", KVH)]:
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("tokenizer.ggml.model", "gpt2" if merges is not None else "llama")
    if pre is not None:
        w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    if scores is not None:
        w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    if merges is not None:
        w.add_array("tokenizer.ggml.merges", merges)
    else:
        w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", tokens.index("<|im_end|>"))
    for key, flag in [("add_space_prefix", add_space_prefix), ("add_bos_token", add_bos), ("add_eos_token", add_eos)]:
        if flag is not None:
            w.add_bool(f"tokenizer.ggml.{key}", flag)
    if template is not None:
        w.add_string("tokenizer.chat_template", template)
    for key, value in extra.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    out = mat(V, D, 4.0)
    out[tokens.index("<|im_end|>")] *= 0.3    # replies run to max_tokens mostly
    tensors = {"token_embd.weight": rng.standard_normal((V, D)).astype(np.float32),
               "output_norm.weight": np.ones(D, np.float32), "output.weight": out}
    for i in range(2):
        p = f"blk.{i}"
        tensors.update({
            f"{p}.attn_norm.weight": np.ones(D, np.float32), f"{p}.ffn_norm.weight": np.ones(D, np.float32),
            f"{p}.attn_q.weight": mat(H * hd, D), f"{p}.attn_k.weight": mat(KVH * hd, D),
            f"{p}.attn_v.weight": mat(KVH * hd, D), f"{p}.attn_output.weight": mat(D, H * hd),
            f"{p}.ffn_gate.weight": mat(F, D), f"{p}.ffn_up.weight": mat(F, D), f"{p}.ffn_down.weight": mat(D, F)})
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

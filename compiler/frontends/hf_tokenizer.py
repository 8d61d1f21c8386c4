"""A `Tokenizer` from a Hugging Face folder: tokenizer.json (+ tokenizer_config.json).

Encoding runs the tokenizer.json pipeline itself through the `tokenizers` library. Decoding,
as for GGUF vocabularies, needs each token's fixed byte string, which comes from the decoder the
file names: a byte-level decoder (GPT-2, Llama 3, SmolLM) spells bytes in GPT-2's alphabet; a
SentencePiece-style one (Llama 2: Replace "▁" -> " ", ByteFallback, Fuse, Strip) writes spaces as
"▁" and raw bytes as "<0xAB>". One difference remains for the latter: its Strip step drops the
space before the first word of a decoded text, which per-token bytes cannot express, so
isthmus keeps that space.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from isthmus.compiler.frontends.tokenizer import Tokenizer, _byte_alphabet, _token_bytes
from isthmus.errors import ModelFormatError, UnsupportedError

_SENTENCEPIECE_DECODERS = {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def tokenizer_from_hf(folder, tok_config: dict | None = None, *, bos_id: int | None = None,
                      eos_id: int | None = None, stop_ids=(), chat_template: str | None = None,
                      vocab_size: int | None = None) -> Tokenizer:
    """Build from `folder`/tokenizer.json. Ids not given fall back to the tokens tokenizer_config.json
    names; `vocab_size` (the model's, which may be padded past the tokenizer's) sizes the byte table."""
    from tokenizers import Tokenizer as Backend

    path = (Path(folder) if isinstance(folder, (str, os.PathLike)) else folder) / "tokenizer.json"  # or in memory
    tok_config = tok_config if isinstance(tok_config, dict) else {}
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
        backend = Backend.from_str(text)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read ({_first_line(e)})") from None
    except Exception as e:  # the Rust side raises plain Exception for a file it cannot parse
        raise ModelFormatError(f"{path}: not a tokenizer the tokenizers library can load ({_first_line(e)})") from None
    backend.no_truncation()
    backend.no_padding()

    spell = _speller(spec.get("decoder"), path)
    n = max(backend.get_vocab_size(with_added_tokens=True), vocab_size or 0)
    token_bytes = [b""] * n
    for i in range(n):
        token = backend.id_to_token(i)
        if token is not None:
            token_bytes[i] = spell(token)

    def named(key: str) -> int | None:
        value = tok_config.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        return backend.token_to_id(content) if isinstance(content, str) else None

    bos = bos_id if bos_id is not None else named("bos_token")
    eos = eos_id if eos_id is not None else named("eos_token")
    special = [t["id"] for t in spec.get("added_tokens") or [] if isinstance(t, dict) and t.get("special")
               and type(t.get("id")) is int]
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = bos is not None and _prepends(spec.get("post_processor"), backend.id_to_token(bos))
    return Tokenizer(backend, token_bytes, [*special, *(i for i in (bos, eos) if i is not None)],
                     bos_id=bos, eos_id=eos, stop_ids=stop_ids, add_bos=add_bos, chat_template=chat_template)


def _flatten(node) -> list[dict]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        parts = node.get("decoders") or node.get("processors") or []
        return [d for part in parts for d in _flatten(part)]
    return [node]


def _speller(decoder, path: Path):
    """token string -> the bytes it stands for, following the file's decoder."""
    steps = _flatten(decoder)
    kinds = {d.get("type") for d in steps}
    if "ByteLevel" in kinds:
        alphabet = {c: b for b, c in _byte_alphabet().items()}
        return lambda token: _token_bytes(token, alphabet)
    if kinds and kinds <= _SENTENCEPIECE_DECODERS:
        replace = []
        for d in steps:
            if d.get("type") == "Replace" and isinstance((d.get("pattern") or {}).get("String"), str):
                replace.append((d["pattern"]["String"], str(d.get("content", ""))))
            elif d.get("type") == "Metaspace":
                replace.append((str(d.get("replacement", "\u2581")), " "))
        byte_fallback = "ByteFallback" in kinds

        def spell(token: str) -> bytes:
            m = _BYTE_TOKEN.fullmatch(token) if byte_fallback else None
            if m:
                return bytes([int(m.group(1), 16)])
            for old, new in replace:
                token = token.replace(old, new)
            return token.encode()
        return spell
    shown = ", ".join(sorted(str(k) for k in kinds)) or "none"
    raise UnsupportedError(f"{path}: tokenizer decoder ({shown}) is not supported; "
                           f"supported: ByteLevel, or SentencePiece-style Replace/ByteFallback/Fuse/Strip/Metaspace")


def _prepends(post_processor, bos_token: str | None) -> bool:
    """Whether the post-processor puts the BOS token first (TemplateProcessing's single template)."""
    for p in _flatten(post_processor):
        if p.get("type") == "TemplateProcessing":
            first = (p.get("single") or [None])[0]
            return isinstance(first, dict) and (first.get("SpecialToken") or {}).get("id") == bos_token
    return False


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__

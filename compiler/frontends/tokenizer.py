"""The model's tokenizer (text <-> ids), its streaming decoder and its chat template.

`Tokenizer.from_gguf` rebuilds the vocabulary a GGUF file carries (byte-level BPE or
SentencePiece; see gguf_vocab.py) with Hugging Face `tokenizers`, which encodes. Decoding does
not need the library: each token is a fixed byte string, so text is the UTF-8 decoding of their
concatenation, and a stream of tokens can be decoded incrementally without ever emitting half
a character.
"""

from __future__ import annotations

import codecs
import functools
import re
from typing import Iterable, Iterator

from isthmus.errors import InputError, UnsupportedError


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + extra)
            extra += 1
    return spelled


class Tokenizer:
    """Text <-> token ids for one model. Build it with `Tokenizer.from_gguf`."""

    def __init__(self, backend, token_bytes: list[bytes], special_ids: Iterable[int], *, bos_id: int | None,
                 eos_id: int | None, stop_ids: Iterable[int] = (), add_bos: bool = False, add_eos: bool = False,
                 chat_template: str | None = None, strip_space: bool = False):
        self._backend = backend
        self._bytes = token_bytes
        self.special_ids = frozenset(special_ids)
        self.bos_id, self.eos_id, self.add_bos, self.add_eos = bos_id, eos_id, add_bos, add_eos
        # SentencePiece vocabularies prepend a space to the text they encode; decoding drops
        # one space at the start of the text again, as llama.cpp and Hugging Face do.
        self.strip_space = strip_space
        self.stop_ids = frozenset(i for i in (eos_id, *stop_ids) if i is not None)
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @classmethod
    def from_gguf(cls, gguf_file) -> Tokenizer:
        """Build from a `GGUFFile` (or a path to one)."""
        if not hasattr(gguf_file, "metadata"):
            from isthmus.compiler.frontends.gguf import read_gguf

            gguf_file = read_gguf(gguf_file)
        return _from_metadata(gguf_file.metadata, gguf_file.path)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids for `text`. Control tokens written in the text (e.g. `<|im_start|>`) become
        their single ids, as in Hugging Face, except in a `ChatPrompt`, where only those its
        template wrote do. `add_bos=None` / `add_eos=None` follow the model's setting; a
        `ChatPrompt` whose template already wrote the BOS token gets no second one."""
        try:
            if isinstance(text, ChatPrompt) and text.literals:
                ids = self._encode_chat(text)
            else:
                ids = self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side refuses str that is not valid Unicode (lone surrogates)
            raise InputError("the text is not valid Unicode (it contains a lone surrogate)") from None
        # A chat template that writes the BOS token itself (Llama 2's, Mistral's) gets no second one.
        wrote_bos = isinstance(text, ChatPrompt) and ids[:1] == [self.bos_id]
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and not wrote_bos:
            ids.insert(0, self.bos_id)
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for `ids`; bytes that do not form valid UTF-8 become U+FFFD, as in Hugging Face.
        A SentencePiece vocabulary's text loses the one space at its start that encoding adds."""
        text = b"".join(self.token_bytes(i, skip_special) for i in ids).decode("utf-8", errors="replace")
        return text[1:] if self.strip_space and text.startswith(" ") else text

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes one token stands for (empty for a special token when `skip_special`)."""
        if not 0 <= token_id < len(self._bytes):
            raise InputError(f"token id {token_id} is outside the vocabulary (0..{len(self._bytes) - 1})")
        if skip_special and token_id in self.special_ids:
            return b""
        return self._bytes[token_id]

    def token_to_id(self, token: str) -> int | None:
        """The id of a token as the vocabulary spells it (`"<|im_end|>"`, `"Ġthe"`), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def stream(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> ChatPrompt:
        """The prompt text for `messages`, rendered with the model's own chat template (a `ChatPrompt`:
        `encode` parses special tokens only where the template wrote them, never in the messages)."""
        if not self.chat_template:
            raise UnsupportedError("this model has no chat template; give it a raw prompt instead")
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id}
        tokens = {k: self.id_to_token(v) or "" for k, v in names.items() if v is not None}
        (messages, kwargs), literals = self._mask_specials((messages, kwargs))
        return ChatPrompt(render_chat(self.chat_template, messages, add_generation_prompt, **{**tokens, **kwargs}),
                          literals)

    def _mask_specials(self, values):
        """`values` with each special-token string in its strings replaced by one private-use
        character that the template cannot mistake for a special token; and that mapping."""
        specials = self._specials
        if specials is None or not any(specials.search(s) for s in _strings(values)):
            return values, {}
        used = {c for s in (self.chat_template, *_strings(values)) for c in _PLACEHOLDERS.findall(s)}
        free = (chr(c) for c in range(0xF0000, 0x10FFFE) if chr(c) not in used)
        placeholder: dict[str, str] = {}

        def sub(s: str) -> str:
            return specials.sub(lambda m: placeholder.setdefault(m.group(), next(free)), s)

        masked = _replace_strings(values, sub)
        return masked, {c: s for s, c in placeholder.items()}

    @functools.cached_property
    def _specials(self) -> re.Pattern | None:
        """The strings `encode` turns into special tokens, longest first (leftmost-longest, as the library)."""
        added = self._backend.get_added_tokens_decoder().values()
        found = sorted({t.content for t in added if t.special and t.content}, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, found))) if found else None

    @functools.cached_property
    def _plain(self):
        """A copy of the backend that reads special-token strings as ordinary text."""
        from tokenizers import Tokenizer as Backend

        plain = Backend.from_str(self._backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def _encode_chat(self, prompt: ChatPrompt) -> list[int]:
        # Split the render at the special tokens the template wrote; the text between (which holds
        # the messages, their special-token strings restored) is encoded without special tokens.
        restore = {ord(c): s for c, s in prompt.literals.items()}
        ids, at, strip = [], 0, False
        for m in [*self._specials.finditer(prompt.rendered), None]:
            text = prompt.rendered[at:m.start() if m else None].translate(restore)
            if strip:   # the special token before swallows the whitespace after it (rstrip)
                text = text.lstrip()
            if text:
                ids += self._plain.encode(text, add_special_tokens=False).ids
            if m:
                ids.append(self._backend.token_to_id(m.group()))
                at, strip = m.end(), m.group() in self._rstrip
        return ids

    @functools.cached_property
    def _rstrip(self) -> frozenset[str]:
        return frozenset(t.content for t in self._backend.get_added_tokens_decoder().values() if t.special and t.rstrip)


class StreamDecoder:
    """Decodes tokens one at a time and returns only complete characters.

    A character of several UTF-8 bytes may be split over tokens (emoji usually are); its first
    bytes are held back until the rest arrive. The concatenation of everything `feed` and
    `flush` return equals `tokenizer.decode` of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer, self._skip = tokenizer, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tokenizer.strip_space   # until the first character is out

    def feed(self, token_id: int) -> str:
        return self._lstrip(self._utf8.decode(self._tokenizer.token_bytes(token_id, self._skip)))

    def _lstrip(self, text: str) -> str:
        if self._strip and text:
            self._strip = False
            return text[1:] if text[0] == " " else text
        return text

    def flush(self) -> str:
        """Whatever is held back, as U+FFFD if it never became a character; resets the decoder."""
        text = self._lstrip(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return text


def _from_metadata(md: dict, path: str) -> Tokenizer:
    from isthmus.compiler.frontends.gguf_vocab import build_vocab, _id

    v = build_vocab(md, path)
    n = len(v.token_bytes)
    stops = [_id(md, f"tokenizer.ggml.{k}_token_id", n, path) for k in ("eot", "eom")]
    template = md.get("tokenizer.chat_template")
    return Tokenizer(
        v.backend, v.token_bytes, [*v.special_ids, *(i for i in (v.bos_id, v.eos_id) if i is not None)],
        bos_id=v.bos_id, eos_id=v.eos_id, stop_ids=[s for s in stops if s is not None],
        add_bos=v.add_bos, add_eos=v.add_eos, strip_space=v.strip_space,
        chat_template=template if isinstance(template, str) else None,
    )


def _token_bytes(token: str, alphabet: dict[str, int]) -> bytes:
    # As Hugging Face's ByteLevel decoder: a token wholly in the byte alphabet stands for those
    # bytes; any other token (only ever a special one) stands for its own UTF-8 text.
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError:
        return token.encode()


# --- chat templates ------------------------------------------------------------------------------

def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """Render a Hugging Face chat template (Jinja) as transformers' `apply_chat_template` does.

    Templates come with the model file and are untrusted: see chat_template.py (next to this file) for the
    sandbox and its limits."""
    from isthmus.compiler.frontends.chat_template import render

    return render(template, messages, add_generation_prompt, bos_token=bos_token, eos_token=eos_token, **kwargs)


class ChatPrompt(str):
    """A prompt rendered from a chat template, which remembers which special tokens its template wrote.

    `Tokenizer.encode` makes control tokens only of the template's own text: a `<|im_start|>`
    in a message (or in any other value the caller passed to the template) stays ordinary text,
    as llama.cpp's `parse_special=false`. String operations on it return a plain `str`, in which
    every special-token string is parsed again, so encode it as returned.
    """

    rendered: str              # the text with each special-token string of the caller's values as one placeholder
    literals: dict[str, str]   # placeholder character -> the special-token string it stands for

    def __new__(cls, rendered: str, literals: dict[str, str] | None = None):
        literals = literals or {}
        self = super().__new__(cls, rendered.translate({ord(c): s for c, s in literals.items()}))
        self.rendered, self.literals = rendered, literals
        return self


_PLACEHOLDERS = re.compile("[\U000F0000-\U0010FFFF]")   # supplementary private use planes
_MAX_DEPTH = 64


def _strings(value, depth: int = 0) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        raise InputError(f"the conversation nests more than {_MAX_DEPTH} levels deep")
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, depth + 1)


def _replace_strings(value, sub):
    if isinstance(value, str):
        return sub(value)
    if isinstance(value, dict):
        return {k: _replace_strings(v, sub) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_strings(v, sub) for v in value]
    return value

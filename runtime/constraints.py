"""Grammar-constrained decoding: the tokens a grammar allows next, as a mask on the logits.

`Grammar.json(tokenizer, vocab, schema)` compiles a JSON schema (or any JSON value, `schema=None`)
with llguidance; each sequence that decodes under it gets its own `Matcher`, which masks the
logits before the sampler chooses (every token the grammar does not allow gets -inf) and follows
the chosen token. The end-of-turn tokens are allowed exactly when the grammar is complete, so a
reply ends when its JSON does. The sampler applies the mask the same way on every target and in
batched decode: only logits cross this boundary.

Why llguidance (docs/api.md compares it with xgrammar): it has no dependencies (xgrammar's wheel
requires torch, transformers and triton at run time, which isthmus keeps out of its runtime
dependencies), it computes a mask over a 49k-token vocabulary in tens of microseconds with its
lazy lexer, and it reads the vocabulary as bytes, which isthmus's tokenizers give for every model
format (byte-level BPE and SentencePiece with byte fallback alike).
"""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np

from isthmus.errors import InputError

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes, the specials, the end tokens,
    and an encoder of bytes (used for the grammar's literal strings)."""

    def __init__(self, tokenizer, vocab: int):
        n = min(vocab, tokenizer.vocab_size)
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)] + [b""] * (vocab - n)
        self.special_token_ids = sorted(i for i in tokenizer.special_ids if i < vocab)
        ends = sorted(tokenizer.stop_ids)
        self.eos_token_id = ends[0] if ends else None
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False, add_eos=False)


def _ll_tokenizer(tokenizer, vocab: int):
    """The llguidance tokenizer of a model's vocabulary, made once per tokenizer (a few hundred ms
    for a 49k vocabulary)."""
    import llguidance
    from llguidance._tokenizer import TokenizerWrapper

    with _lock:
        key = _tokenizers.get(tokenizer)
        if key is None or key[0] != vocab:
            if not tokenizer.stop_ids:
                raise InputError("this model's vocabulary has no end token, so a constrained reply could not end")
            ll = llguidance.LLTokenizer(TokenizerWrapper(_Vocabulary(tokenizer, vocab)), n_vocab=vocab,
                                        eos_token=sorted(tokenizer.stop_ids))
            key = _tokenizers[tokenizer] = (vocab, ll)
        return key[1]


_text_masks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _text_starts(tokenizer, vocab: int, opener: str) -> np.ndarray:
    """The tokens that begin a free-text reply instead of a value that starts with `opener`
    (or_text): not special, and (after spaces) neither starting `opener` nor a beginning of it.
    Made once per tokenizer and opener (~30 ms for a 49k vocabulary)."""
    start = opener.encode("utf-8")
    with _lock:
        masks = _text_masks.setdefault(tokenizer, {})
        got = masks.get((vocab, start))
        if got is None:
            n = min(vocab, tokenizer.vocab_size)
            got = np.zeros(vocab, bool)
            for i in range(n):
                b = tokenizer.token_bytes(i).lstrip()
                got[i] = not (b.startswith(start) or (b and start.startswith(b))) and i not in tokenizer.special_ids
            masks[(vocab, start)] = got
        return got


class Grammar:
    """A compiled grammar for one model's vocabulary; `matcher()` for each sequence."""

    def __init__(self, ll_tokenizer, grammar: str, vocab: int, text: np.ndarray | None = None):
        self.ll_tokenizer, self.grammar, self.vocab = ll_tokenizer, grammar, vocab
        # or_text: the tokens that start a free-text reply instead (see Matcher)
        self.text = text

    @classmethod
    def json(cls, tokenizer, vocab: int, schema: dict | None = None, or_text: str | None = None) -> Grammar:
        """Any JSON object (`schema` None), or one valid under `schema`; with `or_text` (the
        value's first characters, "{"), either that or free text, decided by the reply's first
        token: one that could begin `or_text` begins the value, any other (not a special token) a
        text reply, which is then not constrained (a model that wants to call a tool writes the
        call; one that answers, answers). InputError names what is wrong with a schema the
        compiler refuses."""
        import llguidance

        spec = {"type": "object"} if schema is None else schema
        # compact separators: a model may otherwise spend its budget on whitespace
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults=options)
        except (ValueError, TypeError) as e:
            raise InputError(f"the JSON schema is not usable: {e}") from None
        return cls._checked(tokenizer, vocab, grammar, "JSON schema", or_text)

    @classmethod
    def lark(cls, tokenizer, vocab: int, grammar: str, or_text: str | None = None) -> Grammar:
        """A grammar in llguidance's Lark syntax (JSON schemas embedded with `%json`); `or_text`
        as for `json`."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(grammar)
        except (ValueError, TypeError) as e:
            raise InputError(f"the grammar is not usable: {e}") from None
        return cls._checked(tokenizer, vocab, grammar, "grammar", or_text)

    @classmethod
    def _checked(cls, tokenizer, vocab: int, grammar: str, what: str, or_text: str | None) -> Grammar:
        import llguidance

        ll = _ll_tokenizer(tokenizer, vocab)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if is_error:
            raise InputError(f"the {what} is not supported: {messages[0] if messages else 'invalid'}")
        return cls(ll, grammar, vocab, _text_starts(tokenizer, vocab, or_text) if or_text else None)

    def matcher(self) -> Matcher:
        return Matcher(self)


class Matcher:
    """One sequence's place in the grammar."""

    def __init__(self, grammar: Grammar):
        import llguidance

        self._m = llguidance.LLMatcher(grammar.ll_tokenizer, grammar.grammar, log_level=0)
        if self._m.is_error():
            raise InputError(f"the grammar is not usable: {self._m.get_error()}")
        self._words = (grammar.vocab + 31) // 32
        self._mask = np.zeros(self._words, np.int32)
        self._text = grammar.text           # before the first token: the tokens that begin free text
        self.free = False                   # a free-text reply (or_text): nothing more is masked

    def allowed(self) -> np.ndarray:
        """A boolean array over the vocabulary: the tokens the grammar allows next."""
        v = self._mask
        self._m.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)
        bits = np.unpackbits(v.view(np.uint8), bitorder="little")
        return bits.astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar does not allow at -inf."""
        if self.free:
            return logits
        ok = self.allowed()[:logits.shape[-1]]
        if self._text is not None:
            ok = ok | self._text[:ok.size]
        if not ok.any():
            raise InputError(f"the grammar allows no token here: {self._m.get_error() or 'dead end'}")
        return np.where(ok, np.asarray(logits, np.float32), np.float32(-np.inf))

    def accept(self, token: int) -> None:
        if self.free:
            return
        if self._text is not None:
            text, self._text = bool(self._text[token]), None
            if text:
                self.free = True
                return
        if not self._m.consume_token(int(token)):
            raise InputError(f"the grammar refused token {token}: {self._m.get_error()}")

    @property
    def complete(self) -> bool:
        return self.free or self._m.is_accepting()

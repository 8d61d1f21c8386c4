"""The generation loop: prefill the prompt, then decode one token at a time over the KV cache.

`TextStream` is what `isthmus.chat` and the CLI iterate: text pieces as they are decoded,
with stop strings cut out (never half-printed) and timing statistics at the end. Sampling, the
budget, stop ids, stop strings and UTF-8 holdback are `runtime.sequence.Sequence`'s, the one
generation core the server's engine drives too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from isthmus.compiler.executable import context_length, decoder_model
from isthmus.errors import InputError, UnsupportedError
from isthmus.runtime.sampling import SamplingParams
from isthmus.runtime.sequence import Sequence


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    eval_tokens: int = 0
    eval_seconds: float = 0.0
    finish_reason: str = ""      # "stop" (end token or stop string) or "length"

    @property
    def prompt_rate(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def eval_rate(self) -> float:
        return self.eval_tokens / self.eval_seconds if self.eval_seconds else 0.0


def generate(exe, prompt_ids: list[int], params: SamplingParams, stats: GenerationStats | None = None,
             stop_ids=()) -> Iterator[int]:
    """Yield generated token ids; stops at an end token (not yielded), max_tokens or the context end."""
    seq = _sequence(exe, prompt_ids, params, stop_ids=frozenset(stop_ids))
    for _ in _run(exe, prompt_ids, seq, stats if stats is not None else GenerationStats()):
        if seq.kept:
            yield seq.token


def _sequence(exe, prompt_ids: list[int], params: SamplingParams, **kwargs) -> Sequence:
    decoder_model(exe)
    n_ctx = context_length(exe)
    if not prompt_ids:
        raise InputError("the prompt is empty")
    if len(prompt_ids) >= n_ctx:
        raise InputError(f"the prompt is {len(prompt_ids)} tokens; the model's context window is {n_ctx}")
    return Sequence(params, min(params.max_tokens, n_ctx - len(prompt_ids)), prompt_ids=prompt_ids, **kwargs)


def _run(exe, prompt_ids: list[int], seq: Sequence, stats: GenerationStats) -> Iterator[str]:
    """Prefill the prompt, then step `seq` until it finishes, decoding each token it keeps; yield
    the text each step releases."""
    decoder = exe.decoder()
    t0 = time.perf_counter()
    logits = decoder.step(list(prompt_ids))
    stats.prompt_tokens, stats.prompt_seconds = len(prompt_ids), time.perf_counter() - t0
    t0 = time.perf_counter()
    stats.finish_reason = "length"
    try:
        while True:
            piece = seq.step(logits)
            stats.eval_tokens += 1
            stats.finish_reason = seq.finish_reason or "length"
            yield piece
            if seq.finish_reason:
                return
            logits = decoder.step([seq.token])
    finally:
        stats.eval_seconds = time.perf_counter() - t0


class TextStream:
    """Iterate for text pieces; `stats` and `text` are complete once iteration ends."""

    def __init__(self, exe, prompt_ids: list[int], params: SamplingParams):
        self.exe, self.prompt_ids, self.params = exe, prompt_ids, params
        self.stats = GenerationStats()
        self.text = ""
        self.token_ids: list[int] = []

    def __iter__(self) -> Iterator[str]:
        tok = decoder_model(self.exe).tokenizer
        seq = _sequence(self.exe, self.prompt_ids, self.params, stop_ids=tok.stop_ids, tokenizer=tok)
        for piece in _run(self.exe, self.prompt_ids, seq, self.stats):
            if seq.kept:
                self.token_ids.append(seq.token)
            yield from self._emit(piece)
        yield from self._emit(seq.flush())

    def _emit(self, piece: str) -> Iterator[str]:
        if piece:
            self.text += piece
            yield piece


def chat(exe, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
         top_k: int = 0, seed: int | None = None, stop=None) -> TextStream:
    """Stream the assistant's reply to OpenAI-style `messages` using the model's chat template."""
    model = decoder_model(exe)
    if model.tokenizer is None:
        raise UnsupportedError("this model carries no tokenizer, so it cannot chat")
    _check_messages(messages)
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = model.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=list(stop or []))
    return TextStream(exe, ids, params)


def complete(exe, prompt: str, **kwargs) -> TextStream:
    """Continue raw `prompt` text (no chat template)."""
    model = decoder_model(exe)
    ids = model.tokenizer.encode(prompt)
    return TextStream(exe, ids, SamplingParams(**kwargs))


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}] must be an object with a string 'content'")
        if m.get("role") not in ("system", "developer", "user", "assistant"):
            raise InputError(f"messages[{i}].role must be system, developer, user or assistant, got {m.get('role')!r}")

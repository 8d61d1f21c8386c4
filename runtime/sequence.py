"""One generation core: the state of one sequence being generated, one token at a time.

A `Sequence` owns what decides the next token and what text it releases: the sampler (and its
seed), the token budget, the stop token ids, the detokenizing tail that cuts stop strings (never
half-emitted: a suffix that could start one is held back) and holds back incomplete UTF-8, the
finish reason, and the logprob entries of the tokens it kept. It does not run the model: the
caller feeds it logits (`step`) and runs the decoder on `token`. `runtime.generate` (what
`isthmus.chat` and the CLI iterate) and `runtime.engine.Engine` (the server) both drive it.
"""

from __future__ import annotations

import numpy as np

from isthmus.runtime.sampling import Sampler, SamplingParams


class Sequence:
    """Logits in, one token and the text it releases out, until `finish_reason` is set.

    `budget`: the most tokens kept. `stop_ids`: tokens that end the sequence (not kept, not
    counted in `generated`). `tokenizer`: None for token ids only (no text). `stream`: with a
    seed, draw from the seeded stream of choice `stream` (the n choices of one request differ,
    reproducibly); None draws from `default_rng(seed)`. `top_logprobs`: None keeps no logprobs;
    k keeps, for every kept token, its logprob and the k most likely alternatives.
    """

    __slots__ = ("sampler", "budget", "stop_ids", "tokenizer", "top_logprobs", "token", "kept", "generated",
                 "finish_reason", "logged", "_stops", "_detok", "_pending")

    def __init__(self, params: SamplingParams, budget: int, *, stop_ids=(), tokenizer=None,
                 stream: int | None = None, top_logprobs: int | None = None, prompt_ids=()):
        self.sampler = Sampler(params)
        self.sampler.prompt(prompt_ids)          # what the repetition penalty counts besides the output
        if stream is not None and params.seed is not None:
            self.sampler.rng = np.random.default_rng([params.seed % 2**64, stream])
        self.budget, self.stop_ids = budget, stop_ids
        self.tokenizer, self.top_logprobs = tokenizer, top_logprobs
        self.token = -1                 # the last token sampled
        self.kept = False               # ... and whether it is part of the output (not a stop id)
        self.generated = 0              # tokens kept (stop ids excluded)
        self.finish_reason = ""         # "stop" (stop id or stop string) or "length" once finished
        self.logged: list = []          # logprob entries of kept tokens not yet taken
        self._stops = [s for s in params.stop if s]
        self._detok = tokenizer.stream(skip_special=True) if tokenizer is not None else None
        self._pending = ""              # decoded text not yet released: it might start a stop string

    def step(self, logits: np.ndarray) -> str:
        """Sample the next token from `logits`; return the text it releases (possibly "").

        Sets `finish_reason` when the sequence ends: at a stop id ("stop", the token not kept),
        a stop string ("stop", the text before it is returned and the rest dropped) or the
        budget ("length"). At a stop id or the budget, `flush()` then gives the held-back text.
        """
        token = self.token = self.sampler(logits)
        if token in self.stop_ids:
            self.kept, self.finish_reason = False, "stop"
            return ""
        self.kept = True
        self.generated += 1
        if self.top_logprobs is not None:
            self.logged.append(self._logprob_entry(logits, token))
        if self.generated >= self.budget:
            self.finish_reason = "length"
        if self._detok is None:
            return ""
        pending = self._pending + self._detok.feed(token)
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.finish_reason, self._pending, self._detok = "stop", "", None
            return pending[:min(hits)]
        safe = len(pending) - _held_back(pending, self._stops)
        self._pending = pending[safe:]
        return pending[:safe]

    def flush(self) -> str:
        """The text still held back (an end without a stop string releases it); "" after a stop string."""
        if self._detok is None:
            return ""
        out, self._pending = self._pending + self._detok.flush(), ""
        return out

    def take_logged(self) -> list | None:
        """The logprob entries gathered since the last call, or None."""
        if not self.logged:
            return None
        out, self.logged = self.logged, []
        return out

    def _logprob_entry(self, logits: np.ndarray, token: int) -> dict:
        z = logits.astype(np.float64)
        logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))

        def item(i):
            raw = self.tokenizer.token_bytes(int(i))
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(max(logp[i], -9999.0)),
                    "bytes": list(raw)}

        k = self.top_logprobs
        top = np.argsort(-logp, kind="stable")[:k] if k else []
        return {**item(token), "top_logprobs": [item(i) for i in top]}


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best

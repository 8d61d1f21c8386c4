"""Choosing the next token from logits: greedy, or temperature with top-k, top-p and min-p; with
the logits first adjusted by the request's logit bias and penalties (OpenAI's presence and
frequency penalties on the tokens generated so far, vLLM's repetition penalty on the prompt's and
the generated ones). Every target's logits go through the same code, batched or not."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from isthmus.errors import InputError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0        # 0 means greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0                  # 0 means no limit
    min_p: float = 0.0              # 0 means none
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)      # token id -> added to its logit
    presence_penalty: float = 0.0   # subtracted once from each token generated at least once
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    repetition_penalty: float = 1.0  # > 1: logits of prompt and generated tokens divided (negative: multiplied)
    grammar: object | None = None   # runtime.constraints.Grammar: only the tokens it allows are chosen

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0.0 < self.repetition_penalty <= 100.0,
             f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}"),
            (all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before choosing (bias or a penalty)."""
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty) \
            or self.repetition_penalty != 1.0


class Sampler:
    """Chooses each token of one sequence; `prompt(ids)` gives it the prompt (for the repetition
    penalty) and every choice counts towards the penalties of the next."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.counts: dict[int, int] = {}        # generated token -> times
        self.seen: set[int] = set()             # prompt and generated tokens (repetition penalty)
        self.matcher = params.grammar.matcher() if params.grammar is not None else None

    def prompt(self, ids) -> None:
        if self.params.repetition_penalty != 1.0:
            self.seen.update(int(i) for i in ids)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.adjusts:
            logits = self.adjusted(logits)
        if self.matcher is not None:
            logits = self.matcher.mask(logits)
        token = self._choose(logits)
        if self.matcher is not None:
            self.matcher.accept(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if p.repetition_penalty != 1.0:
            self.seen.add(token)
        return token

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits the choice is made on: a copy with the bias and penalties applied."""
        p = self.params
        z = np.array(logits, np.float32)
        if p.repetition_penalty != 1.0 and self.seen:
            ids = np.fromiter((i for i in self.seen if i < z.size), np.int64)
            v = z[ids]
            z[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            ids = np.fromiter((i for i in self.counts if i < z.size), np.int64)
            c = np.fromiter((self.counts[i] for i in ids), np.float32)
            z[ids] -= c * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)
        for i, b in p.logit_bias.items():
            if i < z.size:
                z[i] += b
        return z

    def _choose(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < z.size:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        if p.min_p > 0.0:               # relative to the most likely token (its probability is 1 here)
            probs = np.where(probs < p.min_p, 0.0, probs)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            keep = order[:cut]
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(self.rng.choice(probs.size, p=probs))

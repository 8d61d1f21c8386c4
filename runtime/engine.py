"""Continuous batching: one model instance, many conversations, one KV cache per sequence.

An `Engine` owns an executable and a worker thread. Requests wait in a bounded queue (a full
queue is `Overloaded`, which the server answers with 503); each loop iteration

  1. admits waiting requests while batch slots are free (reusing a cached prefix of the prompt,
     runtime/prefix_cache.py) and prefills their prompts: all at once (up to `prefill_tokens`)
     when nothing decodes, else in chunks of about one decode step's cost (chunked prefill,
     `_feed_prompts`), so a long prompt does not stall the running streams;
  2. steps every running sequence (`runtime.sequence.Sequence`, the generation core that
     `runtime.generate.TextStream` drives too: sampling, budget, stop ids, stop strings, UTF-8
     holdback) on its pending logits, emits the text, and retires the sequences that finished;
  3. runs ONE batched decode step for all the sequences still running
     (`compiler.batch.decode_batch`: numba and the reference target run one step for the whole batch).

While streams decode, a prompt's chunk is an iteration of its own, between two decode steps (one
chunk per step): between the chunk and the step the engine admits again, so a request of a better
tier waits for at most one of them, not both, and its prompt, prefilled whole, gets its first token
before any chunk of a worse tier's prompt. Where the target has yield points inside a step (numba:
about once a layer, `compiler.batch.decode_batch(between=...)`, and in every prompt's prefill),
it does not wait for either: a
request of one sequence whose tier is better than every running sequence's is prefilled and
sampled there, its first token emitted mid-step (`_urgent`), and it joins the batch at the next
iteration (a worse tier's sequence preempted if the batch is then over full).

Every request has a service tier (TIERS: priority, default, flex). Batch slots go to the best
tier first, and a decode step serves its sequences best tier first (a target that steps them one
by one emits the priority tier's tokens first). When the batch is full, a waiting sequence of a
better tier preempts a running one of a worse tier (the worst, most recently admitted first).

Within a tier, tenants share the engine fairly. A submit is refused (`Overloaded`) when the engine
is full AND the tenant already holds its share of it (capacity / tenants with work), so a tenant
that filled the queue cannot keep another out. Batch slots go first to the tenant with the fewest
running sequences; when the batch is full and a tenant below its share (max_batch / tenants with
work) waits, sequences of a tenant above its share (of the same tier or a worse one) are preempted.

A preempted sequence pauses: it leaves the batch keeping its KV cache (its decoder), sampler state
and pending logits, and waits at the head of its line; resumed, it goes on where it stopped, with
no prefill (memory, not compute, pays for the pause).

A request is cancelled (client gone) by `Ticket.cancel()`: its sequences leave the batch before
the next decode step, so the slot is free at once. Events reach the caller through `sink`, a
callable run on the worker thread (the server hops them onto its event loop).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from isthmus.compiler import batch as _batch
from isthmus.compiler.batch import decode_batch, prefill
from isthmus.compiler.executable import context_length
from isthmus.errors import InputError
from isthmus.runtime.prefix_cache import PrefixCache
from isthmus.runtime.sampling import SamplingParams
from isthmus.runtime.sequence import Sequence

log = logging.getLogger("isthmus.serve")


class Overloaded(Exception):
    """The waiting queue is full."""


# Service tiers (OpenAI's `service_tier` values), best first: the rank orders admission and decode, and a
# higher tier preempts a lower one when the batch is full.
TIERS = {"priority": 0, "default": 1, "flex": 2}
PREFILL_QUANTUM = 16     # a prompt prefilled in parts is cut at multiples of this many tokens


# -- events (worker thread -> request owner) -------------------------------------------------------

@dataclass
class Delta:
    index: int                      # the choice
    text: str
    logprobs: list | None = None    # OpenAI-shaped entries for the tokens behind `text`


@dataclass
class Finished:
    index: int
    reason: str                     # "stop" | "length"
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500               # what a non-streaming response answers: 400, 500 or 503


@dataclass
class _Start:
    ticket: "Ticket"
    index: int


def _ticket(unit) -> "Ticket":
    return unit.request if isinstance(unit, _Seq) else getattr(unit, "ticket", unit)


# -- per-sequence state ----------------------------------------------------------------------------

@dataclass(eq=False)
class _Seq:
    request: "Ticket"
    index: int
    core: Sequence                              # sampling, budget, stop ids and strings, text, logprobs
    decoder: object = None
    logits: np.ndarray | None = None
    fed: list = field(default_factory=list)     # generated tokens already in the KV cache (to resume)
    sampled: bool = False                       # its next token sampled (and emitted) ahead of the iteration
    todo: list = field(default_factory=list)    # prompt tokens not prefilled yet (chunked prefill)
    first: float = 0.0                          # perf_counter of its first token, and of its last
    last: float = 0.0


@dataclass(eq=False)
class Ticket:
    """One submitted request (n sequences sharing a prompt)."""
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    sink: Callable[[object], None]
    top_logprobs: int | None        # None: no logprobs; k: the chosen token and k alternatives
    ignore_eos: bool = False        # generate past the end-of-turn token (benchmarks)
    tenant: str = "default"         # whose work it is (fair shares)
    tier: str = "default"           # its service tier (TIERS): admission and decode order, preemption
    cancelled: bool = False
    done: bool = False
    started: int = 0                # sequences admitted into the batch so far (of n)
    running: int = 0                # ... and not finished
    generated: int = 0              # tokens generated over all its sequences (for token limits)
    submitted: float = field(default_factory=time.perf_counter)
    queued: float = 0.0             # seconds from submit to its first sequence's admission

    @property
    def rank(self) -> int:
        return TIERS[self.tier]

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, exe, *, max_batch: int = 32, max_waiting: int = 64, prefill_tokens: int = 512,
                 metrics=None, name: str = "model", prefix_cache_bytes: int = 0):
        model = exe.model
        if model is None or exe.graph.decoder is None:
            raise InputError("only decoder models (token ids -> logits, with a KV cache) can be served")
        if model.tokenizer is None:
            raise InputError("this model carries no tokenizer, so it cannot be served for chat")
        if max_batch < 1 or max_waiting < 0:
            raise InputError("max_batch must be >= 1 and max_waiting >= 0")
        self.exe, self.model, self.tokenizer, self.name = exe, model, model.tokenizer, name
        self.n_ctx = context_length(exe)
        self.vocab = int(exe.graph.decoder.resolve(exe.graph).logits.shape[-1])
        self.max_batch, self.max_waiting, self.prefill_tokens = max_batch, max_waiting, prefill_tokens
        # chunked prefill: while streams decode, an iteration prefills about `prefill_share` x a decode
        # step's time of prompt tokens (from running means of both), in multiples of PREFILL_QUANTUM
        self.prefill_share = 1.0
        self._step_s = self._token_s = 0.0
        self.metrics = metrics
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._paused: collections.deque[_Seq] = collections.deque()     # preempted, to resume first
        self._running: list[_Seq] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._held = False
        self.steps = 0                        # batched decode steps run (for metrics and tests)
        self._chunk_due = False               # a decode step ran since the last prompt chunk
        self.preemptions = 0                  # sequences preempted for another tenant's fair share
        self.decode = decode_batch            # swappable in tests (fault injection)
        # finished sequences' decoders, for prompts that extend theirs (runtime/prefix_cache.py); 0: off
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None

    # -- control -----------------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name=f"isthmus-engine-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for t in list(self._waiting) + list({s.request for s in self._running + list(self._paused)}):
            self._fail(t, "the server is shutting down", 503)
        self._waiting.clear()
        self._paused.clear()
        self._running.clear()

    def hold(self, held: bool = True) -> None:
        """Stop (or resume) admitting waiting requests; running ones go on. For draining and tests."""
        with self._cond:
            self._held = held
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._paused)

    def load(self) -> dict[str, int]:
        """Sequences in the engine (running, paused or queued) by tenant."""
        out: dict[str, int] = collections.Counter()
        with self._cond:
            for s in self._running + list(self._paused):
                out[s.request.tenant] += 1
            for t in self._waiting:
                if not t.cancelled:
                    out[t.tenant] += t.n - t.started
        return out

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink, *, n: int = 1,
               top_logprobs: int | None = None, ignore_eos: bool = False, tenant: str = "default",
               tier: str = "default") -> Ticket:
        """Queue a request; `Overloaded` when the engine is full and `tenant` already holds its
        share of it. The prompt must already fit the context (the API layer checks it, with the
        error the client expects). `tier`: one of TIERS."""
        if not prompt_ids or len(prompt_ids) >= self.n_ctx:
            raise InputError(f"the prompt must hold 1 to {self.n_ctx - 1} tokens, got {len(prompt_ids)}")
        if tier not in TIERS:
            raise InputError(f"service_tier must be one of {', '.join(TIERS)}, got {tier!r}")
        ticket = Ticket(next(self._ids), list(prompt_ids), params, n, sink, top_logprobs, ignore_eos, tenant, tier)
        with self._cond:
            if any(w.cancelled for w in self._waiting):
                self._waiting = collections.deque(w for w in self._waiting if not w.cancelled)
            load = self.load()
            capacity = self.max_batch + self.max_waiting
            share = max(1, capacity // len(set(load) | {tenant}))
            if sum(load.values()) + n > capacity and load.get(tenant, 0) + n > share:
                raise Overloaded(f"{self.waiting} requests are waiting and {len(self._running)} "
                                 f"sequences running; the limit is {self.max_batch} running + {self.max_waiting} "
                                 f"waiting, and {share} for one tenant while others wait")
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._running and (self._held or not (self._waiting or self._paused)):
                    self._cond.wait()
                if self._stop:
                    return
                admitted = self._take_admissions()
            try:
                self._iteration(admitted)
            except Exception:              # a bug: fail what is in flight, keep serving
                log.exception("engine iteration failed")
                for t in {s.request for s in self._running} | {_ticket(u) for u in admitted}:
                    self._fail(t, "internal error while generating")
                self._running = [s for s in self._running if not s.request.done]

    def _take_admissions(self) -> list:
        """The sequences to prefill this iteration (new ones, and preempted ones to resume), one at a
        time: the best tier first, then fairly within a tier: the tenant with the fewest running
        sequences goes first (oldest request first within a tenant). When the batch is full, a
        sequence preempts a running one of a lower tier, or else (same tier) one of a tenant above
        its share."""
        self._waiting = collections.deque(w for w in self._waiting if not w.cancelled)
        for s in [s for s in self._paused if s.request.cancelled]:
            self._paused.remove(s)
            self._release(s)
        while len(self._running) > self.max_batch and self._preempt(lambda s: True) is not None:
            pass                             # over full by requests served at a yield point (`_urgent`)
        admitted, tokens = [], 0
        running = collections.Counter(s.request.tenant for s in self._running)
        while (self._waiting or self._paused) and not self._held:
            heads: dict[tuple, object] = {}                     # each (tier, tenant)'s next sequence
            for s in self._paused:
                heads.setdefault((s.request.rank, s.request.tenant), s)
            for t in self._waiting:
                heads.setdefault((t.rank, t.tenant), t)
            key = min(heads, key=lambda k: (k[0], running[k[1]], _ticket(heads[k]).id))
            rank, tenant = key
            unit = heads[key]
            if isinstance(unit, _Seq):          # a paused sequence resumes with its KV cache: nothing to prefill
                size = len(unit.todo) if unit.decoder is not None else len(unit.request.prompt_ids) + len(unit.fed)
            else:
                size = len(unit.prompt_ids)
            if admitted and tokens + size > self.prefill_tokens:
                break
            busy = sum(running.values())
            if busy >= self.max_batch:
                victim = self._preempt(lambda s: s.request.rank > rank)       # a lower tier first
                if victim is None:
                    share = max(1, self.max_batch // len({k[1] for k in heads} | set(+running)))
                    victim = max(running, key=lambda k: running[k])
                    if running[tenant] >= share or running[victim] <= share or self._preempt(
                            lambda s: s.request.tenant == victim and s.request.rank >= rank) is None:
                        break
                running[victim] -= 1
            if isinstance(unit, _Seq):
                self._paused.remove(unit)
            else:
                admitted.append(_Start(unit, unit.started))
                unit.started += 1
                unit.running += 1
                if unit.started == unit.n:
                    self._waiting.remove(unit)
                unit = None
            if unit is not None:
                admitted.append(unit)
            running[tenant] += 1
            tokens += size
        return admitted

    def _preempt(self, which) -> str | None:
        """Pause a running sequence for which `which(s)` holds (of the lowest tier, the most recently
        admitted first): it leaves the batch keeping its KV cache, pending logits and sampler, and
        waits at the head of its line. Its tenant, or None when none qualifies."""
        best = None
        for i in range(len(self._running) - 1, -1, -1):
            s = self._running[i]
            if which(s) and (best is None or s.request.rank > self._running[best].request.rank):
                best = i
        if best is None:
            return None
        s = self._running.pop(best)
        self._paused.appendleft(s)
        self.preemptions += 1
        return s.request.tenant

    def _iteration(self, admitted: list) -> None:
        for u in admitted:
            if isinstance(u, _Seq):
                self._resume(u)
            elif not u.ticket.done:
                self._prefill(u.ticket, u.index)
        if self._chunk_due:
            self._chunk_due = False
            if self._feed_prompts(chunk=True):
                return                    # a chunk's iteration: admissions again before the decode step
        self._feed_prompts(chunk=False)
        running = []
        for s in self._running:
            if s.request.cancelled:
                self._release(s)
            elif s.sampled:                 # its first token came at a yield point (`_urgent`)
                s.sampled = False
                running.append(s)
            elif s.todo or self._advance(s):
                running.append(s)
        running.sort(key=lambda s: s.request.rank)     # stable: a stepping target serves the best tier first
        self._running = running
        still = [s for s in running if not s.todo]
        if not still:
            return
        t0 = time.perf_counter()
        try:
            decoders, tokens = [s.decoder for s in still], [s.core.token for s in still]
            if self.decode is _batch.decode_batch:       # (tests swap in their own, without yield points)
                logits = self.decode(self.exe, decoders, tokens, between=self._urgent)
            else:
                logits = self.decode(self.exe, decoders, tokens)
        except Exception as e:
            log.exception("batched decode failed")
            bad = isinstance(e, InputError)
            for t in {s.request for s in still}:
                self._fail(t, str(e) if bad else "internal error while generating", 400 if bad else 500)
            self._running = [s for s in self._running if not s.request.done]
            return
        dt = time.perf_counter() - t0
        self._step_s = dt if not self._step_s else 0.8 * self._step_s + 0.2 * dt
        self.steps += 1
        self._chunk_due = True
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(still), model=self.name)
            tiers = collections.Counter(s.request.tier for s in still)
            for tier, k in tiers.items():
                self.metrics.tier_batch_size.observe(k, model=self.name, tier=tier)
        for s, row in zip(still, logits):
            s.logits = row

    def _prefill(self, t: Ticket, i: int) -> _Seq | None:
        """Start choice `i` of `t` (its slot is already counted in `t.running`): its sequence, in the
        batch with its prompt to feed; None if that failed (reported)."""
        params = t.params
        budget = min(params.max_tokens, self.n_ctx - len(t.prompt_ids))
        try:
            core = Sequence(params, budget, stop_ids=() if t.ignore_eos else self.tokenizer.stop_ids,
                            tokenizer=self.tokenizer, stream=i, top_logprobs=t.top_logprobs, prompt_ids=t.prompt_ids)
            s = _Seq(t, i, core)
            if i == 0:
                t.queued = time.perf_counter() - t.submitted
                if self.metrics is not None:
                    self.metrics.queue_time.observe(t.queued, model=self.name, tier=t.tier)
            s.decoder, reused = self._decoder_for(t)
            s.todo = t.prompt_ids[reused:]           # prefilled by _feed_prompts, in chunks while others decode
        except Exception as e:
            self._failed(t, e, "reading the prompt")
            return None
        self._running.append(s)
        return s

    def _feed_prompts(self, chunk: bool) -> bool:
        """Prefill the prompts of admitted sequences, best tier first. With nothing decoding: all of
        them (each up to `prefill_tokens` an iteration). While streams decode: the prompts of a better
        tier than every decoding stream's, whole (`chunk` false); or, when there are none, one chunk
        of the others' that costs about `prefill_share` decode steps (`chunk` true), so that running
        streams keep their pace. A sequence whose prompt is all in gets its first logits (and joins
        the next decode step). True if it prefilled anything."""
        pending = sorted((s for s in self._running if s.todo and not s.request.cancelled), key=lambda s: s.request.rank)
        # the best tier among the decoding streams: a prompt of a better tier does not yield to them
        best = min((s.request.rank for s in self._running if not s.todo), default=len(TIERS))
        ahead = [s for s in pending if s.request.rank < best]         # all of them when nothing decodes
        if chunk and (ahead or not pending):
            return False
        budget = self._chunk() if chunk else None
        fed = False
        for s in pending if chunk else ahead:
            if budget is not None and budget <= 0:
                break
            n = min(len(s.todo), self.prefill_tokens if budget is None else budget)
            if n < len(s.todo) and budget is not None:    # a part of a prompt: whole quanta (fewer distinct shapes)
                n = max(PREFILL_QUANTUM, n // PREFILL_QUANTUM * PREFILL_QUANTUM)
            t0 = time.perf_counter()
            try:
                if prefill is _batch.prefill:       # (tests swap in their own, without yield points)
                    logits = prefill(self.exe, s.decoder, s.todo[:n], between=self._urgent)
                else:
                    logits = prefill(self.exe, s.decoder, s.todo[:n])
            except Exception as e:
                self._failed(s.request, e, "reading the prompt")
                continue
            fed = True
            dt = (time.perf_counter() - t0) / n
            if n >= PREFILL_QUANTUM:
                self._token_s = dt if not self._token_s else 0.8 * self._token_s + 0.2 * dt
            s.todo = s.todo[n:]
            if not s.todo:
                s.logits = logits
            if budget is not None:
                budget -= n
        return fed

    def _urgent(self) -> None:
        """A yield point inside a decode step or a prompt chunk (about once a layer): a waiting
        request of one sequence, of a better tier than every running one's, is prefilled whole and
        sampled now, and its first token emitted, instead of after the step. It joins the batch at
        the next iteration (the batch then over full by it, a worse tier's sequence is preempted)."""
        if not self._waiting or self._held:
            return
        best = min((s.request.rank for s in self._running), default=len(TIERS))
        with self._cond:
            t = next((w for w in self._waiting if w.rank < best and w.n == 1 and not w.cancelled), None)
            if t is None:
                return
            self._waiting.remove(t)
            t.started = t.running = 1
        s = self._prefill(t, 0)
        if s is None:
            return                               # failed, and reported
        try:
            s.logits = prefill(self.exe, s.decoder, s.todo)
        except Exception as e:
            self._failed(t, e, "reading the prompt")
            self._running.remove(s)
            self._release(s)
            return
        s.todo = []
        if self._advance(s):
            s.sampled = True
        else:
            self._running.remove(s)

    def _chunk(self) -> int:
        """Prompt tokens to prefill in one iteration while streams decode."""
        if not self._step_s or not self._token_s:
            n = 2 * PREFILL_QUANTUM
        else:
            n = int(self.prefill_share * self._step_s / self._token_s)
        return max(PREFILL_QUANTUM, min(self.prefill_tokens, n // PREFILL_QUANTUM * PREFILL_QUANTUM))

    def _decoder_for(self, t: Ticket) -> tuple[object, int]:
        """A decoder for `t`'s prompt: the prefix cache's, holding the longest cached prefix of the
        prompt (of this tenant only), or a fresh one; and how many prompt tokens it already holds."""
        hit = None
        if self.prefix_cache is not None:
            hit = self.prefix_cache.take(t.tenant, t.prompt_ids, fresh=self.exe.decoder)
            if self.metrics is not None:
                labels = {"model": self.name, "tenant": t.tenant, "tier": t.tier}
                self.metrics.prefix_lookups.inc(outcome="hit" if hit else "miss", **labels)
                if hit:
                    self.metrics.prefix_tokens.inc(hit[1], **labels)
        return hit if hit is not None else (self.exe.decoder(), 0)

    def _resume(self, s: _Seq) -> None:
        """Put a preempted sequence back in the batch (its KV cache kept; one dropped by an engine
        iteration that failed is rebuilt: its prompt and the tokens it fed so far prefilled again)."""
        if s.decoder is not None:
            self._running.append(s)
            return
        try:
            s.decoder = self.exe.decoder()
            prefill(self.exe, s.decoder, s.request.prompt_ids + s.fed)
        except Exception as e:
            self._failed(s.request, e, "resuming")
            return
        self._running.append(s)

    def _advance(self, s: _Seq) -> bool:
        """Sample one token for `s` and emit its text; False when the sequence has finished."""
        t, core = s.request, s.core
        piece = core.step(s.logits)
        now = time.perf_counter()
        if s.first == 0.0:
            s.first = now
        elif self.metrics is not None:
            self.metrics.inter_token.observe(now - s.last, model=self.name, tier=t.tier)
        s.last = now
        if core.kept:
            t.generated += 1
        if core.finish_reason:
            return self._finish(s, piece + core.flush())        # flush is "" after a stop string
        if piece:
            self._emit(t, Delta(s.index, piece, core.take_logged()))
        s.fed.append(core.token)
        return True

    def _finish(self, s: _Seq, text: str) -> bool:
        t, core = s.request, s.core
        if self.metrics is not None and core.generated > 1:
            self.metrics.time_per_output_token.observe((s.last - s.first) / (core.generated - 1),
                                                       model=self.name, tier=t.tier)
        if self.prefix_cache is not None and s.decoder is not None:     # before Finished: the next turn may follow
            self.prefix_cache.put(t.tenant, t.prompt_ids + s.fed, s.decoder)     # its KV: prompt + fed tokens
        if text or core.logged:
            self._emit(t, Delta(s.index, text, core.take_logged()))
        self._emit(t, Finished(s.index, core.finish_reason, core.generated))
        return self._release(s)

    @staticmethod
    def _release(s: _Seq) -> bool:
        t = s.request
        s.decoder, s.logits = None, None         # the KV cache goes with its decoder
        t.running -= 1
        if t.running <= 0 and (t.started >= t.n or t.cancelled):
            t.done = True
        return False

    def _emit(self, t: Ticket, event) -> None:
        try:
            t.sink(event)
        except Exception:                   # the owner went away (event loop closed): drop the request
            t.cancelled = True

    def _failed(self, t: Ticket, e: Exception, doing: str) -> None:
        """Report `e`, raised while `doing`: a user's mistake (InputError) as itself with 400, else
        an internal error with 500 (the traceback to the log)."""
        log.exception("%s failed", doing)
        bad = isinstance(e, InputError)
        self._fail(t, str(e) if bad else f"internal error while {doing}", 400 if bad else 500)

    def _fail(self, t: Ticket, message: str, status: int = 500) -> None:
        t.cancelled = True                   # its other sequences leave the batch
        if not t.done:
            t.done = True
            self._emit(t, Failed(message, status))

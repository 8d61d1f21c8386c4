"""Batched decoding: one decode step for many conversations, each with its own KV cache.

`decode_batch(exe, decoders, token_ids)` feeds token_ids[i] to decoders[i] and returns the
next-token logits of every conversation as one [B, vocab] array. It is what continuous batching
(runtime/engine.py) calls once per step for all the requests in flight; `prefill(exe, decoder,
ids)` is its one-request, many-token companion.

An executable may provide its own `decode_batch(decoders, token_ids)`; the generic fallback loops
over `decoder.step`. The reference target has a real batched version (`BatchPlan`): the graph runs
once with batch B for all the row-wise work (embedding, the linear layers, norms, rope with each
row's own position, activations, the LM head), which is where a step's time goes and what makes
B streams cost far less than B steps. The KV-cache concat writes into one padded array per layer
(in place while the batch is stable) and attention runs over it with each row masked to its own
cache length. The graph interface is unchanged: the plan drives the same decoder graph
(its DecoderInterface: token ids, positions and past caches in; logits and present caches out)
and the decoders keep their
`FunctionalDecoder` caches, so any of them can go on stepping alone.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from isthmus.compiler.ops import OPS, ROW_WISE
from isthmus.errors import InputError


def decode_batch(exe, decoders: list, token_ids: list[int], between=None) -> np.ndarray:
    """Logits [B, vocab] after feeding one token to each decoder (each advances by one).
    `between`: a callable run at the step's yield points where the target has them (numba: about
    once a layer; none of these decoders may be used in it), else not at all."""
    if len(decoders) != len(token_ids):
        raise InputError(f"{len(decoders)} decoders but {len(token_ids)} tokens")
    if not decoders:
        raise InputError("decode_batch needs at least one decoder")
    own = getattr(exe, "decode_batch", None)
    if own is not None:
        return own(decoders, token_ids, between) if between is not None and _yields(exe) else own(decoders, token_ids)
    return step_each(decoders, token_ids)


def step_each(decoders: list, token_ids: list[int]) -> np.ndarray:
    """The generic fallback: one `step` per decoder (copies, since a step may return a view of a
    buffer that its next step overwrites)."""
    return np.stack([np.array(d.step([int(t)]), np.float32) for d, t in zip(decoders, token_ids)])


class _Ragged(list):
    """One array per request (their shapes differ: each KV cache has its own length)."""


class _Padded:
    """The KV caches of B requests after this step's concat, in one zero-padded array
    [B, kv_heads, longest, head_dim]; request b owns positions [0, lengths[b])."""

    def __init__(self, buf: np.ndarray, lengths: np.ndarray):
        self.buf, self.lengths = buf, lengths

    def row(self, b: int) -> np.ndarray:
        return self.buf[b:b + 1, :, :self.lengths[b]]


DENSE, EACH, CACHE_CONCAT, PADDED_ATTENTION = "dense", "each", "cache-concat", "padded-attention"


class BatchPlan:
    """How to run a reference executable's decoder graph for B requests at once.

    Each node runs in one of four modes: DENSE (once for the batch: row-wise ops), CACHE_CONCAT
    (past_* ++ this step's keys, written into one padded array), PADDED_ATTENTION (attention over
    that array, each row masked to its own length) and EACH (once per request, the general case).
    Raises ValueError when the graph is not row-wise along its batch dim; `plan_for` then answers
    None and callers fall back to per-request steps.
    """

    def __init__(self, exe):
        g = exe.graph
        if g.decoder is None or g.decoder.position_ids is None or not g.decoder.kv:
            raise ValueError("not a decoder graph with positions and a KV cache")
        if g.decoder.attention_mask is not None:
            raise ValueError("the graph takes an attention mask")
        d = g.decoder.resolve(g)
        self.exe = exe
        self.ids, self.pos, self.logits = d.input_ids, d.position_ids, d.logits
        batch = self.ids.shape[0]
        if not isinstance(batch, str):
            raise ValueError("the batch dim of input_ids is not symbolic")
        self.pasts = d.pasts
        if len(self.pasts) + 2 != len(g.inputs):
            raise ValueError("the graph has inputs besides the decoder interface's")
        consts = {id(v) for v in g.constants}
        self.outputs = {id(v) for v in g.outputs}
        past_ids = {id(v) for v in self.pasts}
        ragged = set(past_ids)            # values held per request
        padded = set()                    # values held as _Padded

        def batched(v):
            return bool(v.shape) and v.shape[0] == batch

        self.modes = []
        for n in g.nodes:
            # A ROW_WISE op run once for B rows equals B runs (see the trait in compiler/ops).
            if n.op not in OPS or ROW_WISE not in OPS[n.op].traits:
                raise ValueError(f"op {n.op} is not known to be row-wise")
            if n.op in ("concat", "softmax") and n.attrs.get("axis", -1) % len(n.outputs[0].shape) == 0:
                raise ValueError(f"{n.op} along the batch axis")
            if n.op == "transpose" and list(n.attrs["perm"])[:1] != [0]:
                raise ValueError("transpose moves the batch axis")
            for v in [*n.inputs, *n.outputs]:
                if id(v) not in consts and not batched(v):
                    raise ValueError(f"value {v.name} ({v.type}) does not lead with the batch dim")
            ins = [id(v) for v in n.inputs]
            if (n.op == "concat" and len(ins) == 2 and ins[0] in past_ids and ins[1] not in ragged | padded
                    and len(n.outputs[0].shape) == 4 and n.attrs["axis"] % 4 == 2):
                mode = CACHE_CONCAT
            elif n.op == "attention" and len(ins) == 3 and ins[1] in padded and ins[2] in padded \
                    and ins[0] not in ragged | padded and not n.attrs["softcap"] and not n.attrs["window"]:
                mode = PADDED_ATTENTION
            elif n.op == "attention" or any(i in ragged or i in padded for i in ins):
                mode = EACH
            else:
                mode = DENSE
            self.modes.append(mode)
            if mode == CACHE_CONCAT:
                padded.add(id(n.outputs[0]))
            elif mode == EACH:
                ragged.update(id(v) for v in n.outputs if id(v) in self.outputs)
        self.per_request = [m != DENSE for m in self.modes]
        # Only each request's last position is sampled from: the LM head (a fifth of a small model's
        # weights) runs on that row alone, which matters for prefills.
        producer = self.logits.producer
        head = next((i for i, n in enumerate(g.nodes) if n is producer), None)
        self.head = head if head is not None and producer.op == "linear" and self.modes[head] == DENSE \
            and len(producer.inputs[0].shape) == 3 else None
        self._local = threading.local()
        # numpy's matmul of a [B, S, D] stack with a transposed weight loops over the stack
        # without BLAS; as one [B*S, D] matrix the weight is read once for every row.
        self.impls = [_linear_2d if n.op == "linear" else impl for n, impl in zip(g.nodes, exe._impls)]
        last: dict[int, int] = {}
        for i, n in enumerate(g.nodes):
            for v in n.inputs:
                last[id(v)] = i
        self.free_after = [[] for _ in g.nodes]
        for vid, i in last.items():
            if vid not in self.outputs and vid not in consts:
                self.free_after[i].append(vid)

    def run(self, decoders: list, tokens: list[list[int]]) -> np.ndarray:
        """Feed tokens[i] (the same count S for every request) to decoders[i]; logits of each
        request's last position, [B, vocab]. S = 1 is a decode step; B = 1 a prefill."""
        exe, g = self.exe, self.exe.graph
        B = len(decoders)
        ids = np.asarray(tokens, np.int64)
        if ids.ndim != 2 or ids.shape[0] != B or ids.shape[1] == 0:
            raise InputError("batched steps need the same number (>= 1) of tokens for every request")
        past_len = np.asarray([d.cache.length for d in decoders], np.int64)
        state = self._local.__dict__.setdefault("caches", {})     # per thread: engines may share a plan
        env = dict(exe._consts)
        env[id(self.ids)] = ids
        env[id(self.pos)] = past_len[:, None] + np.arange(ids.shape[1])
        for v in self.pasts:
            env[id(v)] = _Ragged(d.cache.arrays[v.name] for d in decoders)
        for i, (node, impl) in enumerate(zip(g.nodes, self.impls)):
            args = [env[id(v)] for v in node.inputs]
            mode = self.modes[i]
            if i == self.head:
                args[0] = args[0][:, -1:]
            if mode == DENSE:
                results = impl(*args, **node.attrs)
                results = [results] if len(node.outputs) == 1 else list(results)
            elif mode == CACHE_CONCAT:
                results = [_cache_concat(state, i, args[0], args[1], past_len)]
            elif mode == PADDED_ATTENTION:
                results = [_padded_attention(*args, past_len, causal=node.attrs["causal"], scale=node.attrs["scale"])]
            else:
                rows = []
                for b in range(B):
                    r = impl(*(_row(a, v, b, exe._consts) for a, v in zip(args, node.inputs)), **node.attrs)
                    rows.append([r] if len(node.outputs) == 1 else list(r))
                results = []
                for k, v in enumerate(node.outputs):
                    per = [row[k] for row in rows]
                    if id(v) in self.outputs or len({a.shape for a in per}) > 1:
                        results.append(_Ragged(per))
                    else:
                        results.append(np.concatenate(per, axis=0))
            for v, r in zip(node.outputs, results):
                env[id(v)] = r
            for vid in self.free_after[i]:
                env.pop(vid, None)
        for b, d in enumerate(decoders):
            d.cache.update({v.name: _pick(env[id(v)], b) for v in g.outputs if v is not self.logits})
        logits = env[id(self.logits)]
        if isinstance(logits, _Ragged):
            logits = np.concatenate(logits, axis=0)
        return logits[:, -1]


def _cache_concat(state: dict, key, pasts: list, new: np.ndarray, past_len: np.ndarray) -> _Padded:
    """Each request's cache followed by its new keys, in one zero-padded [B, heads, T, dim] array.

    The array keeps spare positions: when the same requests come back for the next step with their
    caches still the rows of this array (as the last step left them), the new keys are written in
    place and nothing is copied. Any other batch gets a fresh array. Rows are never shared, and a
    view handed out earlier never covers a position written later, so the caches stay immutable
    to everyone who holds them."""
    B, h, s, d = new.shape
    lengths = past_len + s
    last = state.get(key)
    buf = last[0]() if last is not None else None      # a weak reference: finished requests free it
    if buf is not None and buf.shape[2] >= int(lengths.max()) and len(last[1]) == B:
        for b, past in enumerate(pasts):
            if past.base is not buf or last[1][b] != int(past_len[b]) or \
                    past.ctypes.data != buf[b].ctypes.data or past.shape[2] != int(past_len[b]):
                buf = None
                break
    else:
        buf = None
    if buf is None:
        buf = np.zeros((B, h, int(lengths.max()) + _HEADROOM, d), np.float32)
        for b, past in enumerate(pasts):
            buf[b, :, :int(past_len[b])] = past[0]
    for b in range(B):
        n = int(past_len[b])
        buf[b, :, n:n + s] = new[b]
    state[key] = (weakref.ref(buf), [int(x) for x in lengths])
    return _Padded(buf, lengths)


_HEADROOM = 64      # spare positions per batched cache array, so ~64 steps of a stable batch copy nothing


def _padded_attention(q, k: _Padded, v: _Padded, past_len, mask=None, causal=True, scale=0.0):
    """The reference attention of each request over its own cache, for the batch at once: pad
    positions sit beyond every query's causal horizon (or are masked when not causal)."""
    from isthmus.compiler.ops.reduce import softmax

    B, hq, s, d = q.shape
    t = int(k.lengths.max())
    keys, values = k.buf[:, :, :t], v.buf[:, :, :t]                 # views: the spare positions stay out
    hkv = keys.shape[1]
    group = hq // hkv
    scale = scale or 1.0 / float(np.sqrt(d))
    qg = q.astype(np.float32).reshape(B, hkv, group * s, d)        # query head h reads kv head h // group
    scores = np.matmul(qg, np.swapaxes(keys, -1, -2)) * np.float32(scale)
    pos = np.arange(t)[None, None, :]
    if causal:
        limit = past_len[:, None, None] + np.tile(np.arange(s), group)[None, :, None]   # [B, group*s, 1]
        allowed = pos <= limit
    else:
        allowed = np.broadcast_to(pos < k.lengths[:, None, None], (B, group * s, t))
    scores = np.where(allowed[:, None], scores, -np.inf)
    p = softmax(scores.astype(np.float32), axis=-1)
    return np.matmul(p, values).reshape(B, hq, s, d).astype(q.dtype, copy=False)


def _linear_2d(x, weight, bias=None):
    from isthmus.compiler.ops.matmul import dense

    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ dense(weight).T
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False).reshape(*x.shape[:-1], y.shape[-1])


def _row(a, v, b, consts):
    if isinstance(a, _Ragged):
        return a[b]
    if isinstance(a, _Padded):
        return a.row(b)
    if id(v) in consts:
        return a
    return a[b:b + 1]


def _pick(a, b):
    if isinstance(a, _Ragged):
        return a[b]
    if isinstance(a, _Padded):
        return a.row(b)
    return a[b:b + 1]


def plan_for(exe):
    """The cached BatchPlan of a reference executable, or None when its graph cannot batch."""
    cached = exe.__dict__.get("_batch_plan", ...)
    if cached is ...:
        try:
            cached = BatchPlan(exe)
        except ValueError:
            cached = None
        exe.__dict__["_batch_plan"] = cached
    return cached


def reference_decode_batch(exe, decoders: list, token_ids: list[int]) -> np.ndarray:
    """`Executable.decode_batch` for the reference interpreter: one batched graph run when every
    decoder is a FunctionalDecoder of `exe` and the graph is row-wise, else per-request steps."""
    if len(decoders) != len(token_ids):
        raise InputError(f"{len(decoders)} decoders but {len(token_ids)} tokens")
    plan = _plan_for_decoders(exe, decoders)
    if plan is None or exe.batch_invariant:       # the batch plan's BLAS rounds B rows as a block
        return step_each(decoders, token_ids)
    return plan.run(decoders, [[int(t)] for t in token_ids])


def prefill(exe, decoder, ids: list[int], between=None) -> np.ndarray:
    """Feed a prompt to one decoder; the logits of its last position. The reference target runs
    it through the batch plan (whose linear layers use BLAS on the whole [seq, D] block).
    `between`: as for `decode_batch`."""
    plan = _plan_for_decoders(exe, [decoder])
    if plan is None or exe.batch_invariant:
        if between is not None and _yields(exe):
            return np.array(decoder.step(list(ids), between), np.float32)
        return np.array(decoder.step(list(ids)), np.float32)
    return plan.run([decoder], [list(ids)])[0]


def _yields(exe) -> bool:
    """Whether `exe`'s steps take a `between` callable (yield points): the numba target's."""
    from isthmus.compiler.lower.numba import NumbaExecutable
    return isinstance(exe, NumbaExecutable) and exe.in_place_cache


def _plan_for_decoders(exe, decoders):
    from isthmus.compiler.executable import Executable
    from isthmus.compiler.kv_cache import FunctionalDecoder

    if type(exe).run is not Executable.run:
        return None             # a lowered target: its own run, decoders and (maybe) decode_batch
    if not all(type(d) is FunctionalDecoder and d.exe is exe for d in decoders):
        return None
    return plan_for(exe)

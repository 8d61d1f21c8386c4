"""Lowering for `--target numba`: the fusion pass's plan bound to the Numba kernels.

The plan (compiler/lower/plan.py) is the backend-neutral part, shared with the Triton lowering;
this module binds its steps to the kernels in isthmus.kernels.numba over planned buffers.

Plan format
  `make_plan(graph) -> Plan`, after `compiler.passes.fusion` has grouped the nodes:
  Plan.steps    list[Step] in execution order, one kernel call each:
      step.kind      "linear" | "attention" | "embedding" | "op"   (the fusion group's kind)
      step.group     the fusion Group: its nodes, the input/output Values, and `attrs`
                     (linear: norm node or None, linears, weights, epilogue None|"add"|"swiglu"|"qkv",
                      residual Value, qkv {q_heads, kv_heads, head_dim, rope, rope_k, positions, past})
      step.ins       Values read (activations and graph inputs; constants are the backend's to pack)
      step.outs      Values written
      step.flops, step.bytes   cost record for one token (linear: 2 * rows * cols, packed weight bytes)
  Plan.caches   list[CachePair(past_k, past_v, present_k, present_v, step)]: the KV appends a decoder
                keeps in place (a `qkv` step writes rows past .. past + seq of a preallocated cache,
                and the attention step reads rows 0 .. past + seq of it)
  Plan.last_use {Value: index of the last step that reads it}

Buffer planning (`BufferPool`): binding a plan for concrete dims {batch, seq} gives every value a
`qkv`/`linear`/`attention`/`embedding` step writes a preallocated buffer; a buffer is reused by a
later value of the same shape and dtype once the last reader of its previous value has run (outputs
are taken before inputs are released, so no step reads and writes the same buffer). `op` steps
(anything without a fused kernel) return fresh arrays. A bound plan is a list of closures
`call(past)`: the decode loop runs the one bound for seq = 1 over and over, allocating nothing.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from isthmus.compiler.executable import Executable, OpProfile
from isthmus.compiler.ir import Graph, Value, eval_dim
from isthmus.compiler.lower.plan import BufferPool, Step, label, make_plan
from isthmus.compiler.passes.fusion import format_groups, groups_of
from isthmus.errors import InputError


# -- the Numba binding -----------------------------------------------------------------------------

def _f32(v: Value) -> np.ndarray:
    data = v.data.dequantize() if hasattr(v.data, "dequantize") else v.data    # bf16 norms, biases
    return np.ascontiguousarray(np.asarray(data), np.float32)


class NumbaExecutable(Executable):
    """A graph lowered to Numba kernels. `run` binds the plan per call; `decoder()` keeps a
    preallocated KV cache and a plan bound for seq = 1, so a decode step allocates nothing."""

    def __post_init__(self):
        from isthmus.kernels.numba import linear

        self.groups = groups_of(self.graph)
        self.plan = make_plan(self.groups)
        self._row_batches = threading.local()
        self._prompt_bindings = threading.local()       # NumbaDecoder's prompt-part bindings (_Prompts)
        self._packed: dict[tuple, object] = {}
        for st in self.plan.steps:
            g = st.group
            if g.kind == "linear":
                g.attrs["packed"] = (self._pack(g.attrs["weights"]) if g.attrs["stacked"] else
                                     Siblings([self._pack([w]) for w in g.attrs["weights"]]))
                b = g.attrs["biases"]
                g.attrs["bias"] = None if b is None else np.concatenate(
                    [_f32(v) if v is not None else np.zeros(w.shape[0], np.float32)
                     for v, w in zip(b, g.attrs["weights"])])
                n = g.attrs["norm"]
                g.attrs["norm_w"] = None if n is None else (_f32(n.inputs[1]), float(n.attrs["eps"]))
            elif g.kind == "embedding":
                g.attrs["packed"] = self._pack([g.nodes[0].inputs[0]])
            elif st.kind == "op":        # chosen once: `run` binds the plan on every call
                g.attrs["impl"] = _op_impl(g.attrs["node"])
        _release_mapped_pages(self.graph)
        # The in-place cache needs every cache pair of the decoder interface appended by a fused
        # qkv step and read only by attention steps (which then read the preallocated cache).
        d = self.graph.decoder.resolve(self.graph) if self.graph.decoder is not None else None
        presents = {v for c in self.plan.caches for v in (c.present_k, c.present_v)}
        self.in_place_cache = (
            d is not None and bool(self.plan.caches) and d.position_ids is not None
            and d.attention_mask is None        # the decoder feeds ids and positions only
            and set(d.pasts) == {v for c in self.plan.caches for v in (c.past_k, c.past_v)}
            and set(d.presents) == presents
            and all(st.kind == "attention" for st in self.plan.steps for v in st.ins if v in presents))

    def _pack(self, weights: list[Value]):
        from isthmus.kernels.numba.linear import pack

        key = tuple(id(w.data) for w in weights)
        if key not in self._packed:
            self._packed[key] = pack([w.data for w in weights])
        return self._packed[key]

    def weight_bytes(self) -> int:
        return sum(p.nbytes for p in self._packed.values())

    def describe(self) -> str:
        return format_groups(self.groups)

    # -- execution -------------------------------------------------------------------------------

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        inputs = self.check_inputs(inputs)
        dims: dict[str, int] = {}
        for v in self.graph.inputs:
            for d, n in zip(v.shape, inputs[v.name].shape):
                if isinstance(d, str):
                    dims[d] = n
        env = {v: inputs[v.name] for v in self.graph.inputs}
        caches = {}
        for c in self.plan.caches:
            past = env[c.past_k]
            b, h, p, hd = past.shape
            total = p + eval_dim(c.present_k.shape[2], dims) - eval_dim(c.past_k.shape[2], dims)
            kc, vc = np.empty((b, h, total, hd), np.float32), np.empty((b, h, total, hd), np.float32)
            kc[:, :, :p], vc[:, :, :p] = past, env[c.past_v]
            caches[c.step] = (kc, vc)
            env[c.present_k], env[c.present_v] = kc, vc
        past_len = next((env[c.past_k].shape[2] for c in self.plan.caches), 0)
        bound = Bound(self, dims, env, caches, last_only=False)
        bound.run(past_len)
        return {v.name: env[v] for v in self.graph.outputs}

    def decoder(self):
        from isthmus.compiler.kv_cache import FunctionalDecoder

        if not self.in_place_cache:
            return FunctionalDecoder(self)
        return NumbaDecoder(self)

    def decode_batch(self, decoders: list, token_ids: list[int], between=None) -> np.ndarray:
        """One decode step for B of this executable's in-place decoders at once: the linear layers
        compute the B rows in one pass over the weights, attention and the KV append work on each
        sequence's own cache (by address). Every row is computed as its sequence would be alone,
        so its logits are bitwise those of `decoder.step`. Other decoders step one by one.
        `between`: called at the step's yield points (`Bound.run`), using none of these decoders."""
        from isthmus.compiler.batch import step_each

        if len(decoders) == 1 and isinstance(decoders[0], NumbaDecoder) and between is not None:
            return np.array(decoders[0].step([int(token_ids[0])], between), np.float32)[None]
        if len(decoders) < 2 or not all(isinstance(d, NumbaDecoder) and d.exe is self for d in decoders) \
                or len({d.capacity for d in decoders}) > 1 or len({id(d) for d in decoders}) < len(decoders):
            return step_each(decoders, token_ids)
        for d in decoders:
            if d.length + 1 > d.capacity:
                raise InputError(f"the KV cache holds {d.capacity} positions; {d.length} used, 1 more asked")
        key = (len(decoders), decoders[0].capacity)
        batches = self._row_batches.__dict__.setdefault("by_size", {})    # per thread: engines may share
        if key not in batches:
            batches[key] = RowBatch(self, *key)
        return batches[key].step(decoders, token_ids, between)


def _release_mapped_pages(graph: Graph) -> None:
    """Drop the model file's pages from this process's resident set once the weights are repacked.

    Quantized constants are views into the memory-mapped GGUF file; reading them to repack faulted
    every page in (file-backed, but counted as resident). MADV_DONTNEED on the read-only mapping
    forgets them; anything still read from it later (f32 norm weights) faults back in from the
    page cache.
    """
    import mmap

    seen = set()
    for v in graph.constants:
        a = getattr(v.data, "raw", v.data)
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        m = a.obj if isinstance(a, memoryview) else a
        if isinstance(m, mmap.mmap) and id(m) not in seen and hasattr(m, "madvise"):
            seen.add(id(m))
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


def _zeros(shape) -> np.ndarray:
    """A zero f32 array in fresh anonymous pages: resident only as it is written (numpy's calloc may
    reuse heap memory and memset all of it, which for a KV cache of the full context is hundreds of MB)."""
    import mmap

    n = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.float32, count=int(np.prod(shape))).reshape(shape)


class Bound:
    """The plan bound to concrete dims and buffers: `run(past)` calls each step's kernel in order."""

    def __init__(self, exe: NumbaExecutable, dims: dict, env: dict, caches: dict, last_only: bool,
                 workspace=None, rows=None):
        from isthmus.kernels.numba.linear import Workspace

        self.exe, self.dims, self.env, self.caches, self.last_only = exe, dims, env, caches, last_only
        # a batched decode step's caches by address (RowCaches); every kernel then works row by row
        # as for one sequence alone, so each row's numbers are those of its sequence alone
        self.rows = rows
        # linears row by row (never one BLAS product over the rows) in a batched step and when the
        # executable is batch-invariant
        self.row_wise = rows is not None or exe.batch_invariant
        # scratch of this binding alone: decoders in different threads never share a buffer
        self.workspace = workspace if workspace is not None else Workspace()
        self._scratch = np.empty(0, np.float32)
        self.pool = BufferPool()
        self._owned: dict[Value, np.ndarray] = {}   # values held in pooled buffers
        self._pinned: set[Value] = set()             # read by an `op` step, which may keep a view
        self.calls, self.kinds = [], []
        self.fixed_caches = False
        plan = exe.plan
        outs = set(exe.graph.outputs)
        for i, st in enumerate(plan.steps):
            self.calls.append(getattr(self, "_bind_" + st.kind)(st))
            self.kinds.append(label(st))
            for v in st.ins:     # outputs were taken above; now release what no later step reads
                if plan.last_use.get(v) == i and v not in outs and v not in self._pinned and v in self._owned:
                    self.pool.give(self._owned.pop(v))

    # buffers ------------------------------------------------------------------------------------
    def scratch(self, rows: int, cols: int) -> np.ndarray:
        if self._scratch.size < rows * cols:
            self._scratch = np.empty(rows * cols, np.float32)
        return self._scratch[: rows * cols].reshape(rows, cols)

    def _buffer(self, v: Value, shape=None) -> np.ndarray:
        shape = tuple(eval_dim(d, self.dims) for d in v.shape) if shape is None else shape
        a = self.pool.take(shape)
        self._owned[v] = a
        self.env[v] = a
        return a

    def _static(self, v: Value):
        """A 2-D [rows, last] view of v's buffer when a fused step owns it (fixed for this binding)."""
        a = self.env.get(v)
        if v in self._owned and a.flags.c_contiguous and a.dtype == np.float32:
            return a.reshape(-1, a.shape[-1])
        return None

    def _rows(self, v: Value):
        """A getter of the 2-D [rows, last] view of v's value at run time."""
        view = self._static(v)
        if view is not None:
            return lambda: view
        env = self.env
        return lambda: np.ascontiguousarray(env[v], np.float32).reshape(-1, env[v].shape[-1])

    # steps --------------------------------------------------------------------------------------
    def _bind_linear(self, st: Step):
        from isthmus.kernels.numba import linear as L
        from isthmus.kernels.numba.rope import inv_freq, qkv_epilogue, qkv_epilogue_rows

        g, exe = st.group, self.exe
        w, epi = g.attrs["packed"], g.attrs["epilogue"]
        x_val = (g.attrs["norm"].inputs[0] if g.attrs["norm"] is not None else g.attrs["linears"][0].inputs[0])
        x_get = self._rows(x_val)
        norm = g.attrs["norm_w"]
        ws = self.workspace
        bias = g.attrs["bias"]           # the siblings' biases stacked as their weights are, or None
        if epi == "qkv":
            q = g.attrs["qkv"]
            caches = self.caches          # read at each call: a shared prompt binding is re-pointed (NumbaDecoder)
            q_out = self._buffer(g.outputs[0])
            n = q_out.shape[0] * q_out.shape[2]
            qkv = np.empty((n, w.rows), np.float32)
            h = np.empty((n, w.cols), np.float32) if norm else None
            hd = q["head_dim"]
            if q["rope"] is None:       # no rotary: angle 0 turns nothing (cos 1, sin 0 exactly)
                static_pos = np.zeros((q_out.shape[0], q_out.shape[2]), np.int64)
                pos_get, inv, inter = (lambda: static_pos), np.zeros(hd // 2, np.float32), False
            else:
                pos_get = self._positions(q["positions"], q_out.shape[0], q_out.shape[2])
                inv = inv_freq(q["rope"]["dim"] or hd, q["rope"]["theta"], q["rope"]["factors"])
                inter = q["rope"]["layout"] == "interleaved"
            nq, nkv, rope_k = q["q_heads"], q["kv_heads"], q["rope_k"]
            empty = np.empty(0, np.float32)
            qn, kn, n_eps = (empty, empty, np.float32(0.0)) if q["head_norms"] is None else (
                _f32(q["head_norms"][0]), _f32(q["head_norms"][1]), np.float32(q["head_norms"][2]))

            project = self._projection(w, self._static(x_val), x_get, qkv, norm, h)
            if q["positions"] is None or self.env.get(q["positions"]) is not None:
                pos = pos_get()             # fixed for this binding (a decode step's)
                pos_get = lambda: pos       # noqa: E731

            if self.rows is not None:
                rows = self.rows
                k_addr, v_addr = rows.tables(st)

                def call_rows(past):
                    project()
                    if bias is not None:
                        np.add(qkv, bias, out=qkv)
                    qkv_epilogue_rows(qkv, pos_get(), inv, inter, nq, nkv, rope_k, q_out, k_addr, v_addr,
                                      rows.capacity, rows.pasts, qn, kn, n_eps)
                return call_rows

            def call(past):
                project()
                if bias is not None:
                    np.add(qkv, bias, out=qkv)
                kc, vc = caches[st]
                qkv_epilogue(qkv, pos_get(), inv, inter, nq, nkv, rope_k, q_out, kc, vc, past, qn, kn, n_eps)
            return call
        if epi == "swiglu" and isinstance(w, Siblings):
            out = self._buffer(g.outputs[0]).reshape(-1, g.outputs[0].shape[-1])
            gu = np.empty((out.shape[0], w.rows), np.float32)
            project = self._projection(w, self._static(x_val), x_get, gu, norm,
                                       np.empty((out.shape[0], w.cols), np.float32) if norm else None)

            def call(past):
                project()
                L.swiglu_rows(gu, out)
            return call
        if len(g.attrs["linears"]) > 1 and epi is None:
            # siblings with no shared epilogue (a GeGLU's gate and up): one pass over the stacked
            # weight into a scratch row block, then each linear's columns into its own buffer
            outs = [self._buffer(v).reshape(-1, v.shape[-1]) for v in g.outputs]
            y = np.empty((outs[0].shape[0], w.rows), np.float32)
            h = np.empty((y.shape[0], w.cols), np.float32) if norm else None
            cols = np.cumsum([0, *w.splits])
            project = self._projection(w, self._static(x_val), x_get, y, norm, h)

            def call(past):
                project()
                if bias is not None:
                    np.add(y, bias, out=y)
                for o, lo, hi in zip(outs, cols[:-1], cols[1:]):
                    o[:] = y[:, lo:hi]
            return call
        return _then_add(self._bind_one_output(st, g, w, epi, x_val, x_get, norm, ws), self.env, g.outputs[0], bias)

    def _projection(self, w, x_static, x_get, out, norm, h):
        """A call that writes [rmsnorm](x) @ W.T into `out` [n, w.rows]: the matvec kernel bound once
        when x has a fixed buffer and few rows (a decode step), else `linear` on x's current value;
        for `Siblings`, one such product per weight into its columns (the norm computed once, into h)."""
        from isthmus.kernels.numba import linear as L

        ws = self.workspace
        if isinstance(w, Siblings):
            fused = None if x_static is None else L.siblings_call(x_static, w.parts, out, ws, norm=norm, h=h,
                                                                    row_wise=self.row_wise)
            if fused is not None:       # one launch for all the siblings, straight into their columns
                fn, args = fused
                call = (lambda: fn(*args))
                call.out = out
                return call
            cols = np.cumsum([0, *w.splits])
            parts = [self._projection(p, x_static, x_get, np.empty((out.shape[0], p.rows), np.float32),
                                      norm if i == 0 else None, h if i == 0 else None)
                     for i, p in enumerate(w.parts[:1])]
            hx = (lambda: h) if norm is not None else x_get    # the later siblings read the normalised rows
            hs = h if norm is not None else x_static
            parts += [self._projection(p, hs, hx, np.empty((out.shape[0], p.rows), np.float32), None, None)
                      for p in w.parts[1:]]
            scratch = [p.out for p in parts]

            def siblings():
                for part, buf, lo, hi in zip(parts, scratch, cols[:-1], cols[1:]):
                    part()
                    out[:, lo:hi] = buf
            return siblings
        bound = None if x_static is None else L.matvec_call(x_static, w, out, ws, norm=norm, h=h,
                                                          row_wise=self.row_wise)
        if bound is not None:
            fn, args = bound
            call = (lambda: fn(*args))
        else:
            call = (lambda: L.linear(x_get(), w, out, ws, norm=norm, h=h, row_wise=self.row_wise))
        call.out = out
        return call

    def _bind_one_output(self, st, g, w, epi, x_val, x_get, norm, ws):
        from isthmus.kernels.numba import linear as L

        exe = self.exe
        out_val = g.outputs[0]
        x_rows = x_get
        x_static = self._static(x_val)
        if self.last_only and out_val in set(exe.graph.outputs) and epi is None:
            # a decoder needs the logits of the last position only: row-wise ops allow the cut
            b = eval_dim(out_val.shape[0], self.dims)
            out = self._buffer(out_val, (b, 1, out_val.shape[-1]))

            def x_rows():
                x2 = x_get()
                return x2.reshape(b, -1, x2.shape[-1])[:, -1]
            if x_static is not None and b == 1:
                x_static = x_static[-1:]
        else:
            out = self._buffer(out_val)
        out2 = out.reshape(-1, out.shape[-1])
        h = np.empty((out2.shape[0], w.cols), np.float32) if norm else None
        kw = dict(epilogue={None: L.EPI_NONE, "add": L.EPI_ADD, "swiglu": L.EPI_SWIGLU}[epi], norm=norm, h=h)
        if epi == "add":
            res_static = self._static(g.attrs["residual"])
            if x_static is not None and res_static is not None:
                bound = L.matvec_call(x_static, w, out2, ws, res=res_static, row_wise=self.row_wise,
                                      **kw)
                if bound is not None:        # a decode step: the kernel and its arguments, bound once
                    fn, args = bound
                    return lambda past: fn(*args)
            res_get = self._rows(g.attrs["residual"])

            def call(past):
                L.linear(x_rows(), w, out2, ws, res=res_get(), row_wise=self.row_wise, **kw)
            return call
        if x_static is not None:
            bound = L.matvec_call(x_static, w, out2, ws, row_wise=self.row_wise, **kw)
            if bound is not None:
                fn, args = bound
                return lambda past: fn(*args)

        def call(past):
            L.linear(x_rows(), w, out2, ws, row_wise=self.row_wise, **kw)
        return call

    def _positions(self, v: Value, b: int, s: int):
        a = self.env.get(v)
        if isinstance(a, np.ndarray) and a.shape == (b, s) and a.dtype == np.int64 and a.flags.c_contiguous:
            return lambda: a
        env = self.env
        return lambda: np.ascontiguousarray(np.broadcast_to(np.asarray(env[v], np.int64).reshape(-1, s), (b, s)))

    def _bind_attention(self, st: Step):
        from isthmus.kernels.numba.attention import BLAS_MIN_SEQ, attention_kv, row_kernel

        node = st.group.attrs["node"]
        qv, kv, vv = node.inputs
        out = self._buffer(st.outs[0])
        causal = bool(node.attrs["causal"])
        softcap, window = float(node.attrs["softcap"]), int(node.attrs["window"])
        hd = qv.shape[3]
        scale = np.float32(node.attrs["scale"] or 1.0 / np.sqrt(hd))
        env = self.env
        if self.rows is not None:
            from isthmus.kernels.numba.attention import attention_rows

            rows = self.rows
            k_addr, v_addr = rows.tables(next(c.step for c in self.exe.plan.caches
                                              if c.present_k is kv and c.present_v is vv))
            kvh = kv.shape[1]

            def call_rows(past):
                q = env[qv]
                jobs = q.shape[0] * q.shape[1] * q.shape[2]
                attention_rows(q, k_addr, v_addr, kvh, rows.capacity, rows.pasts, causal, scale, out,
                               self.scratch(jobs, int(rows.pasts.max()) + q.shape[2]), np.float32(softcap),
                               np.int64(window))
            return call_rows
        caches = self.caches
        step = next((c.step for c in self.exe.plan.caches
                     if c.present_k is kv and c.present_v is vv and c.step in caches), None)
        cache = caches[step] if step is not None else None

        q_static = env.get(qv) if qv in self._owned else None
        if (cache is not None and q_static is not None and q_static.shape[2] < BLAS_MIN_SEQ
                and row_kernel(q_static.shape[2], hd, self.row_wise)):
            # a decode binding: the kernel and its arguments fixed once, the dispatch rule inline
            # (attention_kv's, without its Python per call: a decode step makes one such call a
            # layer); its scratch a layer spans the cache's capacity, so only for a few queries
            from isthmus.kernels.numba.attention import attention_rows
            from isthmus.kernels.numba.kv_rows import batch_addresses

            q = q_static
            k, v = cache
            nb, hq, seq, hd = q.shape
            scratch = np.empty((nb * hq * seq, k.shape[2]), np.float32)
            k_addr, v_addr, kvh, capacity = batch_addresses(k), batch_addresses(v), k.shape[1], k.shape[2]
            pasts = np.zeros(nb, np.int64)
            cap, win = np.float32(softcap), np.int64(window)

            self.fixed_caches = True      # the caches' addresses are in the call: not to be re-pointed

            def call_decode(past):
                pasts[:] = past
                attention_rows(q, k_addr, v_addr, kvh, capacity, pasts, causal, scale, out, scratch, cap, win)
            return call_decode

        def call(past):
            q = env[qv]
            if q.dtype != np.float32 or not q.flags.c_contiguous:
                q = np.ascontiguousarray(q, np.float32)
            if step is not None:
                (k, v), p = caches[step], past
            else:
                k, v = (np.ascontiguousarray(env[x], np.float32) for x in (kv, vv))
                p = k.shape[2] - q.shape[2]
            jobs = q.shape[0] * q.shape[1] * q.shape[2]
            attention_kv(q, k, v, p, causal, scale, out, self.scratch(jobs, p + q.shape[2]), softcap, window,
                         self.row_wise)
        return call

    def _bind_embedding(self, st: Step):
        from isthmus.kernels.numba.linear import embedding

        node = st.group.attrs["node"]
        table, ids_v = node.inputs
        p = st.group.attrs["packed"]
        out = self._buffer(st.outs[0])
        out2 = out.reshape(-1, out.shape[-1])
        env, vocab = self.env, table.shape[0]

        def call(past):
            ids = env[ids_v].reshape(-1)
            if ids.size == 1:                      # a decode step: one id, checked as a scalar
                if not 0 <= ids[0] < vocab:
                    raise InputError(f"token id out of range [0, {vocab}): {ids[0]}")
            elif ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise InputError(f"token id out of range [0, {vocab}): min {ids.min()}, max {ids.max()}")
            embedding(p, ids, out2)
        return call

    def _bind_op(self, st: Step):
        attrs = st.group.attrs
        node, impl = attrs["node"], attrs["impl"]
        env = self.env
        ins, outs = node.inputs, node.outputs
        consts = attrs.get("consts")
        if consts is None:         # on first use: a quantized constant is dequantized once, not per call
            consts = attrs["consts"] = {v: (v.data.dequantize() if hasattr(v.data, "dequantize") else v.data)
                                        for v in ins if v.is_constant}
        self._pinned.update(v for v in ins if v in self._owned)

        def call(past):
            args = [consts[v] if v in consts else env[v] for v in ins]
            r = impl(*args, **node.attrs)
            if len(outs) == 1:
                env[outs[0]] = r
            else:
                for v, a in zip(outs, r):
                    env[v] = a
        return call

    def run(self, past: int, between=None):
        """Every kernel call in order; `between()` after every YIELD_EVERY of them (a server's engine
        serves a request of a better tier there, without waiting for the whole step)."""
        from isthmus.kernels.numba.threads import pace

        exe = self.exe
        pace()                     # fewer threads while other processes hold the cores (threads.py)
        if between is not None and not exe.profiling:
            for i, call in enumerate(self.calls):
                call(past)
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    between()
            return
        if not exe.profiling:
            for call in self.calls:
                call(past)
            return
        prof = exe._profile
        for call, kind in zip(self.calls, self.kinds):
            t0 = time.perf_counter()
            call(past)
            p = prof.setdefault(kind, OpProfile(kind))
            p.calls += 1
            p.seconds += time.perf_counter() - t0


YIELD_EVERY = 5      # kernel calls between two yield points of `Bound.run`: about one decoder layer


class Siblings:
    """Sibling weights packed one by one (mixed block formats, which one packed weight cannot hold):
    the group's projection is one product per weight, each into its columns."""

    def __init__(self, parts):
        self.parts = parts
        self.rows, self.cols = sum(p.rows for p in parts), parts[0].cols
        self.splits = tuple(p.rows for p in parts)


def _then_add(call, env, out: Value, bias):
    """`call`, then the bias added to the row block it wrote (after a residual epilogue too: addition
    commutes; the fusion pass gives biased siblings no swiglu epilogue, which would not)."""
    if bias is None:
        return call
    buf = env[out]
    rows = buf.reshape(-1, buf.shape[-1])

    def with_bias(past):
        call(past)
        np.add(rows, bias, out=rows)
    return with_bias


def _op_impl(node):
    """A Numba kernel for an op outside any fused group, where one applies; else the reference."""
    from isthmus.compiler.ops import get_op
    from isthmus.kernels.numba import activation, norm, rope, softmax

    ref = get_op(node.op).reference
    f32 = all(v.dtype == "f32" for v in node.outputs)
    table = {
        "rmsnorm": lambda x, w, eps: norm.rmsnorm(x, w, eps),
        "layernorm": lambda x, w, b=None, eps=1e-5: norm.layernorm(x, w, b, eps),
        "softmax": lambda x, axis: softmax.softmax(x, axis),
        "swiglu": lambda g, u: activation.swiglu(g, u) if g.shape == u.shape else ref(g, u),
        "silu": lambda x: activation.silu(x),
        "gelu": lambda x, approximate: activation.gelu(x, approximate),
        "rope": lambda x, pos, theta, layout, dim, factors: rope.rope(x, pos, theta, layout, dim, factors=factors),
    }
    if f32 and node.op in table:
        return table[node.op]
    if f32 and node.op == "attention" and len(node.inputs) == 3:
        from isthmus.kernels.numba.attention import attention

        def attn(q, k, v, causal, scale, softcap=0.0, window=0):
            b, h, s, hd = q.shape
            k, v = np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32)
            out = attention(q, k, v, k.shape[2] - s, causal, scale, softcap=softcap, window=window)
            return out.reshape(b, s, h, hd).transpose(0, 2, 1, 3)
        return attn
    return ref


class NumbaDecoder:
    """The decoder protocol over a preallocated, in-place KV cache.

    `step(ids)` returns the last position's logits as a view of a buffer that the next step
    overwrites (copy it to keep it). The cache holds `capacity` positions (the model's context
    length); its pages are touched only as it fills.
    """

    def __init__(self, exe: NumbaExecutable, capacity: int | None = None):
        from isthmus.compiler.executable import context_length

        self.exe = exe
        self.capacity = capacity or (context_length(exe) if exe.model is not None else 2048)
        self.caches = {}
        for c in exe.plan.caches:
            _, h, _, hd = c.past_k.shape
            self.caches[c.step] = (_zeros((1, h, self.capacity, hd)), _zeros((1, h, self.capacity, hd)))
        self.length = 0
        self._bound: dict[int, tuple] = {}
        from isthmus.kernels.numba.kv_rows import address
        from isthmus.kernels.numba.linear import Workspace
        self.workspace = Workspace()
        # its caches' data addresses in plan order (K, V): what a batched step (RowBatch) reads
        self.addresses = np.array([[address(self.caches[c.step][i]) for c in exe.plan.caches] for i in (0, 1)],
                                  np.int64)

    def _bind(self, n: int):
        """(bound, ids, pos, logits) for steps of n tokens: for n = 1 this decoder's own, kept; for a
        prompt part, a binding of the executable shared by its decoders on this thread (`_Prompts`),
        re-pointed at this decoder's caches, or one of its own used once."""
        if n == 1:
            if n not in self._bound:
                self._bound[n] = self._new_binding(n, self.caches, self.workspace)
            return self._bound[n]
        return self.exe._prompt_bindings.__dict__.setdefault("lru", _Prompts()).take(self, n)

    def _new_binding(self, n: int, caches: dict, workspace):
        exe = self.exe
        d = exe.graph.decoder.resolve(exe.graph)
        ids = np.zeros((1, n), np.int64)
        pos = np.zeros((1, n), np.int64)
        env = {d.input_ids: ids, d.position_ids: pos}
        dims = {k: size for k, size in zip(d.input_ids.shape, (1, n)) if isinstance(k, str)}
        bound = Bound(exe, dims, env, caches, last_only=True, workspace=workspace)
        # the logits' buffer when a fused step writes it (fixed for this binding), else read per run
        logits = env[d.logits][0, -1] if d.logits in env else (lambda: env[d.logits][0, -1])
        return bound, ids, pos, logits

    def step(self, ids, between=None) -> np.ndarray:
        """Feed `ids`; the last position's logits (for one token a view of a buffer that the next
        step overwrites: copy it to keep it). `between`: called at the step's yield points
        (`Bound.run`); it must not use this decoder."""
        n = len(ids)
        if n == 0:
            raise InputError("step needs at least one token")
        if self.length + n > self.capacity:
            raise InputError(f"the KV cache holds {self.capacity} positions; {self.length} used, {n} more asked")
        entry = self._bind(n)
        bound, id_buf, pos_buf, logits = entry
        if n == 1:
            id_buf[0, 0] = ids[0]
            pos_buf[0, 0] = self.length
            bound.run(self.length, between)
            self.length += 1
            return logits() if callable(logits) else logits
        id_buf[0] = ids
        pos_buf[0] = np.arange(self.length, self.length + n)
        try:
            bound.run(self.length, between)
            out = logits() if callable(logits) else logits
            out = np.array(out, np.float32)        # the binding's buffer is another decoder's next
        finally:
            self.exe._prompt_bindings.lru.give(entry)
        self.length += n
        return out


class _Prompts:
    """Prompt-part bindings of one executable on one thread, by token count, least recently used
    first out: building one costs ~3 ms of Python (more under load, when it competes for the GIL),
    which a server's chunked prompts (parts of 16 tokens) and priority prompts paid every time.
    A binding's caches are re-pointed at the decoder that takes it; one in use (a prompt prefilled
    at another's yield point) is not shared, nor one whose attention holds cache addresses (the
    row kernel's, for parts of 1-15 tokens under --batch-invariant or of 1-3 by default)."""

    KEEP = 8                  # bindings kept
    MAX_TOKENS = 256          # parts longer than this bind once each (their time dwarfs the binding's)

    def __init__(self):
        self.free: dict[int, tuple] = {}           # n -> (entry, caches dict)
        self.busy: dict[int, tuple] = {}           # id(entry) -> (n, caches dict, kept)

    def take(self, decoder, n: int):
        kept = self.free.pop(n, None)
        if kept is None:
            caches = dict(decoder.caches)
            entry = decoder._new_binding(n, caches, None)
            keep = n <= self.MAX_TOKENS and not entry[0].fixed_caches
        else:
            (entry, caches), keep = kept, True
            caches.clear()
            caches.update(decoder.caches)
        self.busy[id(entry)] = (n, caches, keep)
        return entry

    def give(self, entry) -> None:
        n, caches, keep = self.busy.pop(id(entry))
        if not keep or n in self.free:
            entry[0].calls.clear()     # its closures (which hold it) go now, not at a full collection
            return
        self.free[n] = (entry, caches)
        while len(self.free) > self.KEEP:
            old, _ = self.free.pop(next(iter(self.free)))
            old[0].calls.clear()


class RowCaches:
    """A batched binding's view of its sequences' caches: per cache step, the K and V data
    addresses of each sequence (rows of `k`, `v`, in plan order), and each one's length."""

    def __init__(self, exe: NumbaExecutable, batch: int, capacity: int):
        steps = [c.step for c in exe.plan.caches]
        self.k = np.zeros((len(steps), batch), np.int64)
        self.v = np.zeros((len(steps), batch), np.int64)
        self.index = {st: i for i, st in enumerate(steps)}
        self.pasts = np.zeros(batch, np.int64)
        self.capacity = capacity

    def tables(self, step) -> tuple[np.ndarray, np.ndarray]:
        i = self.index[step]
        return self.k[i], self.v[i]


class RowBatch:
    """The decoder plan bound once for B sequences of one token each (`decode_batch`)."""

    def __init__(self, exe: NumbaExecutable, batch: int, capacity: int):
        from isthmus.kernels.numba.linear import Workspace

        d = exe.graph.decoder.resolve(exe.graph)
        self.ids = np.zeros((batch, 1), np.int64)
        self.pos = np.zeros((batch, 1), np.int64)
        env = {d.input_ids: self.ids, d.position_ids: self.pos}
        dims = {k: size for k, size in zip(d.input_ids.shape, (batch, 1)) if isinstance(k, str)}
        self.rows = RowCaches(exe, batch, capacity)
        self.bound = Bound(exe, dims, env, {}, last_only=True, workspace=Workspace(), rows=self.rows)
        self.env, self.logits_value = env, d.logits

    def step(self, decoders: list, token_ids: list[int], between=None) -> np.ndarray:
        rows = self.rows
        for b, (dec, t) in enumerate(zip(decoders, token_ids)):
            self.ids[b, 0] = t
            self.pos[b, 0] = rows.pasts[b] = dec.length
            rows.k[:, b], rows.v[:, b] = dec.addresses
        self.bound.run(0, between)
        for dec in decoders:
            dec.length += 1
        logits = self.env[self.logits_value]
        return np.array(logits.reshape(len(decoders), -1, logits.shape[-1])[:, -1], np.float32)


def lower_numba(graph: Graph, model=None) -> NumbaExecutable:
    """Lower an optimised graph to Numba kernels (fusion groups -> plan -> bound kernel calls)."""
    try:
        import numba  # noqa: F401
    except ImportError as e:     # pragma: no cover - numba is a dependency
        raise ImportError(f"numba is not installed: {e}") from None
    exe = NumbaExecutable(graph, "numba", model=model)
    if exe.in_place_cache:
        # Load the kernels' machine code now (from Numba's cache, or compile it on a first run),
        # so that it counts as load time and not as the first prompt's evaluation.
        _on_a_passing_thread(_warm, exe)
    return exe


def _warm(exe: NumbaExecutable) -> None:
    from isthmus.kernels.numba.linear import MATVEC_MAX_ROWS

    prefill = exe.decoder()                 # the prefill path, as far as the model's context allows
    prefill.step([0] * min(MATVEC_MAX_ROWS + 1, prefill.capacity - 1))
    exe.decoder().step([0])
    # four tokens a pass over the weights (prompts of 4-16 tokens, a server's chunked-prefill parts)
    # and the batched step of a server's streams: compiled on a first run here, not on a request
    # (a first 16-token prefill part stalled a server's streams 1.5 s)
    if prefill.capacity > 8:
        exe.decoder().step([0] * 4)
        decoders = [exe.decoder() for _ in range(4)]
        for d in decoders:
            d.step([0])
        exe.decode_batch(decoders, [0] * 4)


def _on_a_passing_thread(fn, *args) -> None:
    """Run fn on a thread that ends with it. libgomp keeps a team of worker threads for every thread
    that has launched a parallel region, for as long as that thread lives, and once it manages more
    threads than there are cores its workers stop spinning between launches and sleep instead: a
    decode step from a second thread (a server's engine) then pays a wake-up per launch, 2.5x slower
    here. The thread that compiles must therefore not be one that lives on beside the one that decodes."""
    error = []

    def run():
        try:
            fn(*args)
        except BaseException as e:       # re-raised on the caller's thread
            error.append(e)
    t = threading.Thread(target=run, name="isthmus-warm-up")
    t.start()
    t.join()
    if error:
        raise error[0]

"""Lowering for `--target triton`: the fusion pass's plan (compiler/lower/plan.py, the same steps
the numba target binds) on a CUDA device, each step a Triton kernel from isthmus.kernels.triton;
an op outside any fused group runs as a Triton kernel where one exists, a torch op where the op
only moves data, and its numpy reference on the host otherwise (correct, slow, rare).

At compile time the plan
  - uploads every weight once: floats in the activation type (bf16 by default on a GPU),
    GGUF q4_0 / q4_1 / q8_0 repacked for the quantized kernels (never dequantized);
  - binds each fused group as one matmul over its sibling linears' stacked weights (q|k|v,
    gate|up), with the group's rmsnorm prologue and its epilogue: the residual `add` inside the
    matmul, swiglu over the two halves, or qkv (heads, rope, the KV append).
`exe.decoder()` keeps a preallocated KV cache per layer on the device: the decoder interface's
cache append becomes a write into the cache (rope writes keys there directly), attention reads a
view of the cache, and only the last position's logits are computed. Activations are
`ISTHMUS_TRITON_DTYPE` (bf16 | f16 | f32); under TRITON_INTERPRET=1 the plan runs on CPU tensors
in f32, which is how CI tests it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from isthmus.compiler.executable import Executable, OpProfile
from isthmus.compiler.ir import Graph, numpy_dtype
from isthmus.compiler.lower.plan import label as st_label
from isthmus.compiler.lower.plan import make_plan
from isthmus.compiler.passes.fusion import groups_of
from isthmus.compiler.ops import COMMUTATIVE, get_op
from isthmus.errors import InputError, UnsupportedError
from isthmus.kernels.triton import attention as k_attn
from isthmus.kernels.triton import elementwise as k_ew
from isthmus.kernels.triton import embedding as k_emb
from isthmus.kernels.triton import matmul as k_mm
from isthmus.kernels.triton import norm as k_norm
from isthmus.kernels.triton import qmatmul as k_q
from isthmus.kernels.triton import rope as k_rope
from isthmus.kernels.triton import softmax as k_sm
from isthmus.kernels.triton._util import interpreting

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_INT = {"i64": torch.int64, "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8, "bool": torch.bool}


def lower_triton(graph: Graph, model=None, *, dtype: str | None = None, device: str | None = None) -> "TritonExecutable":
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif interpreting():
            device = "cpu"
        else:
            raise UnsupportedError("target 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels "
                                   "on the CPU, slowly); use --target numba or reference")
    dtype = dtype or os.environ.get("ISTHMUS_TRITON_DTYPE") or ("f32" if device == "cpu" else "bf16")
    if dtype not in DTYPES:
        raise UnsupportedError(f"ISTHMUS_TRITON_DTYPE must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return TritonExecutable(graph, "triton", model=model, device=device, act_dtype=dtype)


# -- the plan -------------------------------------------------------------------------------------

@dataclass
class Call:
    """One plan step bound to its kernels."""
    name: str                 # the node's name (profiles, errors)
    op: str                   # the profile label: the op, or the fused group's (compiler/lower/plan.py)
    fn: object                # fn(state, *inputs) -> tensor | tuple of tensors
    inputs: list              # value ids
    outputs: list             # value ids


@dataclass
class _State:
    """What a step may need beyond its inputs: the decoder's cache (None outside a decoder)."""
    cache: dict | None = None     # past input name -> [batch, heads, capacity, dim] tensor
    length: int = 0               # cached positions before this step
    host: dict = field(default_factory=dict)   # value id -> numpy copy of a graph input (id checks)


_FLOATS = ("f32", "f16", "f64")
_NP = {"f32", "f16", "f64", "i64", "i32", "i8", "u8", "bool"}


class _Plan:
    """The shared plan (compiler/lower/plan.py: the fusion pass's groups) bound to Triton kernels:
    one Call per plan step, in the plan's order."""

    def __init__(self, graph: Graph, device, act: torch.dtype, decoder: bool):
        self.graph, self.device, self.act = graph, device, act
        self._converted: dict[tuple, object] = {}
        self.steps: list[Call] = []
        self.rope_into_cache: dict[int, str] = {}   # rope output id -> cache its keys are written to
        self.decoder = decoder
        self.kv = _kv_concats(graph) if decoder else {}
        self.logits = graph.decoder.resolve(graph).logits if decoder else None
        outputs = {id(v) for v in graph.outputs}
        for st in make_plan(groups_of(graph)).steps:
            getattr(self, "_bind_" + st.kind)(st)
        # values no step needs after step i
        last: dict[int, int] = {}
        for si, s in enumerate(self.steps):
            for v in s.inputs:
                last[v] = si
        self.free_after = [[] for _ in self.steps]
        for v, si in last.items():
            if v not in outputs:
                self.free_after[si].append(v)

    # -- constants: uploaded once, captured by the steps that use them -----------------------

    def const(self, v, as_="tensor", cache=True):
        """A constant on the device: 'tensor' (floats in the activation type) or 'weight'
        (a PackedWeight when block-quantized, else an activation-type tensor)."""
        key = (id(v.data), as_)
        got = self._converted.get(key)
        if got is None:
            data = v.data
            if as_ == "weight" and getattr(data, "qtype", None) in k_q.QTYPES:
                got = k_q.repack(data.qtype, data.shape, data.raw, self.device)
            else:
                got = self.tensor(data.dequantize() if hasattr(data, "dequantize") else np.asarray(data))
            if cache:
                self._converted[key] = got
        return got

    def tensor(self, a: np.ndarray) -> torch.Tensor:
        return _to_device(a, self.device, self.act)

    # -- steps -------------------------------------------------------------------------------

    def add_step(self, n, fn, inputs, outputs=None, op=None):
        self.steps.append(Call(n.outputs[0].name, op or n.op, fn, [id(v) for v in inputs],
                               [id(v) for v in (outputs if outputs is not None else n.outputs)]))

    def _weights(self, nodes, stacked: bool = True):
        """project(x, bias=None, residual=None) over the linears' weights, and each one's row count:
        one matmul over the weights stacked by rows, or (`stacked` false: mixed block formats) one
        per weight, concatenated."""
        ws = [self.const(n.inputs[1], "weight", cache=len(nodes) == 1 or not stacked) for n in nodes]
        sizes = [x.n if isinstance(x, k_q.PackedWeight) else x.shape[0] for x in ws]

        def mm_of(w):
            return k_q.qlinear if isinstance(w, k_q.PackedWeight) else k_mm.linear
        if not stacked:
            def project(x, bias=None, residual=None):
                y = torch.cat([mm_of(w)(x, w) for w in ws], dim=-1)
                y = y if bias is None else y + bias
                return y if residual is None else y + residual
            return project, sizes
        if len(ws) == 1:
            w = ws[0]
        elif isinstance(ws[0], k_q.PackedWeight):
            def cat(name):
                return None if getattr(ws[0], name) is None else torch.cat([getattr(w, name) for w in ws])
            w = k_q.PackedWeight(ws[0].qtype, sum(x.n for x in ws), ws[0].k, cat("qs"), cat("d"), cat("m"))
        else:
            w = torch.cat(ws).contiguous()
        mm = mm_of(w)
        return (lambda x, bias=None, residual=None: mm(x, w, bias, residual=residual)), sizes

    def _linear(self, n):
        """A linear outside any fused group (a bias, or a weight shape the fusion pass leaves alone)."""
        project, _ = self._weights([n])
        b = self.const(n.inputs[2]) if len(n.inputs) == 3 else None
        self.add_step(n, lambda state, x: project(x, b), [n.inputs[0]])

    def _bind_linear(self, st):
        """rmsnorm prologue -> one matmul over the stacked sibling weights -> epilogue (none,
        residual add, swiglu of the two halves, or qkv: heads, rope, the KV append)."""
        g = st.group
        lins, epi, norm = g.attrs["linears"], g.attrs["epilogue"], g.attrs["norm"]
        project, sizes = self._weights(lins, g.attrs["stacked"])
        bias = None
        if g.attrs["biases"] is not None:
            bias = torch.cat([self.const(b) if b is not None else torch.zeros(n, dtype=self.act, device=self.device)
                              for b, n in zip(g.attrs["biases"], sizes)])
        x_val = norm.inputs[0] if norm is not None else lins[0].inputs[0]
        nw = self.const(norm.inputs[1]) if norm is not None else None
        eps = norm.attrs["eps"] if norm is not None else 0.0
        last_only = self.logits is not None and self.logits in g.outputs

        def prologue(x):
            if last_only:                # a decoder samples from the last position only
                x = x[..., -1:, :]
            return k_norm.rmsnorm(x, nw, eps=eps) if nw is not None else x

        if epi == "add":
            res = g.attrs["residual"]
            self.add_step(lins[0], lambda state, x, r: project(prologue(x), bias, r), [x_val, res],
                          g.outputs, op=st_label(st))
        elif epi == "swiglu":
            self.add_step(lins[0], lambda state, x: k_ew.swiglu(project(prologue(x))), [x_val], g.outputs,
                          op=st_label(st))
        elif epi == "qkv":
            self._qkv(st, lambda x: project(prologue(x), bias), sizes, x_val)
        elif len(lins) == 1:
            self.add_step(lins[0], lambda state, x: project(prologue(x), bias), [x_val], g.outputs, op=st_label(st))
        else:
            self.add_step(lins[0], lambda state, x: tuple(torch.split(project(prologue(x), bias), sizes, dim=-1)),
                          [x_val], g.outputs, op=st_label(st))

    def _qkv(self, st, project, sizes, x_val):
        q = st.group.attrs["qkv"]
        nq, nkv, hd, rope = q["q_heads"], q["kv_heads"], q["head_dim"], q["rope"]
        rope_k = q["rope_k"]
        past_k, past_v = q["past"]
        names = (past_k.name, past_v.name)

        norms = None
        if q["head_norms"] is not None:
            qw, kw, eps = q["head_norms"]
            norms = {"q": self.const(qw), "k": self.const(kw), "eps": eps}

        def heads(y, n, which=None):
            y = y.reshape(*y.shape[:-1], n, hd)
            if norms is not None and which is not None:       # per-head RMS norm (Qwen3, Gemma 3)
                y = k_norm.rmsnorm(y.contiguous(), norms[which], eps=norms["eps"])
            return y.transpose(1, 2)

        def rotate(x, pos, out=None):
            if rope is None:            # no rotary (GPT-2): the heads as they are
                return x if out is None else out.copy_(x)
            return k_rope.rope(x, pos, rope["theta"], rope["layout"], rope["dim"], out=out, factors=rope["factors"])

        def qkv(state, x, *rest):
            pos, pk, pv = rest if len(rest) == 3 else (None, *rest)
            qs, ks, vs = torch.split(project(x), sizes, dim=-1)
            qh, kh, vh = heads(qs, nq, "q"), heads(ks, nkv, "k"), heads(vs, nkv)
            q_rot = rotate(qh, pos)
            if state.cache is None:         # run(): the functional cache, one step longer
                k_new = rotate(kh, pos) if rope_k else kh
                return q_rot, torch.cat([pk, k_new.to(pk.dtype)], dim=2), torch.cat([pv, vh.to(pv.dtype)], dim=2)
            kc, vc = state.cache[names[0]], state.cache[names[1]]
            lo, hi = state.length, state.length + x.shape[-2]
            if rope_k:                      # keys rotated straight into the cache
                rotate(kh, pos, out=kc[:, :, lo:hi])
            else:
                kc[:, :, lo:hi].copy_(kh)
            vc[:, :, lo:hi].copy_(vh)
            return q_rot, kc[:, :, :hi], vc[:, :, :hi]

        pos_in = [q["positions"]] if q["positions"] is not None else []
        self.add_step(st.group.attrs["linears"][0], qkv, [x_val, *pos_in, past_k, past_v], st.group.outputs,
                      op=st_label(st))

    def _bind_attention(self, st):
        node = st.group.attrs["node"]
        causal, scale = node.attrs["causal"], node.attrs["scale"]
        # the Triton kernel neither squashes scores nor slides a window: those run on the reference
        kernel = k_attn.attention if not node.attrs["softcap"] and not node.attrs["window"] else (
            lambda q, k, v, causal, scale: self.tensor(get_op("attention").reference(
                _to_numpy(q), _to_numpy(k), _to_numpy(v), **node.attrs)))

        def attention(state, q, k, v):
            b, h, s, hd = q.shape
            return kernel(q, k, v, causal, scale).transpose(1, 2).reshape(b, s, h * hd)

        self.add_step(node, attention, node.inputs, st.group.outputs, op=st_label(st))

    def _bind_embedding(self, st):
        self._embedding(st.group.attrs["node"])

    def _bind_op(self, st):
        n = st.group.attrs["node"]
        if n.op == "linear" and _const_weight(n):
            return self._linear(n)
        if id(n.outputs[0]) in self.kv:
            return self._kv_concat(n)
        return self._node(n)

    def _kv_concat(self, n):
        past, new = n.inputs
        name = past.name

        def kv_write(state, past_t, new_t):
            cache = state.cache[name]
            hi = state.length + new_t.shape[2]
            dst = cache[:, :, state.length:hi]
            if new_t.data_ptr() != dst.data_ptr() or new_t.stride() != dst.stride():
                dst.copy_(new_t)
            return cache[:, :, :hi]

        self.add_step(n, kv_write, [past, new])
        if new.producer is not None and new.producer.op == "rope":
            self.rope_into_cache[id(new)] = name

    def _node(self, n):
        op, attrs = n.op, n.attrs
        consts = [self.const(v) if v.is_constant else None for v in n.inputs]
        ins = [v for v in n.inputs if not v.is_constant]

        def step(fn, with_state=False):
            """fn(*all inputs), constants filled in; with_state: fn(state, *all inputs)."""
            def run(state, *vals):
                it = iter(vals)
                args = [c if c is not None else next(it) for c in consts]
                return fn(state, *args) if with_state else fn(*args)
            return self.add_step(n, run, ins)

        floats = n.outputs[0].dtype in _FLOATS and all(v.dtype in _FLOATS for v in n.inputs
                                                          if v.dtype not in ("i64", "i32"))
        if op == "embedding" and n.inputs[0].is_constant:
            return self._embedding(n)
        if op in ("rmsnorm", "layernorm") and floats:
            f = k_norm.rmsnorm if op == "rmsnorm" else k_norm.layernorm
            return step(lambda x, *p: f(x, *p, eps=attrs["eps"]))
        if op == "rope" and floats:
            key = id(n.outputs[0])

            def rope(state, x, pos):
                name = self.rope_into_cache.get(key)
                out = None
                if name is not None and state.cache is not None:
                    out = state.cache[name][:, :, state.length:state.length + x.shape[2]]
                return k_rope.rope(x, pos, attrs["theta"], attrs["layout"], attrs["dim"], out=out,
                                   factors=attrs["factors"])
            return step(rope, with_state=True)
        if op == "attention" and len(n.inputs) == 3 and floats and not attrs["softcap"] and not attrs["window"]:
            return step(lambda q, k, v: k_attn.attention(q, k, v, attrs["causal"], attrs["scale"]))
        if op == "softmax" and floats:
            return step(lambda x: _softmax(x, attrs["axis"]))
        if op == "swiglu" and floats and n.inputs[0].shape == n.inputs[1].shape:
            return step(k_ew.swiglu)
        if op in ("silu", "sigmoid", "gelu") and floats:
            kind = op if op != "gelu" else ("gelu" if attrs["approximate"] == "none" else "gelu_tanh")
            return step(lambda x: k_ew.activation(x, kind))
        if op in k_ew.BINARY and floats:
            return step(lambda a, b: _binary(op, a, b))
        if op == "matmul" and floats:
            return step(_matmul)
        if op == "linear" and floats:        # a weight computed at run time
            return step(lambda x, w, b=None: k_mm.linear(x, w, b))
        fn = _torch_op(n, self.act)
        return step(fn if fn is not None else self._reference(n))

    def _embedding(self, n):
        table = self.const(n.inputs[0], "weight")
        vocab = n.inputs[0].shape[0]
        ids_value = n.inputs[1]

        def embed(state, ids):
            host = state.host.get(id(ids_value))
            lo, hi = (int(host.min()), int(host.max())) if host is not None else (int(ids.min()), int(ids.max()))
            if ids.numel() and (lo < 0 or hi >= vocab):
                raise InputError(f"token id out of range [0, {vocab}): min {lo}, max {hi}")
            return k_emb.embedding(table, ids, dtype=self.act)

        self.add_step(n, embed, [ids_value])

    def _reference(self, n):
        """The op's numpy reference on the host: inputs down, result up."""
        from isthmus.compiler.ops import get_op

        ref = get_op(n.op).reference
        types = [numpy_dtype(v.dtype) if v.dtype in _NP else None for v in n.inputs]

        def run(*xs):
            out = ref(*(_to_numpy(x, t) for x, t in zip(xs, types)), **n.attrs)
            if isinstance(out, tuple):
                return tuple(self.tensor(np.asarray(o)) for o in out)
            return self.tensor(np.asarray(out))
        return run


def _to_device(a, device, act: torch.dtype) -> torch.Tensor:
    """A host array on the device, floats in the activation type; a 0-d array stays 0-d
    (np.ascontiguousarray would make it 1-d, which host-run ops such as `range` refuse)."""
    a = np.asarray(a)
    if not a.flags.c_contiguous or not a.flags.writeable:
        a = np.array(a, order="C")
    t = torch.from_numpy(a)
    return t.to(device, act if t.is_floating_point() else t.dtype)


def _to_numpy(x, dtype=None) -> np.ndarray:
    if isinstance(x, k_q.PackedWeight):
        x = k_q.dequantize(x)
    a = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return a.astype(dtype, copy=False) if dtype is not None else a


def _const_weight(n) -> bool:
    return (len(n.inputs) >= 2 and n.inputs[1].is_constant and n.inputs[1].type.rank == 2
            and all(v.is_constant for v in n.inputs[2:]) and n.outputs[0].dtype in _FLOATS
            and n.inputs[0].dtype in _FLOATS)


def _kv_concats(graph: Graph) -> dict:
    """The decoder interface's present caches made by concat(past, new) along the sequence axis:
    id of the present value -> name of its past input."""
    if graph.decoder is None:
        return {}
    found = {}
    for layer in graph.decoder.resolve(graph).kv:
        for past, present in zip(layer[:2], layer[2:]):
            n = present.producer
            if (n is not None and n.op == "concat" and len(n.inputs) == 2 and n.inputs[0] is past
                    and n.attrs["axis"] % 4 == 2):
                found[id(present)] = past.name
    return found


def _softmax(x, axis):
    axis = axis % x.dim()
    if axis == x.dim() - 1:
        return k_sm.softmax(x)
    return k_sm.softmax(x.movedim(axis, -1).contiguous()).movedim(-1, axis).contiguous()


def _binary(op, a, b):
    if a.shape == b.shape or (b.dim() == 1 and a.dim() >= 1 and b.shape[0] == a.shape[-1]):
        return k_ew.binary(a, b, op)
    if COMMUTATIVE in get_op(op).traits and a.dim() == 1 and b.dim() >= 1 and a.shape[0] == b.shape[-1]:
        return k_ew.binary(b, a, op)
    return _TORCH_BINARY[op](a, b).to(a.dtype)


def _matmul(a, b):
    if a.dim() == 1:
        return _matmul(a[None], b)[..., 0, :]
    if b.dim() == 1:
        return _matmul(a, b[:, None])[..., 0]
    return k_mm.matmul(a, b)


_TORCH_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
                 "max": torch.maximum, "min": torch.minimum}
_UNARY = {"neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
          "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal, "erf": torch.erf, "tanh": torch.tanh,
          "sigmoid": torch.sigmoid, "cos": torch.cos, "sin": torch.sin, "not": torch.logical_not,
          "equal": torch.eq, "less": torch.lt, "greater": torch.gt, "and": torch.logical_and,
          "or": torch.logical_or, "where": torch.where}


def _torch_op(n, act):
    """Data movement and the small integer/shape arithmetic of exported graphs, as torch ops."""
    op, a = n.op, n.attrs
    out = n.outputs[0].dtype
    if op == "reshape":
        return lambda x: x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(a["shape"])])
    if op == "transpose":
        return lambda x: x.permute(*(a["perm"] or reversed(range(x.dim()))))
    if op == "concat":
        return lambda *xs: torch.cat(xs, dim=a["axis"])
    if op == "unsqueeze":
        def unsqueeze(x):
            rank = x.dim() + len(a["axes"])
            for ax in sorted(d % rank for d in a["axes"]):
                x = x.unsqueeze(ax)
            return x
        return unsqueeze
    if op == "squeeze":
        return lambda x: x.squeeze(tuple(a["axes"])) if a["axes"] else x.squeeze()
    if op == "split" and len(n.outputs) > 1:
        return lambda x: tuple(torch.split(x, list(a["sizes"]), dim=a["axis"]))
    if op == "expand":
        return lambda x: x.expand(torch.broadcast_shapes(x.shape, tuple(a["shape"]))).contiguous()
    if op == "cast" and (a["to"] in _FLOATS or a["to"] in _INT):
        return lambda x: x.to(act if a["to"] in _FLOATS else _INT[a["to"]])
    if op == "div" and out in ("i64", "i32"):
        return lambda x, y: torch.div(x, y, rounding_mode="trunc")
    if op in _TORCH_BINARY and (out in _FLOATS or out in ("i64", "i32")):
        return lambda x, y: _TORCH_BINARY[op](x, y).to(act if out in _FLOATS else _INT[out])
    if op in _UNARY and (out in _FLOATS or op in ("not", "equal", "less", "greater", "and", "or", "where")):
        return _UNARY[op]
    if op in ("reduce_sum", "reduce_mean", "reduce_max") and out in _FLOATS:
        def reduce(x):
            dims = list(range(x.dim())) if a["axes"] is None else list(a["axes"])
            if op == "reduce_max":
                return torch.amax(x, dim=dims, keepdim=bool(a["keepdims"]))
            f = torch.sum if op == "reduce_sum" else torch.mean
            return f(x.float(), dim=dims, keepdim=bool(a["keepdims"])).to(x.dtype)
        return reduce
    return None


# -- the executable ---------------------------------------------------------------------------

@dataclass
class TritonExecutable(Executable):
    device: str = "cuda"
    act_dtype: str = "bf16"

    def __post_init__(self):     # replaces the reference's, which would dequantize every weight
        self.act = DTYPES[self.act_dtype]
        self._plan = _Plan(self.graph, self.device, self.act, decoder=False)
        self._decoder_plan = None

    def _execute(self, plan: _Plan, feeds: dict, state: _State) -> dict:
        env: dict[int, object] = dict(feeds)
        prof = self._profile if self.profiling else None
        cuda = str(self.device).startswith("cuda")
        for si, s in enumerate(plan.steps):
            if prof is not None:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            out = s.fn(state, *(env[v] for v in s.inputs))
            if len(s.outputs) == 1:
                env[s.outputs[0]] = out
            else:
                env.update(zip(s.outputs, out))
            for v in plan.free_after[si]:
                env.pop(v, None)
            if prof is not None:
                if cuda:
                    torch.cuda.synchronize()
                p = prof.setdefault(s.op, OpProfile(s.op))
                p.calls += 1
                p.seconds += time.perf_counter() - t0
        return env

    def upload(self, a: np.ndarray) -> torch.Tensor:
        return _to_device(a, self.device, self.act)

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        inputs = self.check_inputs(inputs)
        state = _State()
        feeds = {}
        for v in self.graph.inputs:
            feeds[id(v)] = self.upload(inputs[v.name])
            state.host[id(v)] = inputs[v.name]
        env = self._execute(self._plan, feeds, state)
        out = {}
        for v in self.graph.outputs:
            if id(v) in env:
                out[v.name] = _download(env[id(v)], v.dtype)
            else:                      # a constant returned as it is
                data = v.data.dequantize() if hasattr(v.data, "dequantize") else np.asarray(v.data)
                out[v.name] = data
        return out

    def decoder(self, batch: int = 1, capacity: int = 256):
        """A decoding state whose KV cache is preallocated on the device for `capacity` positions
        (grown by doubling, up to the model's context length).

        Graphs whose cache is not made by concat(past, new) get the functional decoder."""
        d = self.graph.decoder
        if (d is None or d.position_ids is None or not d.kv or d.attention_mask is not None   # feeds ids and positions only
                or sorted(_kv_concats(self.graph).values()) != sorted(v.name for v in d.resolve(self.graph).pasts)):
            return super().decoder()
        if self._decoder_plan is None:
            self._decoder_plan = _Plan(self.graph, self.device, self.act, decoder=True)
        return TritonDecoder(self, self._decoder_plan, batch, capacity)


def _download(x, dtype: str) -> np.ndarray:
    a = _to_numpy(x)
    return a.astype(numpy_dtype(dtype), copy=False) if dtype in _NP else a


class TritonDecoder:
    """Prefill and decode steps over a KV cache that lives on the device."""

    def __init__(self, exe: TritonExecutable, plan: _Plan, batch: int = 1, capacity: int = 256):
        self.exe, self.plan, self.batch, self.min_capacity = exe, plan, batch, capacity
        self.interface = exe.graph.decoder.resolve(exe.graph)
        self.past = self.interface.pasts
        self.state = _State(cache={}, length=0)
        self.capacity = 0
        config = getattr(exe.model, "config", None) or {}
        self.max_len = int(config.get("context_length") or 1 << 20)

    @property
    def length(self) -> int:
        return self.state.length

    def _reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        if n > self.max_len:
            raise InputError(f"the sequence would be {n} tokens; the model's context window is {self.max_len}")
        cap = min(max(n, 2 * self.capacity, self.min_capacity), self.max_len)
        for v in self.past:
            shape = [self.batch if d == self.interface.input_ids.shape[0] else d for d in v.shape]
            shape[2] = cap
            new = torch.zeros(shape, dtype=self.exe.act, device=self.exe.device)
            old = self.state.cache.get(v.name)
            if old is not None:
                new[:, :, :self.state.length].copy_(old[:, :, :self.state.length])
            self.state.cache[v.name] = new
        self.capacity = cap

    def step(self, ids: list[int]) -> np.ndarray:
        """Run `ids` through the model at the next positions; the logits of the last one (f32)."""
        n = len(ids)
        if n == 0:
            raise InputError("a decoder step needs at least one token")
        start = self.state.length
        self._reserve(start + n)
        d = self.interface
        host = {d.input_ids: np.asarray([list(ids)] * self.batch, np.int64),
                d.position_ids: np.tile(np.arange(start, start + n, dtype=np.int64), (self.batch, 1))}
        feeds = {}
        for v, arr in host.items():
            feeds[id(v)] = self.exe.upload(arr)
            self.state.host[id(v)] = arr
        for v in self.past:
            feeds[id(v)] = self.state.cache[v.name][:, :, :start]
        env = self.exe._execute(self.plan, feeds, self.state)
        self.state.length = start + n
        return _to_numpy(env[id(d.logits)][0, -1])

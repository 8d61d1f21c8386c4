"""Executables: a compiled graph plus the model facts generation needs, with `run(inputs)`.

The reference target interprets the graph node by node with each op's numpy reference;
it is the numerics oracle every other target is checked against. Every lowered target
(compiler/lower/) subclasses `Executable`; compiler/targets.py picks one by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from isthmus.compiler.ir import Graph, numpy_dtype
from isthmus.errors import InputError, UnsupportedError

@dataclass
class OpProfile:
    op: str
    calls: int = 0
    seconds: float = 0.0


@dataclass
class Executable:
    graph: Graph
    target: str
    model: object = None          # the Model it came from (tokenizer, config, chat template), if any
    compile_seconds: float = 0.0
    _consts: dict = field(default_factory=dict, repr=False)
    _last_use: dict = field(default_factory=dict, repr=False)
    _profile: dict = field(default_factory=dict, repr=False)
    profiling: bool = False
    # every token computed as it would be alone (`compile(..., batch_invariant=True)`): a sequence's
    # logits are bitwise the same whatever shares its batch and however its prompt is cut into
    # parts, at a price in prefill speed (docs/serving.md, "Batch invariance")
    batch_invariant: bool = False

    def __post_init__(self):
        from isthmus.compiler.ops import get_op

        self._impls = [get_op(n.op).reference for n in self.graph.nodes]
        # Weights are dequantized once: the reference trades memory for speed.
        self._consts = {id(v): (v.data.dequantize() if hasattr(v.data, "dequantize") else v.data)
                        for v in self.graph.constants}
        last: dict[int, int] = {}
        for i, n in enumerate(self.graph.nodes):
            for v in n.inputs:
                last[id(v)] = i
        keep = {id(v) for v in self.graph.outputs}
        self._free_after = [[] for _ in self.graph.nodes]
        for vid, i in last.items():
            if vid not in keep and vid not in self._consts:
                self._free_after[i].append(vid)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    def check_inputs(self, inputs: dict) -> dict:
        """Names, dtypes and shapes against the graph's input types; symbolic dims must agree."""
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise InputError(f"inputs do not match the graph: missing {missing}, unexpected {extra}; "
                             f"expected {self.input_names}")
        bound: dict[str, int] = {}
        out = {}
        for v in self.graph.inputs:
            a = np.asarray(inputs[v.name])
            want = numpy_dtype(v.dtype)
            if a.dtype != want:
                if np.can_cast(a.dtype, want, casting="same_kind"):
                    a = a.astype(want)
                else:
                    raise InputError(f"input {v.name!r} has dtype {a.dtype}, expected {want}")
            if a.ndim != v.type.rank:
                raise InputError(f"input {v.name!r} has shape {a.shape}, expected {v.type}")
            for d, n in zip(v.shape, a.shape):
                if isinstance(d, int) and d != n:
                    raise InputError(f"input {v.name!r} has shape {a.shape}, expected {v.type}")
                if isinstance(d, str) and bound.setdefault(d, n) != n:
                    raise InputError(f"input {v.name!r}: dim {d!r} is {n} here but {bound[d]} elsewhere")
            out[v.name] = a
        return out

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        inputs = self.check_inputs(inputs)
        env = dict(self._consts)
        for v in self.graph.inputs:
            env[id(v)] = inputs[v.name]
        prof = self._profile if self.profiling else None
        for i, (node, impl) in enumerate(zip(self.graph.nodes, self._impls)):
            t0 = time.perf_counter() if prof is not None else 0.0
            result = impl(*(env[id(v)] for v in node.inputs), **node.attrs)
            if len(node.outputs) == 1:
                env[id(node.outputs[0])] = result
            else:
                for v, r in zip(node.outputs, result):
                    env[id(v)] = r
            for vid in self._free_after[i]:
                env.pop(vid, None)
            if prof is not None:
                p = prof.setdefault(node.op, OpProfile(node.op))
                p.calls += 1
                p.seconds += time.perf_counter() - t0
        return {v.name: env[id(v)] for v in self.graph.outputs}

    def decoder(self):
        """A fresh decoding state (KV cache + step function) for a decoder graph."""
        from isthmus.compiler.kv_cache import FunctionalDecoder

        return FunctionalDecoder(self)

    def decode_batch(self, decoders: list, token_ids: list[int]) -> np.ndarray:
        """One decode step for many conversations (token_ids[i] fed to decoders[i]): logits [B, vocab].
        The reference interpreter runs the graph once for the batch (compiler/batch.py); a target
        without its own version steps each decoder in turn."""
        from isthmus.compiler.batch import reference_decode_batch

        return reference_decode_batch(self, decoders, token_ids)

    def profile(self) -> list[OpProfile]:
        """Time per op over the runs made while `profiling` was on, slowest first."""
        return sorted(self._profile.values(), key=lambda p: -p.seconds)


def decoder_model(exe):
    """The Model behind a decoder executable; UnsupportedError for any other graph."""
    model = exe.model
    if model is None or exe.graph.decoder is None:
        raise UnsupportedError("this graph is not a decoder (its frontend recorded no token-ids -> logits "
                               "interface); use `isthmus run` for arbitrary graphs")
    return model


def context_length(exe) -> int:
    return int(decoder_model(exe).config.get("context_length") or 2048)

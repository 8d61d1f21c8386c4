"""Batched decode on the NPU: B conversations take one decode step together, in one program.

Two ways in: `NpuExecutable.decode_batch(decoders, tokens)` (what continuous batching calls every
step, for whichever conversations are in flight) runs `step_together`: the conversations' last C-1
cache entries are copied by the host into the batch's window-sized cache slots, the program runs,
and each conversation's new entry is appended to its saved cache, so any of them may go on alone
or in another batch. The copies are host work outside the modeled time (a real runtime would keep
the caches in HBM and address them by table: see docs/npu-performance.md).

`NpuBatchDecoder(exe, decoders)` takes conversations already prefilled by their own `NpuDecoder`s
and from then on steps them in lockstep: `step([token of each])` returns [B, vocab] logits. Each
step runs `build_chunk_program(img, B, C, batched=True)`: the linears multiply all B columns per
weight tile (the PE array's moving side is the batch, and up to `tensor_min_moving` columns cost
what one does), so the weights stream from HBM once for B tokens; each sequence attends over its
own cache. The batch keeps its caches in its own HBM (`bkcache`/`bvcache`, one slot per sequence,
right-aligned as the one-sequence cache is), copied once from the decoders' caches when the batch
forms (a host copy, outside the modeled time); the decoders are not stepped again afterwards.
"""

from __future__ import annotations

import numpy as np

from isthmus.errors import InputError


class NpuBatchDecoder:
    def __init__(self, exe, decoders: list):
        from isthmus.compiler.lower.npu.target import NpuDecoder
        if not decoders or not all(isinstance(d, NpuDecoder) and d.rt is exe.runtime for d in decoders):
            raise InputError("a batch takes one or more NPU decoders of this executable")
        if any(d.length == 0 for d in decoders):
            raise InputError("every conversation of a batch must be prefilled first (step its prompt)")
        rt = self.rt = exe.runtime
        self.exe, self.B = exe, len(decoders)
        if self.B > exe.config.partitions:
            raise InputError(f"a batch holds at most {exe.config.partitions} conversations")
        self.lengths = [d.length for d in decoders]
        img = rt.img
        spec, cmax = img.spec, rt.cmax
        Lc, G, hd = len(spec.layers), spec.kv_heads, spec.head_dim
        from isthmus.npu.isa import DTYPES
        dt = DTYPES[img.adt].np
        self.kcache = np.zeros((self.B, Lc, G, hd, cmax), dt)
        self.vcache = np.zeros((self.B, Lc, cmax, G * hd), dt)
        with rt.lock:
            lp = next(iter(rt.loaded.values()))
            k = lp.machine.tensor_view(lp.program.tensor("kcache"))
            v = lp.machine.tensor_view(lp.program.tensor("vcache"))
            for b, d in enumerate(decoders):
                n = d.length
                if d is rt.owner:
                    self.kcache[b][..., cmax - n:] = k[..., cmax - n:]
                    self.vcache[b][:, cmax - n:] = v[:, cmax - n:]
                else:
                    self.kcache[b][..., cmax - n:], self.vcache[b][:, cmax - n:] = d.saved
        self.loaded: dict[int, object] = {}
        self.hbm = None

    def program(self, C: int):
        from isthmus.compiler.lower.npu.chunk_program import build_chunk_program
        from isthmus.npu.sim import LoadedProgram
        lp = self.loaded.get(C)
        if lp is None:
            prog = build_chunk_program(self.rt.img, self.B, C, batched=True)
            first = self.hbm is None
            if first:               # the weights as the one-sequence programs hold them, then this batch's part
                # room for a wider window's validity rows: its program's io is larger
                self.hbm = np.empty(prog.hbm_bytes + 4 * self.B * self.rt.cmax + 4096, np.uint8)
                self.hbm[:self.rt.resident_end] = self.rt.hbm[:self.rt.resident_end]
                self.hbm[self.rt.resident_end:] = 0xFF
            lp = LoadedProgram(prog, self.exe.config, check_races=self.exe.check_races, hbm=self.hbm)
            names = [r[0] for r in self.rt.img.resident]
            if first:
                lp.bind({"bkcache": self.kcache, "bvcache": self.vcache})
                self.kcache = self.vcache = None
            lp.bind(names=names + ["bkcache", "bvcache"])
            self.loaded[C] = lp
        return lp

    def step(self, tokens) -> np.ndarray:
        from isthmus.compiler.lower.npu.attention import NEG
        from isthmus.compiler.lower.npu.target import MIN_WINDOW, _pow2
        tokens = [int(t) for t in tokens]
        if len(tokens) != self.B:
            raise InputError(f"a batch step takes one token per conversation ({self.B}), got {len(tokens)}")
        rt = self.rt
        if max(self.lengths) + 1 > rt.cmax:
            raise InputError(f"{max(self.lengths) + 1} tokens exceed the context window of {rt.cmax}")
        C = min(rt.cmax, max(MIN_WINDOW, _pow2(max(self.lengths) + 1)))
        bias = np.zeros((self.B, C), np.float32)
        for b, n in enumerate(self.lengths):
            bias[b, 1:C - n] = NEG                 # slot 0: the new token; then the last C-1 cache entries
        with rt.lock:
            lp = self.program(C)
            result = lp.run({"ids": np.array(tokens, np.int32), "pos": np.array(self.lengths, np.int32),
                             "kvbias": bias / np.float32(rt.img.spec.scale)})
        self.exe.record(lp.program, lp.timeline, result.stats)
        self.lengths = [n + 1 for n in self.lengths]
        return result.outputs["logits"]


def step_together(exe, decoders: list, tokens) -> np.ndarray:
    """One decode step of every (prefilled) decoder in one batched program; logits [B, vocab]."""
    from isthmus.compiler.lower.npu.attention import NEG
    from isthmus.compiler.lower.npu.target import MIN_WINDOW, _pow2
    tokens = [int(t) for t in tokens]
    rt, B = exe.runtime, len(decoders)
    vocab = rt.img.spec.vocab
    if B > exe.config.partitions:
        from isthmus.compiler.batch import step_each
        return step_each(decoders, tokens)
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} out of range [0, {vocab})")
    lengths = [d.length for d in decoders]
    if max(lengths) + 1 > rt.cmax:
        raise InputError(f"{max(lengths) + 1} tokens exceed the context window of {rt.cmax}")
    C = min(rt.cmax, max(MIN_WINDOW, _pow2(max(lengths) + 1)))
    with rt.lock:
        rt.claim(None)                             # every conversation's entries are in its `saved` now
        lp = _batch_program(exe, B, C)
        k = lp.machine.tensor_view(lp.program.tensor("bkcache"))
        v = lp.machine.tensor_view(lp.program.tensor("bvcache"))
        k.fill(0)
        v.fill(0)
        bias = np.zeros((B, C), np.float32)
        for b, d in enumerate(decoders):
            n = min(d.length, C - 1)
            ks, vs = d.saved
            k[b][..., C - n:], v[b][:, C - n:] = ks[..., ks.shape[-1] - n:], vs[:, vs.shape[1] - n:]
            bias[b, 1:C - d.length] = NEG
        result = lp.run({"ids": np.array(tokens, np.int32), "pos": np.array(lengths, np.int32),
                         "kvbias": bias / np.float32(rt.img.spec.scale)})
        for b, d in enumerate(decoders):           # the new entry is the slot's last
            ks, vs = d.saved
            d.saved = (np.concatenate([ks, k[b][..., C - 1:]], axis=-1), np.concatenate([vs, v[b][:, C - 1:]], axis=1))
            d.length += 1
    exe.record(lp.program, lp.timeline, result.stats)
    return result.outputs["logits"].copy()


def _batch_program(exe, B: int, C: int):
    """The loaded (B, C) batch program; all share one HBM buffer holding a copy of the weights, grown
    (and the programs reloaded) when a larger batch's cache slots need more room."""
    from isthmus.compiler.lower.npu.chunk_program import build_chunk_program
    from isthmus.npu.sim import LoadedProgram
    rt = exe.runtime
    progs = rt.__dict__.setdefault("batch_programs", {})
    lp = progs.get((B, C))
    if lp is not None:
        return lp
    prog = build_chunk_program(rt.img, B, C, batched=True, cache_len=C)
    hbm = rt.__dict__.get("batch_hbm")
    if hbm is None or hbm.size < prog.hbm_bytes:
        hbm = np.empty(2 * prog.hbm_bytes, np.uint8)
        hbm[:rt.resident_end] = rt.hbm[:rt.resident_end]
        rt.batch_hbm = hbm
        progs.clear()
    lp = LoadedProgram(prog, exe.config, check_races=exe.check_races, hbm=hbm)
    lp.bind(names=[r[0] for r in rt.img.resident] + ["bkcache", "bvcache"])
    progs[B, C] = lp
    return lp

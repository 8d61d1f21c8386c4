"""The `chip` preset as a target: `isthmus.compile(model, target="npu", config="chip")` (or any config with
more than one core) decodes tensor-parallel on every core (tp_decoder.py), prompt chunks and decode steps.

`lower_npu` returns a `TpExecutable` for such a config. Its decoders are the one-core `NpuDecoder`s (the
same chunking of prompts, the same buckets, the same halving of a chunk whose working set does not fit
SBUF) over a `TpRuntime`: the chip programs of each (P, C) bucket loaded once (`npu.chip.LoadedChip`) on
one HBM image (every core's weights and KV caches, the shared tables), the conversation that owns the
caches switching as on one core. What the chip does not run is an error, never one core in its place:
`run()` of a graph (the per-op lowering, every non-Llama graph) raises UnsupportedError, and so does a
decoder the split cannot divide over the cores (fewer query heads than cores, heads that read their kv
heads unevenly). Several conversations in one serving step take their steps one after another on the
chip (a batched chip program is not built).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isthmus.compiler.executable import OpProfile
from isthmus.compiler.lower.npu.target import DecoderRuntime, NpuDecoder, NpuExecutable
from isthmus.errors import UnsupportedError


@dataclass
class TpExecutable(NpuExecutable):
    """An NPU executable on a multi-core config: Llama decoders tensor-parallel over the cores."""

    def __post_init__(self):
        from isthmus.compiler.lower.npu.llama_matcher import match_llama
        from isthmus.compiler.lower.npu.tp_decoder import TpChip
        self.spec = match_llama(self.graph)
        self._runtime = None
        self._generic = None
        self.chip = None
        if self.spec is not None:
            try:
                self.chip = TpChip(self.spec, self.config, self.precision, self._context(), weights=self.weights)
            except ValueError as e:
                raise UnsupportedError(f"NPU config {self.config.name}: this decoder does not split over its "
                                       f"{self.config.cores} cores ({e}); use config core") from None

    @property
    def runtime(self) -> "TpRuntime":
        if self._runtime is None:
            self._runtime = TpRuntime(self)
        return self._runtime

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        raise UnsupportedError(f"NPU config {self.config.name} ({self.config.cores} cores) runs Llama decoders "
                               f"tensor-parallel, through decoder steps; run() of a graph (the per-op lowering) "
                               f"is one core's: compile with config core")

    def decode_batch(self, decoders: list, token_ids: list[int]) -> np.ndarray:
        from isthmus.compiler.batch import step_each
        return step_each(decoders, token_ids)         # each conversation's step on the whole chip, in turn

    def profile(self) -> list[OpProfile]:
        """Modeled time per op kind over the runs made while `profiling` was on, on the core that finished
        each run last (the cores run concurrently: that core's time is the run's)."""
        return self._profile_of((chip.cores[last_core(ctl)], ctl.timelines[last_core(ctl)])
                                for chip, ctl, _ in self.runs)


def last_core(ctl) -> int:
    return max(range(len(ctl.timelines)), key=lambda c: ctl.timelines[c].cycles)


class TpRuntime(DecoderRuntime):
    """The loaded chip programs of one TpExecutable on one HBM image; `NpuDecoder`s step through it."""

    def __init__(self, exe: TpExecutable):
        # core 0's image: the spec's vocabulary and scale are every core's; the HBM image is sized at
        # the first load, from where the resident tensors of all cores end
        super().__init__(exe, exe.chip.images[0], exe.chip.cmax)
        self.chip = exe.chip
        n = len(self.chip.images)
        self.caches = [(f"c{k}.kcache", f"c{k}.vcache") for k in range(n)]

    def _build(self, P: int, C: int):
        return self.chip.program(P, C)

    def _load(self, prog):
        from isthmus.npu.chip import LoadedChip
        names = self.chip.resident_names()
        first = self.hbm is None
        if first:                        # the resident tensors come first in every program, identically
            top = max(t.offset + t.nbytes for p in prog.cores for t in p.tensors if t.name in names)
            self.hbm = np.empty(top + self.io_bytes, np.uint8)
            self.hbm[top:] = 0xFF
        lp = LoadedChip(prog, self.exe.config, check_races=self.exe.check_races, hbm=self.hbm)
        if first:
            lp.bind(self.chip.resident_values())          # KV caches zero: an empty slot must not be NaN
            for img in self.chip.images:
                img.release_host_copies()
        lp.bind(names=names)
        self.chip.programs.clear()                        # the loaded program holds it
        return lp

    def claim(self, dec: "NpuDecoder | None") -> None:
        """Make `dec`'s KV caches (every core's) the ones in HBM, saving the previous owner's live entries."""
        if self.owner is dec:
            return
        lp = next(iter(self.loaded.values()), None)
        if lp is not None:
            m = lp.machines[0]
            views = [(m.tensor_view(lp.tensors[k]), m.tensor_view(lp.tensors[v])) for k, v in self.caches]
            old = self.owner
            if old is not None and old.length:
                n = old.length
                old.saved = [(k[..., self.cmax - n:].copy(), v[:, self.cmax - n:].copy()) for k, v in views]
            if dec is not None and dec.saved is not None:
                n = dec.length
                for (k, v), (ks, vs) in zip(views, dec.saved):
                    k[..., self.cmax - n:], v[:, self.cmax - n:] = ks, vs
                dec.saved = None
        self.owner = dec


def chip_report(exe: TpExecutable, run, by: str = "op", limit: int = 0) -> str:
    """A chip run (program, timeline, stats) for `isthmus profile`: the chip's cycles, each core's, and the
    op table of the core that finished last."""
    from isthmus.compiler.lower.npu.profile_tables import op_table
    chip, ctl, stats = run
    cfg = exe.config
    c = last_core(ctl)
    cores = ", ".join(f"{t.cycles:,}" for t in ctl.timelines)
    head = (f"chip: {ctl.cycles:,} cycles = {ctl.cycles / cfg.clock_hz * 1e6:.1f} us modeled on {cfg.name} "
            f"({len(chip.cores)} cores concurrent; each core's cycles: {cores}); "
            f"core {c} finishes last, its table (its link sends, not HBM traffic, left out):")
    return head + "\n" + op_table(_local(chip.cores[c]), ctl.timelines[c], stats[c], exe.graph, cfg, by, limit)


def _local(prog):
    """A core's program with its core-to-core instructions as nops on their engines (indices kept), for the
    tables that cost one core's instructions alone (timing.roofline, op_rows)."""
    from isthmus.npu.isa import Instruction, Program
    ins = [Instruction("nop", {"engine": i.engine}, i.label) if i.op in ("dma_core", "sem_signal_core") else i
           for i in prog.instructions]
    return Program(ins, prog.tensors, prog.hbm_bytes)

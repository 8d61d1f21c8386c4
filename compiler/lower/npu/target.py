"""The NPU target: a graph lowered to programs for the modeled NPU (isthmus.npu), run on its simulator.

    exe = isthmus.compile(model, target="npu")              # lower_npu(graph, model=...)
    exe.run({"input_ids": ..., ...})                       # any graph: the per-op lowering (op_runner)
    dec = exe.decoder(); dec.step(ids)                       # a Llama decoder: chunk programs (chunk_program)
    exe.profile()                                            # modeled time per op (profile_tables)

Two lowerings share the emitter (emitter.py, tiles.py: allocation and the engine schedule with
semaphores), the weight packing and streaming (weights.py, the Numba packing kernel
kernels/numba/weight_pack.py) and the kernels on SBUF-resident activations (resident_kernels.py,
attention.py):

- A graph the Llama matcher recognises (llama_matcher.py) runs decoding as one program per
  (new tokens, KV window) bucket, built on first use and kept loaded: every activation stays in
  SBUF, weights stream through a ring, the KV cache stays in HBM between steps. `compile`
  converts the weights and plans the HBM image; `eager=True` also builds the first decode program.
- Any graph runs through `run(inputs)`: one program per set of input shapes, each node lowered
  on its own with its values in HBM (op_runner.py), so every op of the op set is covered.

Options: `config` (an NPU preset or JSON path, default "core"), `precision`: "bf16x3" (the
default: weights and the activations feeding them as bf16 hi + lo pairs, three bf16 products
accumulated in fp32 (two per weight tile in decode), attention and the KV cache in f32 — results
agree with the f32 reference to ~1e-5), "bf16" (one bf16 product per tile, bf16 attention and KV
cache: the fastest, ~1e-2 relative error, which can flip near-tied greedy choices), "f32" (fp32
operands, which the PE array takes in 4 passes). `check_races` (ISTHMUS_NPU_CHECK_RACES=1): run
the simulator's race check on every program loaded; the emitter's dependency analysis makes
programs race-free by construction, so it is off by default outside tests. `max_context`
(ISTHMUS_NPU_MAX_CONTEXT, default 4096): the KV cache's capacity, at most the model's context.
`weights` (ISTHMUS_NPU_WEIGHTS, default "bf16"): how the decoder stores its weights in HBM:
"bf16" (dequantized ahead of time in the precision's dtype), "int8", "fp8", "q4" (stored quantized
and dequantized on chip after each DMA: quant_weights.py), or "auto" (per layer from the model
file's quantization). A quantized weight is exact in bf16, so at precision bf16x3 it needs no lo
part: W x_hi + W x_lo, one matmul per tile in decode, as bf16.
From the command line: --npu-config, --npu-precision, --npu-weights (chat, run, compile, serve); the
environment variables ISTHMUS_NPU_CONFIG, ISTHMUS_NPU_PRECISION, ISTHMUS_NPU_WEIGHTS are defaults
under them. docs/npu-performance.md has the figures.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from isthmus.compiler.executable import Executable, OpProfile
from isthmus.compiler.ir import Graph
from isthmus.errors import InputError, NpuError, UnsupportedError

PRECISIONS = ("bf16x3", "bf16", "f32")
MIN_WINDOW = 64


def lower_npu(graph: Graph, model=None, *, config=None, precision: str | None = None,
              check_races: bool | None = None, eager: bool = False, max_context: int | None = None,
              weights: str | None = None) -> "NpuExecutable":
    from isthmus.compiler.lower.npu.quant_weights import OPTIONS
    from isthmus.npu.config import load_config
    cfg = load_config(config or os.environ.get("ISTHMUS_NPU_CONFIG") or "core")
    weights = weights or os.environ.get("ISTHMUS_NPU_WEIGHTS") or "bf16"
    if weights not in OPTIONS:
        raise InputError(f"NPU weights must be one of {', '.join(OPTIONS)}, got {weights!r}")
    precision = precision or os.environ.get("ISTHMUS_NPU_PRECISION") or "bf16x3"
    if precision not in PRECISIONS:
        raise InputError(f"NPU precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if weights != "bf16" and precision == "f32":
        raise InputError(f"quantized NPU weights (--npu-weights {weights}) run at precision bf16 or bf16x3, not f32")
    if cfg.pe_rows != cfg.partitions or cfg.pe_cols != cfg.partitions:
        raise UnsupportedError(f"NPU config {cfg.name}: the lowering needs a PE array as wide as the partitions")
    if check_races is None:
        check_races = os.environ.get("ISTHMUS_NPU_CHECK_RACES", "") not in ("", "0")
    max_context = max_context or int(os.environ.get("ISTHMUS_NPU_MAX_CONTEXT", "4096"))
    cls = NpuExecutable
    if cfg.cores > 1:                  # several cores: the decoder tensor-parallel over them (tp_runtime.py)
        from isthmus.compiler.lower.npu.tp_runtime import TpExecutable as cls
    exe = cls(graph, "npu", model=model, config=cfg, precision=precision, check_races=check_races,
              max_context=max_context, weights=weights)
    if eager and exe.spec is not None:
        exe.runtime.program(1, MIN_WINDOW)
    return exe


@dataclass
class NpuExecutable(Executable):
    config: object = None
    precision: str = "bf16x3"
    check_races: bool = False
    max_context: int = 4096
    weights: str = "bf16"
    runs: list = field(default_factory=list, repr=False)     # (program, timeline, stats) while profiling

    def __post_init__(self):          # replaces the reference's, which would dequantize every weight
        from isthmus.compiler.lower.npu.llama_matcher import match_llama
        self.spec = match_llama(self.graph)
        self._runtime = None
        self._generic = None
        if self.spec is not None:
            from isthmus.compiler.lower.npu.chunk_program import build_image
            try:
                self.image = build_image(self.spec, self.config, self.precision, self._context(), self.weights)
            except ValueError:
                self.spec = None

    def _context(self) -> int:
        """The KV cache's capacity: the model's context, at most `max_context` (HBM and host memory)."""
        n = 2048
        if self.model is not None and getattr(self.model, "config", None):
            n = int(self.model.config.get("context_length") or 2048)
        return min(n, self.max_context)

    @property
    def runtime(self) -> "DecoderRuntime":
        if self._runtime is None:
            self._runtime = DecoderRuntime(self)
        return self._runtime

    # -- the executable interface ------------------------------------------------------------------------
    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        from isthmus.compiler.lower.npu.op_runner import GenericRunner
        inputs = self.check_inputs(inputs)
        if self._generic is None:
            self._generic = GenericRunner(self)
        return self._generic.run(inputs)

    def decoder(self):
        if self.spec is None:
            from isthmus.compiler.kv_cache import FunctionalDecoder
            return FunctionalDecoder(self)
        return NpuDecoder(self.runtime)

    def decode_batch(self, decoders: list, token_ids: list[int]) -> np.ndarray:
        """Prefilled NPU conversations of this executable take the step together in one batched program
        (batch_decode.step_together); anything else steps one by one."""
        from isthmus.compiler.batch import step_each
        if self.spec is not None and len(decoders) > 1 and all(
                isinstance(d, NpuDecoder) and d.rt is self.runtime and d.length for d in decoders):
            from isthmus.compiler.lower.npu.batch_decode import step_together
            return step_together(self, decoders, token_ids)
        return step_each(decoders, token_ids)

    def record(self, program, timeline, stats) -> None:
        if self.profiling:
            self.runs.append((program, timeline, stats))

    def profile(self) -> list[OpProfile]:
        """Modeled NPU time per op kind over the runs made while `profiling` was on, slowest first
        (`profile_tables.op_table` has the full per-op figures)."""
        return self._profile_of((program, tl) for program, tl, _ in self.runs)

    def _profile_of(self, runs) -> list[OpProfile]:
        """`profile` over (program, timeline) pairs, one per run."""
        from isthmus.compiler.lower.npu.profile_tables import op_rows
        out: dict[str, OpProfile] = {}
        for program, tl in runs:
            for row in op_rows(program, tl, self.graph, self.config, by="op"):
                p = out.setdefault(row.name, OpProfile(row.name))
                p.calls += row.count
                p.seconds += row.cycles / self.config.clock_hz
        return sorted(out.values(), key=lambda p: -p.seconds)


class DecoderRuntime:
    """The loaded chunk programs of one executable, sharing one HBM image (weights, tables, KV cache)."""

    def __init__(self, exe: NpuExecutable, img=None, cmax: int | None = None):
        """img, cmax: the image whose layout the programs share and the KV window's largest size
        (default: the executable's one-core image)."""
        from isthmus.compiler.lower.npu.chunk_program import io_bytes, resident_end
        self.exe = exe
        self.img = exe.image if img is None else img
        self.cmax = self.img.cmax if cmax is None else cmax
        self.loaded: dict[tuple[int, int], object] = {}
        self.resident_end = resident_end(self.img)
        self.max_chunk = exe.config.moving_max       # new tokens per program: one PSUM bank of fp32 per matmul
        self.io_bytes = io_bytes(self.img, self.max_chunk, self.cmax) + 4096
        self.hbm_size = self.resident_end + self.io_bytes
        self.hbm = None
        self.owner = None
        self.build_seconds: dict[tuple[int, int], float] = {}
        self.unfit: set[tuple[int, int]] = set()        # buckets whose working set exceeds SBUF
        self.lock = threading.RLock()                    # one machine: one step at a time

    def program(self, P: int, C: int):
        lp = self.loaded.get((P, C))
        if lp is None:
            if (P, C) in self.unfit:
                raise DoesNotFit(P, C)
            t0 = time.perf_counter()
            try:
                prog = self._build(P, C)
            except NpuError as e:
                if "SBUF is full" not in str(e) or P == 1:
                    raise
                self.unfit.add((P, C))
                raise DoesNotFit(P, C) from None
            lp = self.loaded[P, C] = self._load(prog)
            self.build_seconds[P, C] = time.perf_counter() - t0
        return lp

    def _build(self, P: int, C: int):
        from isthmus.compiler.lower.npu.chunk_program import build_chunk_program
        return build_chunk_program(self.img, P, C)

    def _load(self, prog):
        """The program loaded on the runtime's HBM image (the first one binds the resident tensors)."""
        from isthmus.compiler.lower.npu.chunk_program import resident_values
        from isthmus.npu.sim import LoadedProgram
        first = self.hbm is None
        if first:          # the resident part is written by `bind`; only the rest starts as NaN
            self.hbm = np.empty(self.hbm_size, np.uint8)
            self.hbm[self.resident_end:] = 0xFF
        lp = LoadedProgram(prog, self.exe.config, check_races=self.exe.check_races, hbm=self.hbm)
        names = [r[0] for r in self.img.resident]
        if first:
            caches = ("kcache", "vcache")
            lp.bind(resident_values(self.img, skip=caches))
            for name in caches:          # an empty cache slot must read as 0, not NaN
                lp.machine.tensor_view(prog.tensor(name)).fill(0)
            self.img.release_host_copies()
        lp.bind(names=names)
        return lp

    def claim(self, dec: "NpuDecoder | None") -> None:
        """Make `dec`'s KV cache the one in HBM (saving the previous owner's live entries); None: only
        save the owner's (a batched step reads every conversation's saved entries)."""
        if self.owner is dec:
            return
        lp = next(iter(self.loaded.values()), None)
        if lp is not None:
            k = lp.machine.tensor_view(lp.program.tensor("kcache"))
            v = lp.machine.tensor_view(lp.program.tensor("vcache"))
            old = self.owner
            if old is not None and old.length:
                n = old.length
                old.saved = (k[..., self.cmax - n:].copy(), v[:, self.cmax - n:].copy())
            if dec is not None and dec.saved is not None:
                n = dec.length
                k[..., self.cmax - n:], v[:, self.cmax - n:] = dec.saved
                dec.saved = None
        self.owner = dec


class DoesNotFit(Exception):
    """A (P, C) chunk program whose working set exceeds SBUF (the decoder splits the chunk)."""


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def chunk_window(length: int, real: int, P: int, cmax: int) -> int:
    """The KV window C of a chunk of P rows (`real` of them tokens) after `length` positions: a power
    of two holding them all, at least MIN_WINDOW, at most the cache's `cmax`."""
    return min(cmax, max(MIN_WINDOW, P, _pow2(length + real)))


def chunk_feeds(toks: list[int], length: int, P: int, C: int, scale: float) -> dict:
    """A chunk program's inputs: the tokens left-padded to P rows, their positions after `length`,
    and the window's validity bias (padding rows and the slots past the conversation masked),
    divided by the attention scale as the program adds it before scaling."""
    from isthmus.compiler.lower.npu.attention import NEG
    real = len(toks)
    pad = P - real
    bias = np.zeros(C, np.float32)
    bias[:pad] = NEG
    bias[P:C - length] = NEG
    return {"ids": np.array([0] * pad + toks, np.int32),
            "pos": np.array([0] * pad + list(range(length, length + real)), np.int32),
            "kvbias": bias / np.float32(scale)}


class NpuDecoder:
    """One conversation: `step(ids)` runs the chunk programs over ids, returns the last logits."""

    def __init__(self, rt: DecoderRuntime):
        self.rt = rt
        self.length = 0
        self.saved = None

    def _pieces(self, ids: list[int]) -> list[tuple[list[int], int]]:
        out, n, max_chunk = [], len(ids), self.rt.max_chunk
        if self.length == 0:                       # the first chunk may be padded on the left
            first = n % max_chunk or max_chunk
            out.append((ids[:first], min(max_chunk, max(8, _pow2(first)))))
            ids = ids[first:]
        while ids:                                 # later chunks: exact power-of-two sizes
            p = min(max_chunk, 1 << (len(ids).bit_length() - 1))
            out.append((ids[:p], p))
            ids = ids[p:]
        return out

    def step(self, ids) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            raise InputError("decoder step needs at least one token")
        if self.length + len(ids) > self.rt.cmax:
            raise InputError(f"{self.length + len(ids)} tokens exceed the context window of {self.rt.cmax}")
        vocab = self.rt.img.spec.vocab
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} out of range [0, {vocab})")
        with self.rt.lock:
            self.rt.claim(self)
            logits = None
            for toks, P in self._pieces(ids):
                logits = self._fit(toks, P)
        return logits

    def _fit(self, toks: list[int], P: int) -> np.ndarray:
        """Run a chunk, or, when its program's working set (the KV window grows with the context)
        does not fit SBUF, two chunks of half the size (a left-padded one first, if padded)."""
        try:
            return self._run(toks, P)
        except DoesNotFit:
            half = P // 2
            head = len(toks) - half
            if head <= 0:
                return self._fit(toks, half)
            self._fit(toks[:head], half)
            return self._fit(toks[head:], half)

    def _run(self, toks: list[int], P: int) -> np.ndarray:
        rt, real = self.rt, len(toks)
        C = chunk_window(self.length, real, P, rt.cmax)
        lp = rt.program(P, C)
        result = lp.run(chunk_feeds(toks, self.length, P, C, rt.img.spec.scale))
        rt.exe.record(lp.program, lp.timeline, result.stats)
        self.length += real
        return result.outputs["logits"]

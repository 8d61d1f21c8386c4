"""The functional simulator: machine state, views of access patterns, and `run`.

Memory is bytes. Fresh SBUF, PSUM and HBM are filled with 0xFF bytes, which read as NaN in
every float type (and -1 in integer types), so reading memory nothing wrote shows in the result.
Each instruction is *prepared* once into a closure over numpy views of the machine's memory
(`semantics.py`): all bounds, capacity, alignment, shape and dtype rules are checked then, and
the run loop only calls closures, in the order the timing model schedules them. Arithmetic is
done in fp32 and rounded to the destination dtype (`convert`): round to nearest even; fp8 e4m3
saturates to +-448; integers round to nearest even, saturate, and NaN becomes 0.

    result = run(program, {"A": a, "B": b}, config="datacenter")
    result.outputs["C"], result.stats.cycles, print(result.stats.table())

    loaded = LoadedProgram(program, "datacenter")        # check and prepare once, run many times
    loaded.run({"A": a, "B": b}).outputs["C"]
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from functools import partial

import numpy as np

from isthmus.errors import NpuError
from isthmus.openblas import single_threaded
from isthmus.npu.config import NpuConfig, load_config
from isthmus.npu.isa import AP, DTYPES, Program, instruction_error
from isthmus.npu.timing import Stats, Timeline, schedule, stats

F32 = np.dtype(np.float32)
FP8 = DTYPES["f8e4m3"].np
FP8_MAX = 448.0
_ROUND_ONLY = (F32, np.dtype(np.float16), DTYPES["bf16"].np)


class Machine:
    """Memories of one run. SBUF/PSUM keep the config's capacity for every check, but store only the
    first `sbuf_width`/`psum_width` bytes of each partition (what the program touches: `for_program`),
    so partitions sit close together in host memory."""

    def __init__(self, cfg: NpuConfig, hbm_bytes: int, sbuf_width: int | None = None, psum_width: int | None = None,
                 hbm: np.ndarray | None = None):
        self.cfg = cfg
        self.sbuf = np.full((cfg.partitions, sbuf_width or cfg.sbuf_bytes_per_partition), 0xFF, np.uint8)
        self.psum = np.full((cfg.partitions, psum_width or cfg.psum_bytes_per_partition), 0xFF, np.uint8)
        if hbm is not None and (hbm.dtype != np.uint8 or hbm.ndim != 1 or hbm.size < hbm_bytes):
            raise NpuError(f"a shared HBM must be a flat uint8 array of at least {hbm_bytes:,} bytes")
        self.hbm = np.full(hbm_bytes, 0xFF, np.uint8) if hbm is None else hbm
        self.resident: list[tuple[int, int]] = []      # HBM byte ranges `reset` leaves alone
        self._scratch: dict = {}
        self._views: dict = {}

    @classmethod
    def for_program(cls, cfg: NpuConfig, prog: Program, hbm: np.ndarray | None = None) -> "Machine":
        width = {"sbuf": 1, "psum": 1}
        for ins in prog.instructions:
            for a in ins.args.values():
                if isinstance(a, AP) and a.space in width:
                    width[a.space] = max(width[a.space], a.offset + a.extent)
        return cls(cfg, prog.hbm_bytes, min(-(-width["sbuf"] // 64) * 64, cfg.sbuf_bytes_per_partition),
                   min(-(-width["psum"] // 64) * 64, cfg.psum_bytes_per_partition), hbm)

    def reset(self) -> None:
        """Fresh memory again (all bytes 0xFF, NaN), keeping every prepared view valid; resident HBM
        ranges (`LoadedProgram.bind`) keep their contents."""
        self.sbuf.fill(0xFF)
        self.psum.fill(0xFF)
        pos = 0
        for lo, hi in sorted(self.resident) + [(self.hbm.size, self.hbm.size)]:
            if lo > pos:
                self.hbm[pos:lo].fill(0xFF)
            pos = max(pos, hi)

    def scratch(self, shape, slot: str, dtype=F32) -> np.ndarray:
        """A reusable buffer: instructions run one at a time, so one per (shape, dtype, slot) suffices."""
        key = (tuple(shape), np.dtype(dtype), slot)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = np.empty(shape, dtype)
        return buf

    def memo(self, key, make):
        """A constant derived at prepare time (masks, iota values), shared by identical instructions."""
        v = self._scratch.get(key)
        if v is None:
            v = self._scratch[key] = make()
        return v

    def view(self, a: AP, what: str = "") -> np.ndarray:
        """A numpy view of `a` (shape (count, *sizes)); NpuError for any bounds or alignment violation."""
        v = self._views.get(a)
        if v is None:
            v = self._views[a] = self._make_view(a, what)
        return v

    def _make_view(self, a: AP, what: str) -> np.ndarray:
        dt = DTYPES[a.dtype].np
        isz = dt.itemsize
        strides = [s * isz for _, s in a.dims]
        if a.offset % isz:
            raise NpuError(f"misaligned access: {what} {a} starts at byte offset {a.offset:#x}, "
                           f"not a multiple of the {a.dtype} element size {isz}")
        if a.space == "hbm":
            last = a.offset + (a.count - 1) * a.pstride * isz + a.extent
            if last > self.hbm.size:
                raise NpuError(f"HBM access {what} {a} ends at byte {last:#x}, past the {self.hbm.size:#x} "
                               f"bytes of HBM")
            return np.ndarray(a.shape, dt, self.hbm, a.offset, [a.pstride * isz] + strides)
        mem = self.sbuf if a.space == "sbuf" else self.psum
        cap = self.cfg.sbuf_bytes_per_partition if a.space == "sbuf" else self.cfg.psum_bytes_per_partition
        parts, width = mem.shape
        if a.start + a.count > parts:
            raise NpuError(f"partition range {a.start}:{a.start + a.count} of {what} {a} exceeds the "
                           f"{parts} partitions")
        if a.offset + a.extent > cap:
            raise NpuError(f"{a.space.upper()} overflow: {what} {a} ends at byte {a.offset + a.extent:#x} of its "
                           f"partitions, past the {cap} bytes ({cap // 1024} KiB) each partition has")
        if a.offset + a.extent > width:
            raise NpuError(f"{a} lies outside the part of {a.space.upper()} this machine was sized for")
        return np.ndarray(a.shape, dt, mem, a.start * width + a.offset, [width] + strides)

    def write_tensor(self, t, value) -> None:
        arr = np.asarray(value)
        if arr.shape != tuple(t.shape):
            raise NpuError(f"input {t.name}: expected shape {tuple(t.shape)}, got {arr.shape}")
        view = np.ndarray(t.shape, DTYPES[t.dtype].np, self.hbm, t.offset)
        convert(self, view, arr.astype(F32) if arr.dtype != view.dtype else arr, "input")()

    def read_tensor(self, t) -> np.ndarray:
        return self.tensor_view(t).copy()

    def tensor_view(self, t) -> np.ndarray:
        """A numpy view of HBM tensor `t` (a TensorDecl): what the host sees through its DMA window."""
        return np.ndarray(t.shape, DTYPES[t.dtype].np, self.hbm, t.offset)


def chain(*fns):
    """One zero-argument callable running `fns` (Nones dropped) in order."""
    fns = [f for f in fns if f is not None]
    if len(fns) == 1:
        return fns[0]
    if len(fns) == 2:
        a, b = fns
        return lambda: (a(), b())
    if len(fns) == 3:
        a, b, c = fns
        return lambda: (a(), b(), c())
    return lambda: [f() for f in fns]


def f32_kwargs(*arrays) -> dict:
    """Keyword arguments making a ufunc compute in fp32: none when every operand already is fp32."""
    if all(not isinstance(a, np.ndarray) or a.dtype == F32 for a in arrays):
        return {}
    return {"dtype": F32, "casting": "unsafe"}


def compute_into(m, dst: np.ndarray, ufunc, *args, slot: str = "out", **kw):
    """A step computing `ufunc(*args)` in fp32 into `dst`, rounding by the documented rules. Inputs of
    any dtype are converted by numpy inside the call; f32/bf16/f16 results are written directly."""
    if dst.dtype in _ROUND_ONLY:
        return partial(ufunc, *args, out=dst, **f32_kwargs(dst, *args), **kw)
    tmp = m.scratch(dst.shape, slot)
    return chain(partial(ufunc, *args, out=tmp, **f32_kwargs(*args), **kw), convert(m, dst, tmp))


def convert(m, dst: np.ndarray, src: np.ndarray, slot: str = "conv"):
    """A step writing `src` (dst's shape, any dtype) into `dst` with the documented rounding rules.
    `m` provides `scratch(shape, slot)` buffers."""
    if src is dst:
        return None
    if dst.dtype == src.dtype or (dst.dtype in _ROUND_ONLY and src.dtype in _ROUND_ONLY + (FP8,)):
        return partial(np.copyto, dst, src, casting="unsafe")
    if dst.dtype in _ROUND_ONLY:                                 # from an integer
        return partial(np.copyto, dst, src, casting="unsafe")
    tmp = m.scratch(dst.shape, slot)
    to_f32 = None if src.dtype == F32 else partial(np.copyto, tmp, src, casting="unsafe")
    x = src if src.dtype == F32 else tmp
    if dst.dtype == FP8:
        return chain(to_f32, partial(np.clip, x, -FP8_MAX, FP8_MAX, out=tmp),
                     partial(np.copyto, dst, tmp, casting="unsafe"))
    info = np.iinfo(dst.dtype)                                   # integer destination
    lo, hi = float(info.min), float(np.nextafter(np.float32(info.max), 0) if info.bits == 32 else info.max)
    return chain(to_f32, partial(np.rint, x, out=tmp),
                 partial(np.nan_to_num, tmp, copy=False, nan=0.0, posinf=hi, neginf=lo),
                 partial(np.clip, tmp, lo, hi, out=tmp), partial(np.copyto, dst, tmp, casting="unsafe"))


class _Fresh:
    @staticmethod
    def scratch(shape, slot, dtype=F32):
        return np.empty(shape, dtype)


def round_to(dtype: str, values) -> np.ndarray:
    """`values` as stored in `dtype` under the same rules (used for constants)."""
    src = np.asarray(values)
    out = np.empty(src.shape, DTYPES[dtype].np)
    convert(_Fresh, out, src)()
    return out


@dataclass
class RunResult:
    outputs: dict[str, np.ndarray]
    stats: Stats
    timeline: Timeline
    machine: Machine


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector: preparing builds many small objects and would otherwise
    trigger collections that scan the whole program repeatedly (half the time of a run)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def prepare(prog: Program, m: Machine, indices=None) -> list:
    """One closure per instruction in `indices` (default: all); NpuError names the instruction.
    Identical instructions (an unrolled loop's body) share one closure."""
    from isthmus.npu.semantics import SEMANTICS
    fns, done = [], {}
    with gc_paused():
        for i in (range(len(prog.instructions)) if indices is None else indices):
            ins = prog.instructions[i]
            key = (ins.op, *ins.args.values())
            fn = done.get(key, done)
            if fn is done:
                try:
                    fn = done[key] = SEMANTICS[ins.op](m, ins)
                except NpuError as e:
                    raise instruction_error(i, ins, str(e)) from None
            fns.append(fn)
    return fns


def blas_single_threaded():
    """Run numpy's BLAS on one thread: the simulator calls it on small tiles, where a threaded BLAS
    only adds hand-offs, and on a loaded machine its spinning threads make each 128x128x512 matmul
    tens of times slower. Restores the previous thread count; a no-op where the library is unknown."""
    return single_threaded("numpy")


def execute(prog: Program, m: Machine, order: list[int], fns: list, calls: list | None = None) -> None:
    """Call the prepared closures (`fns[k]` for instruction `order[k]`; None: nothing to do) in order.
    `calls`, if given, is `fns` already reduced to its (k, fn) pairs with fn not None."""
    if calls is None:
        calls = [(k, fn) for k, fn in enumerate(fns) if fn is not None]
    k = 0
    try:
        with np.errstate(all="ignore"), blas_single_threaded():
            for k, fn in calls:
                fn()
    except NpuError as e:
        i = order[k]
        raise instruction_error(i, prog.instructions[i], str(e)) from None


class LoadedProgram:
    """A program checked and prepared once for a config, to run many times (a compiled model's
    decode steps): the timing model, the race check and every instruction's closure are done here;
    `run` only resets memory to NaN, writes the inputs, executes and reads the outputs.

    `serial` (or ISTHMUS_NPU_FORCE_SERIAL=1 in the environment) is FORCE_SERIAL: program order, no
    overlap. `check_races` rejects engines touching the same memory without a semaphore ordering
    them (races.py).

    A compiled model's programs (one per shape bucket) share their weights: `hbm` is a host buffer
    used as this machine's HBM (several loaded programs that declare their common tensors at the same
    offsets may share one), and `bind` writes tensors that stay resident across runs (weights, a KV
    cache): `run` neither resets them nor asks for them."""

    def __init__(self, prog: Program, config: NpuConfig | str | None = None, serial: bool = False,
                 check_races: bool = True, hbm: np.ndarray | None = None):
        cfg = self.config = load_config(config)
        serial = serial or os.environ.get("ISTHMUS_NPU_FORCE_SERIAL", "") not in ("", "0")
        if prog.hbm_bytes > cfg.hbm_capacity_bytes:
            raise NpuError(f"the program needs {prog.hbm_bytes:,} bytes of HBM; config {cfg.name} has "
                           f"{cfg.hbm_capacity_bytes:,}")
        self.program = prog
        with gc_paused():
            self.timeline = schedule(prog, cfg, serial)
            self.machine = Machine.for_program(cfg, prog, hbm)
            self._fns = prepare(prog, self.machine, self.timeline.order)
            self._calls = [(k, fn) for k, fn in enumerate(self._fns) if fn is not None]
            if check_races:
                from isthmus.npu.races import check_races as check
                check(prog, self.timeline)
            self.stats = stats(prog, self.timeline, cfg)
        self._runs = 0
        self._bound: set[str] = set()

    def bind(self, values: dict | None = None, names=()) -> None:
        """Make tensors resident: write `values` (name -> array) now, and mark them and `names` (tensors
        some other loaded program sharing this HBM wrote) as kept across runs."""
        m = self.machine
        for name in [*(values or {}), *names]:
            t = self.program.tensor(name)
            if values and name in values:
                m.write_tensor(t, values[name])
            if name not in self._bound:
                self._bound.add(name)
                m.resident.append((t.offset, t.offset + t.nbytes))

    def run(self, inputs: dict | None = None) -> RunResult:
        prog, m = self.program, self.machine
        if self._runs:
            m.reset()
        self._runs += 1
        inputs = dict(inputs or {})
        for t in prog.tensors:
            if t.name in inputs:
                m.write_tensor(t, inputs.pop(t.name))
            elif t.kind in ("input", "inout") and t.name not in self._bound:
                raise NpuError(f"missing input {t.name} ({t.dtype}{list(t.shape)})")
        if inputs:
            raise NpuError(f"unknown input(s) {', '.join(sorted(inputs))}; the program declares "
                           f"{', '.join(t.name for t in prog.tensors) or 'no tensors'}")
        execute(prog, m, self.timeline.order, self._fns, self._calls)
        outputs = {t.name: m.read_tensor(t) for t in prog.tensors if t.kind in ("output", "inout")}
        return RunResult(outputs, self.stats, self.timeline, m)


def run(prog: Program, inputs: dict | None = None, config: NpuConfig | str | None = None,
        serial: bool = False, check_races: bool = True) -> RunResult:
    """Load `prog` (see LoadedProgram) and run it once: output tensors, stats and timeline."""
    return LoadedProgram(prog, config, serial, check_races).run(inputs)

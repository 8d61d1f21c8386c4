"""The `rig` fixture: a fresh NPU machine with helpers to write/read access patterns and run instructions.

Helpers hang off the fixture (`rig.sb(...)`, `rig.rounded(...)`) because tests import no modules
from tests/ (pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from isthmus.npu import sim
from isthmus.npu.config import load_config
from isthmus.npu.isa import AP, DTYPES, Program

BF16 = np.dtype(ml_dtypes.bfloat16)


class Rig:
    """A datacenter machine with 1 MiB of HBM; `put`/`get` go through the simulator's own views."""

    def __init__(self, config="datacenter", hbm_bytes=1 << 20):
        self.cfg = load_config(config)
        self.m = sim.Machine(self.cfg, hbm_bytes)

    def put(self, ap: AP, values) -> np.ndarray:
        """Store `values` (rounded to the AP's dtype); returns what was stored, as float64."""
        v = self.m.view(ap)
        v[...] = np.asarray(values).astype(DTYPES[ap.dtype].np)
        return v.astype(np.float64)

    def get(self, ap: AP) -> np.ndarray:
        return self.m.view(ap).astype(np.float64)

    def run(self, op: str, /, *aps, **fields) -> None:
        from isthmus.npu.builder import ProgramBuilder
        b = ProgramBuilder(self.cfg)
        b.emit(op, *aps, **fields)
        self.run_program(b.build())

    def run_program(self, prog: Program) -> None:
        fns = sim.prepare(prog, self.m)
        sim.execute(prog, self.m, list(range(len(prog))), fns)

    @staticmethod
    def sb(dtype, parts, cols, offset=0, start=0) -> AP:
        """An SBUF tile [parts, cols] at byte `offset`."""
        return AP("sbuf", dtype, start, parts, offset, ((cols, 1),))

    @staticmethod
    def ps(parts, cols, offset=0, dtype="f32", start=0) -> AP:
        return AP("psum", dtype, start, parts, offset, ((cols, 1),))

    @staticmethod
    def rounded(x, dtype: str) -> np.ndarray:
        """x rounded to `dtype` by numpy/ml_dtypes (the expected storage rule), back as float64."""
        with np.errstate(over="ignore"):
            return np.asarray(x, np.float32).astype(DTYPES[dtype].np).astype(np.float64)


@pytest.fixture
def rig():
    return Rig()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

"""The op table: every op is declared once, with its attributes, shape rule and numpy reference.

Backends register implementations by op name elsewhere; the reference here is the oracle
they are all checked against. Traits are plain strings so passes ask set-membership
questions ("is this elementwise?") instead of walking a class tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from isthmus.compiler.ir import Dim, TensorType
from isthmus.errors import IRError, UnsupportedError

# Traits
ELEMENTWISE = "elementwise"     # output[i] depends only on inputs[i] (after broadcasting)
COMMUTATIVE = "commutative"     # binary op whose operands may be swapped
SHAPE_ONLY = "shape"            # moves or reinterprets data, computes nothing
ROW_WISE = "row_wise"           # output row b (axis 0) depends only on input row b, given that the
                                # non-constant operands lead with that axis; an axis/perm attribute
                                # must leave axis 0 alone (compiler/batch.py checks). Declared on the
                                # ops batched decode has been checked with, not on every op it fits.

REQUIRED = object()  # marks an attribute without a default


@dataclass(frozen=True)
class OpDef:
    name: str
    rule: Callable[[list[TensorType], dict], Any]   # shape/dtype rule: (types, attrs) -> type(s)
    reference: Callable[..., Any]   # reference(*arrays, **attrs) -> array | tuple of arrays
    attrs: dict[str, Any] = field(default_factory=dict)
    traits: frozenset[str] = frozenset()
    num_inputs: tuple[int, int] = (1, 1)   # (min, max)
    doc: str = ""

    def complete_attrs(self, attrs: dict, where: str = "") -> dict:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"{where}: op {self.name} has no attribute(s) {sorted(unknown)}")
        full = {}
        for k, default in self.attrs.items():
            if k in attrs:
                full[k] = attrs[k]
            elif default is REQUIRED:
                raise IRError(f"{where}: op {self.name} needs attribute {k!r}")
            else:
                full[k] = default
        return full

    def infer(self, types: list[TensorType], attrs: dict, where: str = "") -> list[TensorType]:
        lo, hi = self.num_inputs
        if not lo <= len(types) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise IRError(f"{where}: op {self.name} takes {want} inputs, got {len(types)}")
        try:
            out = self.rule(types, attrs)
        except IRError as e:
            raise IRError(f"{where}: {e}" if where else str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as e:
            # A rule handed attributes of the wrong kind (perm=[0, "a"], axes=1, a missing key)
            # fails inside Python; report it as the bad node it is, not as a crash.
            prefix = f"{where}: " if where else ""
            raise IRError(f"{prefix}op {self.name}: invalid attributes {attrs} for inputs "
                          f"{', '.join(map(str, types))} ({type(e).__name__}: {e})") from None
        return list(out) if isinstance(out, (list, tuple)) else [out]


OPS: dict[str, OpDef] = {}


def define(name: str, *, infer, reference, attrs=None, traits=(), inputs=(1, 1), doc: str = "") -> OpDef:
    if name in OPS:
        raise RuntimeError(f"op {name} defined twice")
    if isinstance(inputs, int):
        inputs = (inputs, inputs)
    op = OpDef(name, infer, reference, dict(attrs or {}), frozenset(traits), tuple(inputs), doc)
    OPS[name] = op
    return op


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise UnsupportedError(f"unknown op {name!r}") from None


# -- shape helpers shared by the rules ----------------------------------------------------------

def fail(msg: str):
    raise IRError(msg)


def broadcast_dims(a: Dim, b: Dim) -> Dim:
    if a == b:
        return a
    if a == 1:
        return b
    if b == 1:
        return a
    if isinstance(a, int) and isinstance(b, int):
        fail(f"cannot broadcast dims {a} and {b}")
    # A symbolic dim against a concrete one: the concrete one must hold at run time.
    return b if isinstance(a, str) else a


def broadcast_shapes(*shapes) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        d: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j >= 0:
                d = broadcast_dims(d, s[j])
        out.append(d)
    return tuple(out)


def add_dims(*dims: Dim) -> Dim:
    """Sum of dims; symbolic sums are kept in a canonical "a+b" spelling."""
    total = 0
    syms: list[str] = []
    for d in dims:
        if isinstance(d, int):
            total += d
        else:
            syms.extend(d.split("+"))
    parts = sorted(s for s in syms if not s.lstrip("-").isdigit())
    total += sum(int(s) for s in syms if s.lstrip("-").isdigit())
    if not parts:
        return total
    if total:
        parts.append(str(total))
    return "+".join(parts)


def norm_axis(axis: int, rank: int, where: str = "") -> int:
    if not -rank <= axis < max(rank, 1):
        fail(f"{where}axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def same_dim(a: Dim, b: Dim) -> bool:
    """True unless the dims are provably different."""
    return a == b or isinstance(a, str) or isinstance(b, str)


def float_result(*types: TensorType) -> str:
    """Quantized weights compute in f32; otherwise the first float input's type wins."""
    for t in types:
        if t.dtype in ("f32", "f16", "f64"):
            return t.dtype
    return "f32"

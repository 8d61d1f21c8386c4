"""The pass pipeline: a flat list of named passes, verified after each one.

`ISTHMUS_DUMP=dir` (or `dump_dir=`) writes the IR after every pass as NN-name.ir, and
`on_pass(name, graph)` lets `isthmus compile --dump-ir` print it, so a compiler engineer
can see which pass changed what.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from isthmus.compiler.ir import Graph, clone, verify
from isthmus.compiler.passes.canonicalize import canonicalize
from isthmus.compiler.passes.constant_fold import constant_fold
from isthmus.compiler.passes.cse import cse
from isthmus.compiler.passes.dce import dce
from isthmus.compiler.passes.fusion import fusion

Pass = Callable[[Graph], Graph]

PIPELINE: list[tuple[str, Pass]] = [
    ("verify", lambda g: g),
    ("constant-fold", constant_fold),
    ("cse", cse),
    ("dce", dce),
    ("canonicalize", canonicalize),
    ("cleanup-cse", cse),
    ("cleanup-dce", dce),
]
# The kernel targets run a graph as fused kernel calls: their pipeline ends with the fusion pass,
# whose groups the lowering binds (the reference interpreter and the NPU lowering run the nodes).
FUSED_PIPELINE: list[tuple[str, Pass]] = [*PIPELINE, ("fusion", fusion)]


def run_pipeline(graph: Graph, passes: list[tuple[str, Pass]] | None = None, *, dump_dir=None,
                 on_pass: Callable[[str, Graph], None] | None = None) -> Graph:
    """Run `passes` (default PIPELINE) over a copy of `graph`; the input graph is left as it was."""
    from isthmus.compiler.ir_text import print_graph

    dump_dir = dump_dir or os.environ.get("ISTHMUS_DUMP")
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
    g = clone(graph)
    for i, (name, fn) in enumerate(passes if passes is not None else PIPELINE):
        g = fn(g)
        verify(g)
        if dump_dir:
            (Path(dump_dir) / f"{i:02d}-{name}.ir").write_text(print_graph(g))
        if on_pass:
            on_pass(name, g)
    return g

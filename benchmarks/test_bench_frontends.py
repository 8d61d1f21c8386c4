"""Micro-benchmarks for model import (run: pytest benchmarks/ --benchmark-only).

Peer: the `gguf` package's GGUFReader opening the same file, side by side.
"""

import pytest

from isthmus.models import pull


@pytest.fixture(scope="module")
def gguf_path():
    return pull(progress=False)


def test_isthmus_read_gguf(benchmark, gguf_path):
    from isthmus.compiler.frontends.gguf import read_gguf
    benchmark(read_gguf, gguf_path)


def test_peer_gguf_reader(benchmark, gguf_path):
    gguf = pytest.importorskip("gguf")
    benchmark(gguf.GGUFReader, gguf_path)


def test_isthmus_load_model(benchmark, gguf_path):
    from isthmus.compiler.frontends import load_model
    benchmark.pedantic(load_model, args=(gguf_path,), rounds=3)


def test_ir_print_parse_roundtrip(benchmark, gguf_path):
    from isthmus.compiler.frontends import load_model
    from isthmus.compiler.ir_text import parse_graph, print_graph
    g = load_model(gguf_path).graph
    weights = {v.name: v.data for v in g.constants}
    benchmark(lambda: parse_graph(print_graph(g), weights))

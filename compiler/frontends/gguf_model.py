"""GGUF -> Model: weights (memory-mapped, still quantized), hyperparameters, tokenizer, chat template."""

from __future__ import annotations

from pathlib import Path

from isthmus.compiler.frontends import Model
from isthmus.compiler.frontends.gguf import read_gguf
from isthmus.compiler.frontends.gguf_arch import ROPE_LAYOUT, config_from_gguf
from isthmus.errors import UnsupportedError

# tensors llama.cpp writes that hold nothing the numbers depend on beyond what is applied elsewhere
# (rope_freqs is read into the config's rope factors)
_READ_BY_CONFIG = {"rope_freqs.weight"}


class _Consumed(dict):
    """The file's tensors, noting which ones the builder took."""

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.taken: set[str] = set()

    def __getitem__(self, name):
        self.taken.add(name)
        return super().__getitem__(name)


def load_gguf(source, name: str | None = None) -> Model:
    """A Model from a GGUF path or an in-memory buffer (see `read_gguf`); `name` labels errors."""
    f = read_gguf(source, name)
    config = config_from_gguf(f)
    arch, label = config["architecture"], config.get("name") or Path(f.path).stem
    weights = _Consumed(f.tensors)
    if arch == "gpt2":
        from isthmus.compiler.frontends.gpt2 import build_gpt2
        graph = build_gpt2(config, weights, name=label, where=f.path)
    else:
        from isthmus.compiler.frontends.llama import build_llama
        graph = build_llama(config, weights, rope_layout=ROPE_LAYOUT[arch], name=label, where=f.path)
    unused = sorted(set(f.tensors) - weights.taken - _READ_BY_CONFIG)
    if unused:      # a tensor the builder did not apply would change the numbers: never run without it
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise UnsupportedError(f"{f.path}: tensor {unused[0]}{more} is not applied by isthmus's {arch} builder, "
                               "so the model would run with wrong numbers")
    from isthmus.compiler.frontends.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(f) if "tokenizer.ggml.tokens" in f.metadata else None
    return Model(graph, f.path, "gguf", config, tokenizer)

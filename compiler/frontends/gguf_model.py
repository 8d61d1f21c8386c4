"""GGUF -> Model: weights (memory-mapped, still quantized), hyperparameters, tokenizer, chat template."""

from __future__ import annotations

from pathlib import Path

from isthmus.compiler.frontends import Model
from isthmus.compiler.frontends.gguf import llama_config_from_gguf, read_gguf
from isthmus.compiler.frontends.llama import build_llama


def load_gguf(source, name: str | None = None) -> Model:
    """A Model from a GGUF path or an in-memory buffer (see `read_gguf`); `name` labels errors."""
    f = read_gguf(source, name)
    config = llama_config_from_gguf(f)
    # llama.cpp's converter permutes Q/K rows so rotation pairs are adjacent (the Meta layout)
    graph = build_llama(config, f.tensors, rope_layout="interleaved",
                        name=config.get("name") or Path(f.path).stem, where=f.path)
    from isthmus.compiler.frontends.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(f) if "tokenizer.ggml.tokens" in f.metadata else None
    return Model(graph, f.path, "gguf", config, tokenizer)

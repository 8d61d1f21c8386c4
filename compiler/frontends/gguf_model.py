"""GGUF -> Model: weights (memory-mapped, still quantized), hyperparameters, tokenizer, chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from isthmus.compiler.frontends import Model
from isthmus.compiler.frontends.files import TakenWeights
from isthmus.compiler.frontends.gguf import read_gguf
from isthmus.compiler.frontends.gguf_arch import ROPE_LAYOUT, config_from_gguf

_READ_BY_CONFIG = {"rope_freqs.weight"}     # applied as the config's rope factors


def load_gguf(source, name: str | None = None, ready: Callable[[int], int] | None = None) -> Model:
    """A Model from a GGUF path or an in-memory buffer (see `read_gguf`); `name` labels errors.
    `ready`: see `read_gguf`; the tokenizer is built from the metadata before the tensors are
    waited for, so a sealed model's weights are decrypted meanwhile."""
    from isthmus.compiler.frontends.tokenizer import Tokenizer
    f = read_gguf(source, name, ready)
    tokenizer = Tokenizer.from_gguf(f) if "tokenizer.ggml.tokens" in f.metadata else None
    if ready is not None:
        ready(memoryview(source).nbytes)
    config = config_from_gguf(f)
    arch, label = config["architecture"], config.get("name") or Path(f.path).stem
    weights = TakenWeights(f.tensors)
    if arch == "gpt2":
        from isthmus.compiler.frontends.gpt2 import build_gpt2
        graph = build_gpt2(config, weights, name=label, where=f.path)
    elif arch.startswith("gemma"):
        from isthmus.compiler.frontends.gemma import build_gemma
        graph = build_gemma(config, weights, name=label, where=f.path)
    else:
        from isthmus.compiler.frontends.llama import build_llama
        graph = build_llama(config, weights, rope_layout=ROPE_LAYOUT[arch], name=label, where=f.path)
    weights.refuse_unused(f.path, arch, also_read=_READ_BY_CONFIG)
    return Model(graph, f.path, "gguf", config, tokenizer)

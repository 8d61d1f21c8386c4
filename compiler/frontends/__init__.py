"""Frontends: turn a model file into a `Model` (a Graph plus what generation needs).

`load_model(path)` picks the frontend from the file: GGUF (magic bytes), ONNX (.onnx),
or a folder holding config.json and *.safetensors (HF checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from isthmus.compiler.ir import Graph
from isthmus.errors import ModelFormatError


@dataclass(eq=False)
class Model:
    graph: Graph
    path: str
    format: str                      # "gguf" | "onnx" | "safetensors"
    config: dict = field(default_factory=dict)   # decoder hyperparameters; empty for an arbitrary graph
    tokenizer: object = None          # a Tokenizer (frontends/tokenizer.py), when the file carries one

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @property
    def is_decoder(self) -> bool:
        """True when the frontend recorded a decoder interface on the graph (what generation drives)."""
        return self.graph.decoder is not None

    def parameter_count(self) -> int:
        import math
        return sum(math.prod(v.shape) for v in self.graph.constants if v.type.is_static)

    def weight_bytes(self) -> int:
        return sum(int(v.data.nbytes) for v in self.graph.constants)

    def quantization(self) -> dict[str, int]:
        """Element type -> number of weight tensors stored in it."""
        hist: dict[str, int] = {}
        for v in self.graph.constants:
            if len(v.shape) >= 1 and v.data.size > 16:
                hist[v.dtype] = hist.get(v.dtype, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: -kv[1]))


def load_model(path) -> Model:
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{path}: no such file or folder")
    if p.is_dir():
        onnx_files = sorted(p.glob("*.onnx"))
        if (p / "config.json").exists() and not (onnx_files and not any(p.glob("*.safetensors*"))):
            from isthmus.compiler.frontends.safetensors import load_safetensors
            return load_safetensors(p)
        if len(onnx_files) == 1:       # an ONNX export: its config and tokenizer files sit beside it
            return load_model(onnx_files[0])
        raise ModelFormatError(f"{path}: a folder must hold config.json + *.safetensors, or one .onnx file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read: {e.strerror}") from None
    if magic == b"GGUF":
        from isthmus.compiler.frontends.gguf_model import load_gguf
        return load_gguf(p)
    if p.suffix == ".onnx":
        from isthmus.compiler.frontends.onnx import load_onnx_model
        return load_onnx_model(p)
    if p.suffix == ".gguf":
        raise ModelFormatError(f"{path}: not a GGUF file (bad magic {magic!r})")
    raise ModelFormatError(f"{path}: unknown model format (expected .gguf, .onnx, or a HF folder)")

"""A model's files held in memory, read by the frontends as they read a folder on disk.

    model = load_model_from({"config.json": buf, "model.safetensors": buf2, ...},
                            format="safetensors", entry=".", name="SmolLM2-135M")

The sealed runtime unseals a package into one anonymous mapping and hands the frontends views of
it: no file is written, no temporary copy made. `MemoryFolder` and `MemoryFile` offer the few
`pathlib.Path` methods the frontends' readers use (`/`, `exists`, `is_file`, `read_text`,
`read_bytes`, `glob`, `name`, `stem`, `parent`, `resolve`), plus `buffer()`: a read-only view of
the bytes. They are not os.PathLike on purpose: code that would open a path on disk cannot be
handed one by mistake.

The files may still be arriving: with `ready(rel, n)` (wait until the first n bytes of file `rel`
are in place), every way of reading a file's bytes waits for the whole file, except a GGUF file,
which the GGUF reader asks for as it parses (its metadata comes long before its tensors), so a
sealed model's tokenizer is built while its weights are still being decrypted.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Callable, Mapping

from isthmus.errors import ModelFormatError


class MemoryFolder:
    def __init__(self, files: Mapping[str, object], name: str, ready: Callable[[str, int], object] | None = None):
        self._files = {k: memoryview(v).cast("B").toreadonly() for k, v in files.items()}
        self.name, self._ready = name, ready

    def __str__(self) -> str:
        return self.name

    def __truediv__(self, rel: str) -> MemoryFile:
        return MemoryFile(self, str(rel))

    def resolve(self) -> MemoryFolder:
        return self

    def exists(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return True

    def is_file(self) -> bool:
        return False

    def glob(self, pattern: str) -> list[MemoryFile]:
        return [MemoryFile(self, n) for n in sorted(self._files) if "/" not in n and fnmatch.fnmatchcase(n, pattern)]

    def lookup(self, rel: str) -> memoryview | None:
        """The bytes of a file named relative to the folder ("a/../b" allowed, nothing outside), or
        None; all of them in place (see `ready`)."""
        norm = self._normal(rel)
        data = self._files.get(norm) if norm else None
        if data is not None:
            self.ready(norm, len(data))
        return data

    def contains(self, rel: str) -> bool:
        norm = self._normal(rel)
        return norm is not None and norm in self._files

    def ready(self, rel: str, n: int) -> int:
        """Wait until the first `n` bytes of file `rel` are in place; how many are (all of them
        when the files are not arriving)."""
        if self._ready is None:
            return len(self._files[rel])
        return self._ready(rel, n)

    def streamed(self, rel: str) -> tuple[memoryview, Callable[[int], int]] | None:
        """A file's bytes as they may still be arriving, and the function that waits for the
        first n of them (for a reader that parses as it goes), or None."""
        norm = self._normal(rel)
        if norm is None or norm not in self._files:
            return None
        return self._files[norm], lambda n: self.ready(norm, n)

    @staticmethod
    def _normal(rel: str) -> str | None:
        norm = posixpath.normpath(rel.replace("\\", "/"))
        return None if norm.startswith(("../", "/")) or norm in ("..", ".") else norm


class MemoryFile:
    def __init__(self, folder: MemoryFolder, rel: str):
        self.folder, self.rel = folder, rel

    def __str__(self) -> str:
        return f"{self.folder.name}/{self.rel}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.rel)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> MemoryFolder:
        return self.folder

    def resolve(self) -> MemoryFile:
        return self

    def exists(self) -> bool:
        return self.folder.contains(self.rel)

    is_file = exists

    def is_dir(self) -> bool:
        return False

    def buffer(self) -> memoryview:
        data = self.folder.lookup(self.rel)
        if data is None:
            raise FileNotFoundError(str(self))
        return data

    def read_bytes(self) -> bytes:
        return bytes(self.buffer())

    def read_text(self, encoding: str = "utf-8") -> str:
        return str(self.buffer(), encoding)


def load_model_from(files: Mapping[str, object], *, format: str, entry: str, name: str,
                    ready: Callable[[str, int], object] | None = None):
    """A `Model` from in-memory files: `format` "gguf" | "onnx" (entry: the .gguf / .onnx file's name;
    an ONNX decoder's config and tokenizer files beside it) or "safetensors" (the files of a checkpoint
    folder; entry "."). `name` stands for the folder: the name the model's folder (safetensors,
    ONNX) or file (GGUF) had, so the model is named as when loaded from disk. `ready`: see the
    module's docstring."""
    folder = MemoryFolder(files, name, ready)
    if format == "gguf":
        from isthmus.compiler.frontends.gguf_model import load_gguf
        found = folder.streamed(entry)
        if found is None:
            raise ModelFormatError(f"{name}: no file {entry!r} among the model's files")
        data, ready = found
        return load_gguf(data, name=name, ready=ready)
    if format == "onnx":
        from isthmus.compiler.frontends.onnx import onnx_model
        from isthmus.compiler.frontends.onnx_memory import load_onnx_from
        return onnx_model(load_onnx_from(folder / entry), str(folder / entry), folder)
    if format == "safetensors":
        from isthmus.compiler.frontends.safetensors import load_safetensors
        return load_safetensors(folder)
    raise ModelFormatError(f"{name}: unknown model format {format!r}")

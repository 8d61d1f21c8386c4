"""What every frontend's reader needs: files memory-mapped read-only, untrusted text made safe, and a
check that a builder applied every tensor it was given."""

from __future__ import annotations

import mmap
import os

from isthmus.errors import ModelFormatError


def map_readonly(name: str, kind: str) -> mmap.mmap:
    """Memory-map a model file; every failure is one ModelFormatError line (`kind`: "GGUF", ...)."""
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ModelFormatError(f"{name}: not a {kind} file (only {size} bytes long)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelFormatError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ModelFormatError(f"{name}: is a directory, not a {kind} file") from None
    except OSError as e:
        raise ModelFormatError(f"{name}: cannot read ({e.strerror or e})") from None


class TakenWeights(dict):
    """Weights by name, noting which ones a builder read: `refuse_unused` then names any tensor the
    model would have run without (a bias, a norm, a scaling table), which would change its numbers."""

    def __init__(self, weights: dict):
        super().__init__(weights)
        self.taken: set[str] = set()

    def __getitem__(self, name):
        self.taken.add(name)
        return super().__getitem__(name)

    def refuse_unused(self, where: str, arch: str, also_read=(), shown: dict | None = None) -> None:
        """`shown` maps a name to the one the user's file spells (an HF checkpoint's)."""
        from isthmus.errors import UnsupportedError

        unused = sorted(set(self) - self.taken - set(also_read))
        if unused:
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            name = (shown or {}).get(unused[0], unused[0])
            raise UnsupportedError(f"{where}: tensor {one_line(name)}{more} is not applied by isthmus's {arch} "
                                   "builder, so the model would run with wrong numbers")


def one_line(text: str, limit: int = 120) -> str:
    """Untrusted text (keys, tensor names, values) made safe for a one-line message."""
    if text.isprintable() and len(text) <= limit:
        return text
    return repr(text[:limit])

"""What every frontend's reader needs: files memory-mapped read-only, and untrusted text made safe."""

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


def one_line(text: str, limit: int = 120) -> str:
    """Untrusted text (keys, tensor names, values) made safe for a one-line message."""
    if text.isprintable() and len(text) <= limit:
        return text
    return repr(text[:limit])

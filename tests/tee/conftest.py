"""Fixtures for the simulated TEE: a tiny chat model as a GGUF file, tiny models in every format that
can be sealed (`any_model`, `sealed_any`), a fresh platform, key release service and owner key per
test, and a scanner that looks for plaintext in files."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tiny_formats import FORMATS, OPTIMUM_LLAMA, write_tiny_checkpoint, write_tiny_onnx  # tests/support, on pythonpath
from tiny_models import write_tiny_chat_gguf

# Each tiny model is named "tiny-chat" (so its model id is too). The GGUF file, the safetensors
# checkpoint and the ONNX decoder export are chat models; the other ONNX graphs are run.


@pytest.fixture(scope="session")
def chat_gguf(tmp_path_factory) -> Path:
    return write_tiny_chat_gguf(tmp_path_factory.mktemp("tee-model") / "tiny-chat.gguf")


@pytest.fixture(scope="session")
def model_of(tmp_path_factory, chat_gguf):
    """format -> the path of a tiny model in that format (made once per session, on first use)."""
    made = {"gguf": chat_gguf}

    def get(fmt: str) -> Path:
        if fmt not in made:
            d = tmp_path_factory.mktemp(f"tee-{fmt}")
            made[fmt] = {"onnx": lambda: write_tiny_onnx(d / "tiny-chat.onnx"),
                         "onnx-external": lambda: write_tiny_onnx(d / "tiny-chat.onnx", external=True),
                         "safetensors": lambda: write_tiny_checkpoint(d / "tiny-chat"),
                         "onnx-decoder": lambda: shutil.copytree(OPTIMUM_LLAMA, d / "tiny-chat")}[fmt]()
        return made[fmt]
    return get


@pytest.fixture(params=FORMATS)
def any_model(request, model_of):
    """A tiny model of each format in turn: .fmt, .path."""
    return SimpleNamespace(fmt=request.param, path=model_of(request.param))


@pytest.fixture
def tee(tmp_path):
    """A fresh simulated platform, key release service (pinned to its root) and owner key."""
    from isthmus.runtime.tee.attestation import Platform
    from isthmus.runtime.tee.crypto import generate_signing_key
    from isthmus.runtime.tee.keyrelease import KeyReleaseService

    platform = Platform.create(tmp_path / "platform")
    kms = KeyReleaseService(tmp_path / "kms", root_fingerprint=platform.root_fingerprint)
    yield SimpleNamespace(platform=platform, kms=kms, owner=generate_signing_key(), dir=tmp_path)
    kms.close()


@pytest.fixture
def sealed(tee, chat_gguf):
    """The tiny chat model sealed for tenant "acme" (reference target), registered with `tee.kms`."""
    from isthmus.runtime.tee.owner import seal_model

    pkg, allow = seal_model(chat_gguf, tee.dir / "tiny.isth", tenant="acme", owner_key=tee.owner, kms=tee.kms,
                            targets=["reference"], chunk_size=4096)
    return SimpleNamespace(path=tee.dir / "tiny.isth", pkg=pkg, allow=allow)


@pytest.fixture
def sealed_any(tee, any_model):
    """`any_model` sealed for tenant "acme" (reference target), registered with `tee.kms`."""
    from isthmus.runtime.tee.owner import seal_model

    path = tee.dir / f"tiny-{any_model.fmt}.isth"
    pkg, allow = seal_model(any_model.path, path, tenant="acme", owner_key=tee.owner, kms=tee.kms,
                            targets=["reference"], chunk_size=4096)
    return SimpleNamespace(path=path, pkg=pkg, allow=allow, fmt=any_model.fmt, model=any_model.path)


# -- finding plaintext in files ------------------------------------------------------------------

_K = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5], np.uint64)


def _block_hashes(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each run of 4 consecutive uint64 words (32 bytes)."""
    n = len(words) - 3
    with np.errstate(over="ignore"):
        return words[:n] * _K[0] + words[1:n + 1] * _K[1] + words[2:n + 2] * _K[2] + words[3:n + 3] * _K[3]


def find_plaintext(files, secrets: list[bytes], window: int = 64, min_distinct: int = 8) -> list[str]:
    """Each place where a file holds `window` consecutive bytes of a secret.

    Any run of 63 or more bytes of a secret contains a whole 32-byte
    block aligned to 32 in the secret's own coordinates. Those blocks are hashed, and so is every
    32-byte run of each file (at all 8 byte offsets, vectorised); each hash hit is compared byte by
    byte and grown in both directions, and reported when the common run reaches `window` bytes.
    Blocks with fewer than `min_distinct` distinct byte values (zero padding, runs of one value)
    are not looked for: they are not secret, and every file format has them."""
    assert window >= 63
    hashes, owners = [], []
    for si, s in enumerate(secrets):
        n = len(s) // 32 * 32
        if n < 32:
            continue
        rows = np.sort(np.frombuffer(s[:n], np.uint8).reshape(-1, 32), axis=1)
        keep = np.nonzero(1 + (rows[:, 1:] != rows[:, :-1]).sum(axis=1) >= min_distinct)[0]
        hashes.append(_block_hashes(np.frombuffer(s[:n], np.uint64))[::4][keep])
        owners.append(np.stack([np.full(len(keep), si), keep * 32]))
    if not hashes:
        return []
    table = np.concatenate(hashes)
    order = np.argsort(table, kind="stable")
    table, owners = table[order], np.concatenate(owners, axis=1)[:, order]
    found = []
    for path in files:
        data = Path(path).read_bytes()
        for r in range(8):
            m = (len(data) - r) // 8
            if m < 4:
                continue
            h = _block_hashes(np.frombuffer(data, np.uint64, m, r))
            hs = np.sort(h)                          # sorted queries: the search walks the table in order
            pos = np.minimum(np.searchsorted(table, hs), len(table) - 1)
            common = np.unique(hs[table[pos] == hs])
            if not common.size:
                continue
            for j in np.nonzero(np.isin(h, common))[0]:
                at = r + 8 * int(j)
                lo, hi_ = np.searchsorted(table, h[j], "left"), np.searchsorted(table, h[j], "right")
                for si, off in owners[:, lo:hi_].T.tolist():
                    s = secrets[si]
                    if data[at:at + 32] != s[off:off + 32]:
                        continue
                    lo = 0
                    while at - lo > 0 and off - lo > 0 and data[at - lo - 1] == s[off - lo - 1]:
                        lo += 1
                    hi = 32
                    while at + hi < len(data) and off + hi < len(s) and data[at + hi] == s[off + hi]:
                        hi += 1
                    leak = f"{path}: {lo + hi} bytes of secret {si} (at its offset {off - lo}) at offset {at - lo}"
                    if lo + hi >= window and leak not in found:
                        found.append(leak)
    return found


@pytest.fixture
def scan():
    """`find_plaintext` (test modules cannot import conftest under --import-mode=importlib)."""
    return find_plaintext


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh ISTHMUS_HOME and working directory for a test that runs the CLI."""
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path

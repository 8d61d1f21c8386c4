"""Sealed execution for every model format: a tiny GGUF file, ONNX graph (inline weights, and weights in
external data files), sharded safetensors checkpoint and ONNX decoder export (with its config and
tokenizer files) are sealed, opened in an enclave session and run or chatted with; the outputs must be exactly those of the unsealed model (onnxruntime as a second
oracle for ONNX). Tampered packages of each format do not load; the frontends read the same model
from in-memory files as from disk; the CLI seals, runs and chats sealed and writes no plaintext."""

import json
import tempfile

import numpy as np
import pytest

import isthmus
from isthmus.compiler.frontends import load_model
from isthmus.compiler.frontends.memfiles import MemoryFolder, load_model_from
from isthmus.compiler.ir_text import print_graph
from isthmus.errors import ModelFormatError, SealError, UnsupportedError
from isthmus.runtime.tee.enclave import EnclaveSession
from isthmus.runtime.tee.owner import model_files
from isthmus.runtime.tee.package import read_header
from isthmus.runtime.tee.payload import MANIFEST, PROGRAM, sections

from cli_runner import one_line_error, run  # tests/support
from tiny_formats import CHAT_FORMATS, tiny_onnx_feeds

SAMPLING = dict(max_tokens=12, temperature=0.9, seed=7)
HELLO = [{"role": "user", "content": "Hello there, enclave"}]


def _is_onnx(fmt: str) -> bool:
    """A graph that is run (named inputs and outputs), not chatted with."""
    return fmt not in CHAT_FORMATS


def test_a_sealed_model_of_each_format_computes_what_the_unsealed_one_does(tee, sealed_any):
    plain = isthmus.compile(isthmus.load(sealed_any.model), target="reference")
    s = EnclaveSession(tee.platform, target="reference")
    try:
        s.load(sealed_any.path, tee.kms)
        parts = sections(s._buffer)
        manifest = json.loads(bytes(parts[MANIFEST]))
        _, files = model_files(sealed_any.model, manifest["format"])
        assert set(parts) == {MANIFEST, PROGRAM, *(f"model/{n}" for n, _ in files)}
        for name, path in files:          # the model's files, byte for byte
            assert bytes(parts[f"model/{name}"]) == path.read_bytes()
        if _is_onnx(sealed_any.fmt):
            import onnxruntime as ort

            feeds = tiny_onnx_feeds()
            got, want = s.exe.run(feeds), plain.run(feeds)
            assert set(got) == {"y", "total"} and all(np.array_equal(got[k], want[k]) for k in want)
            oracle = ort.InferenceSession(str(sealed_any.model)).run(["y", "total"], feeds)
            np.testing.assert_allclose(got["y"], oracle[0], rtol=1e-5, atol=1e-5)
            with pytest.raises(UnsupportedError, match="not a decoder"):     # ONNX graphs cannot chat yet
                "".join(s.chat(HELLO, **SAMPLING))
        else:
            sealed_stream, plain_stream = s.chat(HELLO, **SAMPLING), isthmus.chat(plain, HELLO, **SAMPLING)
            sealed_text, plain_text = "".join(sealed_stream), "".join(plain_stream)
            assert list(sealed_stream.token_ids) == list(plain_stream.token_ids) and sealed_text == plain_text
            assert len(set(sealed_stream.token_ids)) > 2
        assert set(s.timings) == {"attest", "unseal", "unseal wait", "compile"}
    finally:
        s.close()
    assert s._buffer is None and s.exe is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap", "header"])
def test_a_tampered_package_of_each_format_does_not_load(tee, sealed_any, damage):
    blob = bytearray(sealed_any.path.read_bytes())
    pkg = read_header(bytes(blob))
    h, start = pkg.header, pkg.data_offset
    span = h.chunk_size + 16
    assert h.chunk_count >= 3
    if damage == "flip":                 # one bit of the middle chunk's ciphertext
        blob[start + span * (h.chunk_count // 2) + 7] ^= 0x10
    elif damage == "truncate":           # the last chunk dropped
        del blob[start + span * (h.chunk_count - 1):]
    elif damage == "swap":               # two full chunks exchanged
        a, b = start, start + span
        blob[a:a + span], blob[b:b + span] = blob[b:b + span], blob[a:a + span]
    else:                                # the header's model id
        at = blob.index(b'"model":"tiny-chat"') + 9
        blob[at] ^= 0x01
    sealed_any.path.write_bytes(bytes(blob))
    s = EnclaveSession(tee.platform, target="reference")
    with pytest.raises(SealError):
        s.load(sealed_any.path, tee.kms)
    assert s.exe is None and s._buffer is None
    s.close()


def _files_in_memory(path, fmt):
    manifest, files = model_files(path, fmt)
    return manifest, {name: bytearray(p.read_bytes()) for name, p in files}


def test_frontends_read_in_memory_files_as_they_read_disk(any_model):
    disk = load_model(any_model.path)
    manifest, files = _files_in_memory(any_model.path, disk.format)
    memory = load_model_from(files, format=manifest["format"], entry=manifest["entry"], name=manifest["name"])
    assert memory.format == disk.format and print_graph(memory.graph) == print_graph(disk.graph)
    for a, b in zip(disk.graph.constants, memory.graph.constants):
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data))
    if disk.tokenizer is not None:
        assert memory.tokenizer.encode("Hello there") == disk.tokenizer.encode("Hello there")
        assert memory.chat_template == disk.chat_template


def test_in_memory_files_keep_the_frontends_checks(model_of):
    manifest, files = _files_in_memory(model_of("onnx-external"), "onnx")
    external = sorted(n for n in files if not n.endswith(".onnx"))
    missing = {k: v for k, v in files.items() if k != external[0]}
    with pytest.raises(ModelFormatError, match=f"external data file '{external[0]}' is missing"):
        load_model_from(missing, format="onnx", entry=manifest["entry"], name="m")
    short = {**files, external[0]: files[external[0]][:-4]}
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model_from(short, format="onnx", entry=manifest["entry"], name="m")
    assert MemoryFolder(files, "m").lookup(f"../{external[0]}") is None
    assert MemoryFolder(files, "m").lookup(f"x/../{external[0]}") is not None

    manifest, files = _files_in_memory(model_of("safetensors"), "safetensors")
    with pytest.raises(ModelFormatError, match="config.json: no such file"):
        load_model_from({k: v for k, v in files.items() if k != "config.json"}, format="safetensors",
                        entry=".", name="m")
    shard = next(n for n in files if n.endswith(".safetensors"))
    with pytest.raises(ModelFormatError, match="truncated|runs past"):
        load_model_from({**files, shard: files[shard][:-8]}, format="safetensors", entry=".", name="m")


def test_the_cli_seals_runs_and_chats_sealed_and_writes_no_plaintext(home, capsys, any_model, monkeypatch, scan):
    tmp = home / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    run(capsys, "keygen", "-o", "owner.key")
    rc, out, err = run(capsys, "seal", any_model.path, "--tenant", "acme", "--owner-key", "owner.key",
                       "-o", "m.isth", "--target", "reference", "--chunk-size", "4096")
    assert rc == 0 and "sealed acme/tiny-chat version 1" in out, err
    secrets = [p.read_bytes() for p in ([any_model.path] if any_model.path.is_file() else [])
               + sorted(p for p in any_model.path.parent.rglob("*") if p.is_file() and p != any_model.path)]
    if _is_onnx(any_model.fmt):
        np.savez(home / "in.npz", **tiny_onnx_feeds())
        rc, out, err = run(capsys, "run", "--sealed", "m.isth", "--inputs", "in.npz", "-o", "sealed.npz",
                           "--target", "reference", "--check", "reference")
        assert rc == 0 and "y" in out and "total" in out, err
        rc, _, err = run(capsys, "run", any_model.path, "--inputs", "in.npz", "-o", "plain.npz",
                         "--target", "reference")
        assert rc == 0, err
        with np.load(home / "sealed.npz") as a, np.load(home / "plain.npz") as b:
            assert sorted(a.files) == sorted(b.files) == ["total", "y"]
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
        one_line_error(*run(capsys, "run", "--inputs", "in.npz")[::2], "--sealed")
        one_line_error(*run(capsys, "run", any_model.path, "--sealed", "m.isth", "--inputs", "in.npz")[::2],
                       "not both")
        one_line_error(*run(capsys, "run", "--sealed", "m.isth", "--inputs", "in.npz", "--target", "reference",
                            "--check", "onnxruntime")[::2], "never writes")
        conversation = []
    else:
        prompt = "My locker code is 7731-Quillfeather; what is the capital of France?"
        args = ["--target", "reference", "--max-tokens", "10", "--temperature", "0.8", "--seed", "3"]
        rc, sealed_out, err = run(capsys, "chat", prompt, "--sealed", "m.isth", "--verbose", *args)
        assert rc == 0 and "unseal duration" in err and "load duration" in err, err
        rc, plain_out, _ = run(capsys, "chat", prompt, "--model", any_model.path, *args)
        assert rc == 0 and sealed_out == plain_out and sealed_out.strip()
        conversation = [prompt.encode(), sealed_out.strip().encode()]
    written = [p for p in home.rglob("*") if p.is_file() and p.name != "owner.key"]
    assert any(p.suffix == ".isth" for p in written)
    leaks = scan(written, [s for s in secrets if len(s) >= 64] + [c for c in conversation if len(c) >= 64])
    assert leaks == [], leaks[:5]


def test_serve_sealed_answers_like_the_unsealed_checkpoint(home, capsys, model_of):
    """`isthmus serve --sealed` of a safetensors checkpoint: the chat API's greedy reply is the
    unsealed model's."""
    import httpx

    from isthmus.cli import build_parser
    from isthmus.interop.cli import build
    from live_server import live_server  # tests/support

    folder = model_of("safetensors")
    run(capsys, "keygen", "-o", "owner.key")
    rc, _, err = run(capsys, "seal", folder, "--tenant", "acme", "--owner-key", "owner.key", "-o", "m.isth",
                     "--target", "reference")
    assert rc == 0, err
    plain = isthmus.compile(isthmus.load(folder), target="reference")
    want = "".join(isthmus.chat(plain, HELLO, max_tokens=8, temperature=0.0))
    app, session, _ = build(build_parser().parse_args(["serve", "--sealed", "m.isth", "--target", "reference"]))
    try:
        with live_server(app) as url:
            r = httpx.post(url + "/v1/chat/completions", timeout=60,
                           json={"model": "tiny-chat", "messages": HELLO, "max_tokens": 8, "temperature": 0})
    finally:
        session.close()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want and want

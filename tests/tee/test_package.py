"""The sealed package format: round trips, and tampering in the manner of Gramine's pf_tamper.

Every tamper test works on a small package in memory and expects a `SealError` from unsealing, never
another exception and never plaintext. Each runs on six payloads (`case`): 1000 random bytes in
64-byte chunks, and the payload the model owner seals for a tiny model of each format (GGUF, ONNX,
ONNX with external data, a sharded safetensors checkpoint, an ONNX decoder export with its config
and tokenizer files: manifest, the model's files, program), in about twenty chunks."""

import dataclasses
import io
import json
import os
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isthmus.errors import SealError
from isthmus.runtime.tee.crypto import TAG_BYTES, generate_signing_key
from isthmus.runtime.tee.package import (MAGIC, Package, _SIGN_DOMAIN, merkle_root, read_header, seal, unseal,
                                         unseal_stream, verify_package)
from isthmus.runtime.tee.payload import PayloadReader, sections

from tiny_formats import FORMATS  # tests/support

OWNER = generate_signing_key()
DEK = bytes(range(32))
DATA = os.urandom(1000)
CHUNK = 64


def make(data=DATA, *, dek=DEK, chunk=CHUNK, tenant="acme", model="m", version=1, owner=OWNER, **kw) -> bytes:
    out = io.BytesIO()
    seal(io.BytesIO(data), len(data), out, tenant=tenant, model=model, version=version, dek=dek, signer=owner,
         program_digest=bytes(48), chunk_size=chunk, **kw)
    return out.getvalue()


def open_(blob: bytes, dek=DEK) -> bytes:
    _, buf = unseal(blob, dek)
    return bytes(buf)


@pytest.fixture(scope="module", params=("bytes", *FORMATS))
def case(request, model_of):
    """A payload to seal and tamper with: .data, .chunk (at least 16 full chunks of one size)."""
    if request.param == "bytes":
        return SimpleNamespace(data=DATA, chunk=CHUNK)
    from isthmus.compiler.frontends import load_model
    from isthmus.runtime.tee.owner import compile_program, model_files
    from isthmus.runtime.tee.payload import FILE_PREFIX, MANIFEST, PROGRAM

    path = model_of(request.param)
    model = load_model(path)
    manifest, files = model_files(path, model.format)
    reader = PayloadReader([(MANIFEST, json.dumps(manifest).encode()), *((FILE_PREFIX + n, p) for n, p in files),
                            (PROGRAM, compile_program(model).encode())])
    data = reader.read()
    reader.close()
    assert len(data) == reader.size and len(files) >= {"onnx-external": 4, "safetensors": 8,
                                                       "onnx-decoder": 6}.get(request.param, 1)
    return SimpleNamespace(data=data, chunk=max(64, len(data) // 20 // 16 * 16))


@pytest.fixture(scope="module")
def blob(case) -> bytes:
    return make(case.data, chunk=case.chunk)


def chunk_spans(blob: bytes) -> list[tuple[int, int]]:
    pkg = read_header(blob)
    spans, pos = [], pkg.data_offset
    for i in range(pkg.header.chunk_count):
        n = pkg.header.chunk_length(i) + TAG_BYTES
        spans.append((pos, pos + n))
        pos += n
    return spans


# -- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 63, 64, 65, 1000, 4096])
def test_round_trip_at_every_chunk_edge(size):
    data = os.urandom(size)
    blob = make(data)
    assert open_(blob) == data
    assert b"".join(bytes(c) for c in unseal_stream(blob, DEK)) == data
    pkg = read_header(blob)
    assert pkg.header.chunk_count == max(1, -(-size // CHUNK))
    assert len(blob) == pkg.size


def test_header_fields_and_keyless_verification(blob, case):
    pkg = verify_package(blob)
    h = pkg.header
    assert (h.tenant, h.model, h.version, h.chunk_size, h.payload_size) == ("acme", "m", 1, case.chunk, len(case.data))
    assert h.owner_key == OWNER.public_key().public_bytes_raw()
    assert blob.startswith(MAGIC)


def test_the_ciphertext_holds_no_plaintext(blob, case, scan, tmp_path):
    for i in range(0, min(len(case.data), 4096) - 16, 16):
        assert case.data[i:i + 16] not in blob
    (tmp_path / "p.isth").write_bytes(blob)
    assert scan([tmp_path / "p.isth"], [case.data]) == []


def test_wrong_key_fails():
    with pytest.raises(SealError, match="chunk 0 .* does not authenticate"):
        open_(make(), dek=bytes(32))


def test_a_path_is_written_atomically(tmp_path):
    path = tmp_path / "x.isth"
    pkg = seal(io.BytesIO(DATA), len(DATA), path, tenant="acme", model="m", version=1, dek=DEK, signer=OWNER,
               program_digest=bytes(48), chunk_size=CHUNK)
    assert not (tmp_path / "x.isth.part").exists()
    assert pkg.name == str(path) and open_(path.read_bytes()) == DATA
    with pytest.raises(SealError, match="ended"):      # the source is shorter than announced
        seal(io.BytesIO(DATA), len(DATA) + 1, tmp_path / "y.isth", tenant="acme", model="m", version=1, dek=DEK,
             signer=OWNER, program_digest=bytes(48), chunk_size=CHUNK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.isth"]


def test_payload_sections_round_trip(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(5000))
    reader = PayloadReader([("model.gguf", f), ("program.ir", b"graph {}")])
    out = io.BytesIO()
    seal(reader, reader.size, out, tenant="acme", model="m", version=1, dek=DEK, signer=OWNER,
         program_digest=bytes(48), chunk_size=1024)
    _, buf = unseal(out.getvalue(), DEK)
    parts = sections(buf)
    assert bytes(parts["model.gguf"]) == f.read_bytes() and bytes(parts["program.ir"]) == b"graph {}"
    assert all((p.obj is parts["model.gguf"].obj) for p in parts.values())
    assert parts["model.gguf"].readonly


def test_bad_seal_arguments():
    for kw in ({"tenant": "a b"}, {"model": ""}, {"version": -1}, {"chunk": 8}, {"dek": b"short"}):
        with pytest.raises(SealError):
            make(**kw)


# -- tampering -----------------------------------------------------------------------------------

def test_every_single_bit_flip_of_the_header_fails(blob):
    end = read_header(blob).data_offset          # magic, length, header JSON and signature
    for byte in range(end):
        for bit in range(8):
            bad = bytearray(blob)
            bad[byte] ^= 1 << bit
            with pytest.raises(SealError):
                open_(bytes(bad))


def test_truncation_at_every_chunk_boundary_fails(blob):
    for start, _ in chunk_spans(blob):
        with pytest.raises(SealError, match="truncated"):
            open_(blob[:start])
    for cut in (0, 5, 12, 100):                   # inside the preamble and header
        with pytest.raises(SealError):
            open_(blob[:cut])


def test_appended_bytes_fail(blob, case):
    for extra in (b"\0", os.urandom(16), blob[-(case.chunk + TAG_BYTES):]):
        with pytest.raises(SealError, match="unexpected bytes"):
            open_(blob + extra)


def test_reordered_chunks_fail(blob):
    spans = chunk_spans(blob)
    chunks = [blob[a:b] for a, b in spans]
    head = blob[:spans[0][0]]
    for i, j in ((0, 1), (3, 7), (1, 14)):        # equal-sized full chunks swapped
        order = list(range(len(chunks)))
        order[i], order[j] = j, i
        with pytest.raises(SealError, match=f"chunk {i} .* does not authenticate"):
            open_(head + b"".join(chunks[k] for k in order))


def test_chunk_spliced_from_another_package_of_the_same_tenant_fails(blob, case):
    spans = chunk_spans(blob)
    data, chunk = case.data, case.chunk
    others = [make(os.urandom(len(data)), dek=os.urandom(32), chunk=chunk),  # its own key (as every package has)
              make(data, version=2, chunk=chunk),                         # same key, another header
              make(data, chunk=chunk)]                                    # same key and fields, another package id
    for other in others:
        a, b = chunk_spans(other)[2]
        spliced = blob[:spans[2][0]] + other[a:b] + blob[spans[2][1]:]
        with pytest.raises(SealError, match="chunk 2 .* does not authenticate"):
            open_(spliced)


def test_dropping_the_last_chunk_and_resigning_still_fails(blob):
    """Even the owner cannot shorten a package by editing its header: every chunk's AAD binds the
    header (chunk count and payload size included), and the last one is marked final."""
    pkg = read_header(blob)
    h = pkg.header
    spans = chunk_spans(blob)
    short = dataclasses.replace(h, payload_size=h.payload_size - h.chunk_length(h.chunk_count - 1),
                                chunk_count=h.chunk_count - 1)
    short = dataclasses.replace(short, merkle_root=merkle_root([]))
    raw = short.encode()
    forged = Package(short, raw, OWNER.sign(_SIGN_DOMAIN + raw)).signed_bytes() + blob[spans[0][0]:spans[-2][1]]
    with pytest.raises(SealError):
        open_(forged)


def test_a_resigned_header_with_another_merkle_root_fails(blob):
    pkg = read_header(blob)
    h = dataclasses.replace(pkg.header, merkle_root=bytes(32))
    raw = h.encode()
    forged = Package(h, raw, OWNER.sign(_SIGN_DOMAIN + raw)).signed_bytes() + blob[pkg.data_offset:]
    with pytest.raises(SealError, match="Merkle root"):
        open_(forged)
    with pytest.raises(SealError, match="Merkle root"):
        verify_package(forged)


def test_a_header_signed_by_someone_else_fails_only_at_key_release(blob):
    """Anyone can re-sign a header with their own key; the package then opens only if that key's owner
    has the data key. The key release service pins each tenant's owner key (tested there)."""
    pkg = read_header(blob)
    raw = pkg.raw
    bad = bytearray(blob)
    sig_at = pkg.data_offset - 64
    bad[sig_at:pkg.data_offset] = generate_signing_key().sign(_SIGN_DOMAIN + raw)
    with pytest.raises(SealError, match="signature"):
        open_(bytes(bad))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4))
def test_random_bit_flips_anywhere_fail(blob, flips):
    bad = bytearray(blob)
    for where, bit in flips:
        bad[int(where * len(bad))] ^= 1 << bit
    if bytes(bad) == blob:          # two flips of the same bit cancel
        return
    with pytest.raises(SealError):
        open_(bytes(bad))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_not_a_package(data):
    with pytest.raises(SealError):
        open_(MAGIC + data)


def test_a_payload_of_several_groups_across_sections_round_trips_and_leaves_no_plaintext(tmp_path):
    """Groups of chunks (chunks.GROUP_BYTES) that straddle section boundaries are copied into scratch
    buffers; the buffers kept for the next seal hold no plaintext afterwards."""
    from isthmus.runtime.tee import chunks

    files = []
    for i, size in enumerate((3_000_001, 9 << 20, 77)):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(os.urandom(size))
    reader = PayloadReader([(f"model/f{i}", f) for i, f in enumerate(files)] + [("program.ir", b"graph {}")])
    out = tmp_path / "p.isth"
    pkg = seal(reader, reader.size, out, tenant="acme", model="m", version=1, dek=DEK, signer=OWNER,
               program_digest=bytes(48), chunk_size=64 << 10)
    reader.close()
    assert pkg.header.chunk_count > 2 * chunks.GROUP_BYTES // (64 << 10)
    _, buf = unseal(out, DEK)
    parts = sections(buf)
    assert all(bytes(parts[f"model/f{i}"]) == f.read_bytes() for i, f in enumerate(files))
    kept = chunks._buffers._free
    assert kept and not any(any(b) for b in kept if len(b) == chunks.GROUP_BYTES)
    assert verify_package(out).header.merkle_root == pkg.header.merkle_root


def test_an_unsealing_hands_out_bytes_only_as_they_authenticate():
    """`Unsealing` decrypts in the background: `ready(end)` returns once the first `end` bytes have
    authenticated; a tampered chunk after them fails only a wait that reaches it, and `abort` leaves
    the buffer zero. Intact, `finish` checks everything and the bytes are the payload's."""
    from isthmus.runtime.tee import chunks
    from isthmus.runtime.tee.package import Unsealing

    data, chunk = os.urandom(3 * chunks.GROUP_BYTES + 1000), 64 << 10
    blob = make(data, chunk=chunk)
    opening = Unsealing(blob, DEK)
    assert opening.ready(10) >= 10 and bytes(opening.buffer[:10]) == data[:10]
    assert opening.finish() == read_header(blob) and bytes(opening.buffer) == data
    assert opening.ready(len(data) + 5) == len(data) and opening.seconds > 0

    bad = 2 * chunks.GROUP_BYTES // chunk + 3                  # a chunk of the third group
    damaged = bytearray(blob)
    damaged[chunk_spans(blob)[bad][0] + 9] ^= 0x40
    opening = Unsealing(bytes(damaged), DEK)
    done = opening.ready(chunks.GROUP_BYTES)
    assert chunks.GROUP_BYTES <= done <= bad * chunk and bytes(opening.buffer[:done]) == data[:done]
    with pytest.raises(SealError, match=f"chunk {bad} of"):
        opening.ready(bad * chunk + 1)
    with pytest.raises(SealError, match=f"chunk {bad} of"):
        opening.finish()
    opening.abort()
    assert bytes(opening.buffer).count(0) == len(data)


@pytest.mark.parametrize("size", [(8 << 20) + 12345, (9 << 20) + 4096 * 3 + 1])
def test_a_large_buffer_is_wiped_to_the_last_byte_on_every_core_and_on_a_cipher_thread(size):
    """zeroise splits buffers of 8 MiB and more over the cipher threads: every byte of a bytearray
    and of an anonymous mapping is zero after, whatever the split's remainder, and a wipe called on a
    cipher thread itself (which must not wait on the pool) wipes inline."""
    import mmap

    from isthmus.runtime.tee import chunks
    from isthmus.runtime.tee.crypto import zeroise

    for make in (lambda: bytearray(os.urandom(size)), lambda: mmap.mmap(-1, size)):
        buf = make()
        buf[:] = os.urandom(size)
        zeroise(buf)
        assert bytes(buf).count(0) == size
        buf[:] = os.urandom(size)
        chunks.pool().submit(zeroise, buf).result(timeout=30)
        assert bytes(buf).count(0) == size
        if isinstance(buf, mmap.mmap):
            buf.close()

"""The simulated TEE's sealed packages: seal and unseal throughput against the cipher that bounds
them, AES-256-GCM alone over the same bytes in the same 1 MiB chunks (cryptography / OpenSSL, one
stream into one reused buffer). Sealing encrypts on every core, writes the package file, builds the
Merkle tree of the tags and signs the header; unsealing reads the file, decrypts into fresh enclave
memory and checks every tag and the root. A third row: the default model's start-up sealed (attest,
key release, unseal alongside the frontend's parse, program check, compile) against its bound: the unsealed start-up (load,
compile) on the reference target plus 1.2 x (the time to decrypt the payload at the measured
AES-GCM rate + attestation and key release)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from isthmus.bench.measure import Row


def _best_rate(fn, nbytes: int, rounds: int, before=lambda: None) -> float:
    """MB/s of the best of `rounds` calls after a warm one; `before` runs untimed ahead of each."""
    before()
    fn()
    times = []
    for _ in range(rounds):
        before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e6


def tee(quick: bool = False, log=print) -> list[Row]:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from isthmus.runtime.tee.crypto import generate_signing_key, zeroise
    from isthmus.runtime.tee.package import DEFAULT_CHUNK, seal, unseal
    from isthmus.runtime.tee.payload import PayloadReader

    size = (32 if quick else 128) << 20
    rounds = 3 if quick else 5
    data = os.urandom(size)
    dek, owner = os.urandom(32), generate_signing_key()
    aes = algorithms.AES(dek)
    out = bytearray(DEFAULT_CHUNK)

    def gcm(decrypt: bool):
        for i, at in enumerate(range(0, size, DEFAULT_CHUNK)):
            chunk = memoryview(data)[at:at + DEFAULT_CHUNK]
            mode = modes.GCM(i.to_bytes(12, "big"), b"\0" * 16) if decrypt else modes.GCM(i.to_bytes(12, "big"))
            c = Cipher(aes, mode)
            ctx = c.decryptor() if decrypt else c.encryptor()
            ctx.update_into(chunk, memoryview(out)[:len(chunk)])
            if not decrypt:          # a decryptor's finalize would reject the made-up tag
                ctx.finalize()

    with tempfile.TemporaryDirectory() as tmp:
        pkg, model = Path(tmp) / "bench.isth", Path(tmp) / "model.bin"
        model.write_bytes(data)

        def do_seal():       # from a model file, as `isthmus seal` reads one (memory-mapped, PayloadReader)
            reader = PayloadReader([("model/model.bin", model)])
            seal(reader, reader.size, pkg, tenant="bench", model="bench", version=1, dek=dek, signer=owner,
                 program_digest=bytes(48))
            reader.close()

        def do_unseal():
            buf = unseal(pkg, dek)[1]
            zeroise(buf)
            buf.close()

        log(f"  seal {size >> 20} MiB")
        # a new file each time, as a real seal writes: replacing the last one would add the
        # filesystem's cost of freeing it (~0.1 s for 128 MiB here) to the figure; and dirty pages
        # written out first (untimed): with earlier work's writes still in the page cache (a full
        # `isthmus bench` writes GGUF files just before), the kernel throttles every writer to the
        # disk's pace, which made the same seal 4x slower
        def fresh():
            pkg.unlink(missing_ok=True)
            os.sync()
        sealed = _best_rate(do_seal, size, rounds, before=fresh)
        log(f"  unseal {size >> 20} MiB")
        unsealed = _best_rate(do_unseal, size, rounds, before=os.sync)   # the seals' writes out of the way
        # what bounds them besides the cipher: writing the package's bytes to a new file as a seal
        # does (preallocated, every core writing its groups), and fresh memory for the plaintext,
        # faulted in, zeroised and unmapped
        blob, copy = pkg.read_bytes(), Path(tmp) / "copy.isth"
        write = _best_rate(lambda: _write_new_file(copy, blob), size, rounds,
                           before=lambda: (copy.unlink(missing_ok=True), os.sync()))
        del blob
        memory = _best_rate(lambda: _fresh_memory(size), size, rounds)
    log("  AES-256-GCM alone")
    enc = _best_rate(lambda: gcm(False), size, rounds)
    dec = _best_rate(lambda: gcm(True), size, rounds)
    shape = f"{size >> 20} MiB"
    from isthmus.runtime.tee.chunks import workers
    rows = [Row("tee", "seal", shape, "package.seal", sealed, "AES-256-GCM encrypt alone", enc, "MB/s", True,
                note=f"from a model file to a new package file; {workers()} cipher threads; writing the "
                     f"package's bytes to a new file alone, the same way: {write:,.0f} MB/s"),
            Row("tee", "unseal", shape, "package.unseal", unsealed, "AES-256-GCM decrypt alone", dec, "MB/s", True,
                note=f"from the file into fresh memory, zeroised after, as an enclave does at close; fresh memory "
                     f"faulted in by zeroising it, alone: {memory:,.0f} MB/s")]
    return rows + [startup(dec, quick, log)]


def _attest_and_release(platform, kms, pkg, target: str) -> float:
    """Seconds to measure a package, sign a report and have the key released and unwrapped, alone
    (in `EnclaveSession.load` the enclave's memory is made on another thread meanwhile)."""
    import json

    from isthmus.runtime.tee.attestation import random_nonce
    from isthmus.runtime.tee.crypto import sha384, unwrap_with, zeroise
    from isthmus.runtime.tee.enclave import EnclaveSession
    from isthmus.runtime.tee.keyrelease import key_request
    from isthmus.runtime.tee.package import read_header

    session = EnclaveSession(platform, target=target)
    t0 = time.perf_counter()
    session.measure_program(read_header(pkg.name))
    report = session.report(random_nonce(), key_request(pkg))
    dek = unwrap_with(session._key, json.loads(kms.release(report, pkg.signed_bytes()))["wrapped"], sha384(report))
    seconds = time.perf_counter() - t0
    zeroise(dek)
    session.close()
    return seconds


def _write_new_file(path: Path, blob: bytes) -> None:
    from isthmus.runtime.tee.chunks import GROUP_BYTES, pool, pwrite_all

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, len(blob))
        view = memoryview(blob)
        for f in [pool().submit(pwrite_all, fd, view[at:at + GROUP_BYTES], at)
                  for at in range(0, len(blob), GROUP_BYTES)]:
            f.result()
    finally:
        os.close(fd)


def _fresh_memory(size: int) -> None:
    from isthmus.runtime.tee.crypto import zeroise
    from isthmus.runtime.tee.package import _anonymous

    buf = _anonymous(size)
    zeroise(buf)
    buf.close()


def startup(dec_rate: float, quick: bool = False, log=print, target: str = "reference") -> Row:
    """The default model's extra start-up when sealed, against its bound: 1.2 x (payload bytes at the
    AES-GCM decrypt rate `dec_rate` (MB/s) + attestation and key release). Best of several
    interleaved rounds of each (the machine may be shared)."""
    import statistics

    from isthmus.models import DEFAULT_MODEL, REGISTRY, cache_path, is_pulled

    if not is_pulled():
        return Row("tee", "start-up", "default model", "extra when sealed", None, "1.2 x (decrypt + attest)", None,
                   "ms", note=f"{DEFAULT_MODEL} not pulled: run `isthmus pull`")
    import isthmus
    from isthmus.runtime.tee.attestation import Platform
    from isthmus.runtime.tee.crypto import generate_signing_key
    from isthmus.runtime.tee.enclave import EnclaveSession
    from isthmus.runtime.tee.keyrelease import KeyReleaseService
    from isthmus.runtime.tee.owner import seal_model

    path = cache_path(REGISTRY[DEFAULT_MODEL])
    rounds = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        platform = Platform.create(Path(tmp) / "platform")
        kms = KeyReleaseService(Path(tmp) / "kms", root_fingerprint=platform.root_fingerprint)
        try:
            log(f"  seal {DEFAULT_MODEL}")
            pkg, _ = seal_model(path, Path(tmp) / "m.isth", tenant="bench", owner_key=generate_signing_key(),
                                kms=kms, targets=[target])
            plain, sealed, attest, unseal_s, waited = [], [], [], [], []
            log(f"  start-up sealed and unsealed, {rounds} rounds each")
            for _ in range(rounds + 1):                 # the first round warms caches and is dropped
                t0 = time.perf_counter()
                isthmus.compile(isthmus.load(path), target=target)
                plain.append(time.perf_counter() - t0)
                session = EnclaveSession(platform, target=target)
                t0 = time.perf_counter()
                session.load(Path(tmp) / "m.isth", kms)
                sealed.append(time.perf_counter() - t0)
                unseal_s.append(session.timings["unseal"])
                waited.append(session.timings["unseal wait"])
                session.close()
                attest.append(_attest_and_release(platform, kms, pkg, target))
        finally:
            kms.close()
    plain, sealed, attest, unseal_s, waited = plain[1:], sealed[1:], attest[1:], unseal_s[1:], waited[1:]
    bound = 1.2 * (pkg.header.payload_size / dec_rate / 1e3 + min(attest) * 1e3)
    return Row("tee", "start-up", f"{pkg.header.payload_size / 1e6:.0f} MB {target}", "sealed start-up",
               min(sealed) * 1e3, "unsealed + 1.2 x (decrypt at AES-GCM rate + attest)", min(plain) * 1e3 + bound,
               "ms", note=f"best of {rounds}: extra when sealed {(min(sealed) - min(plain)) * 1e3:+.1f} ms, "
                          f"bound {bound:.1f} ms (attest+key release {min(attest) * 1e3:.1f}); the unseal "
                          f"{statistics.median(unseal_s) * 1e3:.0f} ms beside the parse, waited for "
                          f"{statistics.median(waited) * 1e3:.1f} (medians); medians unsealed "
                          f"{statistics.median(plain) * 1e3:.0f}, "
                          f"sealed {statistics.median(sealed) * 1e3:.0f} ms")

"""The simulated TEE's sealed packages: seal and unseal throughput against the cipher that bounds
them, AES-256-GCM alone over the same bytes in the same 1 MiB chunks (cryptography / OpenSSL).
Sealing also hashes every chunk into a Merkle tree and signs the header; unsealing checks both."""

from __future__ import annotations

import io
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
        pkg = Path(tmp) / "bench.isth"

        def do_seal():
            seal(io.BytesIO(data), size, pkg, tenant="bench", model="bench", version=1, dek=dek, signer=owner,
                 program_digest=bytes(48))

        def do_unseal():
            buf = unseal(pkg, dek)[1]
            zeroise(buf)
            buf.close()

        log(f"  seal {size >> 20} MiB")
        # a new file each time, as a real seal writes: replacing the last one would add the
        # filesystem's cost of freeing it (~0.1 s for 128 MiB here) to the figure
        sealed = _best_rate(do_seal, size, rounds, before=lambda: pkg.unlink(missing_ok=True))
        log(f"  unseal {size >> 20} MiB")
        unsealed = _best_rate(do_unseal, size, rounds)
    log("  AES-256-GCM alone")
    enc = _best_rate(lambda: gcm(False), size, rounds)
    dec = _best_rate(lambda: gcm(True), size, rounds)
    shape = f"{size >> 20} MiB"
    return [Row("tee", "seal", shape, "package.seal", sealed, "AES-256-GCM encrypt alone", enc, "MB/s", True),
            Row("tee", "unseal", shape, "package.unseal", unsealed, "AES-256-GCM decrypt alone", dec, "MB/s", True,
                note="includes zeroising the plaintext buffer, as an enclave does at close")]

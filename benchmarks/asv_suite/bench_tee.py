"""The simulated TEE's sealed package: seal and unseal throughput (MB/s of payload), side by side
with the two primitives that bound them, each over the same bytes in 1 MiB chunks: AES-256-GCM
alone (cryptography / OpenSSL) and SHA-256 alone (the Merkle leaves). The payload is 32 MiB of
random bytes held in memory (the default chunk size, no disk in the figure); pytest-benchmark's
benchmarks/test_bench_tee.py measures the default model's real payload and the sealed start-up.
"""

from __future__ import annotations

import hashlib
import io
import os
import time

SIZE, CHUNK = 32 << 20, 1 << 20
WAYS = ["seal", "unseal", "aes-gcm alone", "sha256 alone"]


def best_seconds(fn, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Seal:
    params = [WAYS]
    param_names = ["way"]

    def setup(self, way):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from isthmus.runtime.tee.crypto import generate_signing_key
        from isthmus.runtime.tee.package import seal, unseal

        payload, dek, owner = os.urandom(SIZE), os.urandom(32), generate_signing_key()
        view = memoryview(payload)

        def seal_once():
            out = io.BytesIO()
            seal(io.BytesIO(payload), SIZE, out, tenant="bench", model="m", version=1, dek=dek, signer=owner,
                 program_digest=bytes(48), chunk_size=CHUNK)
            return out.getvalue()

        sealed = seal_once()
        aes = AESGCM(dek)
        self.fn = {
            "seal": seal_once,
            "unseal": lambda: unseal(sealed, dek)[1].close(),
            "aes-gcm alone": lambda: [aes.encrypt(i.to_bytes(12, "big"), view[at:at + CHUNK], None)
                                      for i, at in enumerate(range(0, SIZE, CHUNK))],
            "sha256 alone": lambda: [hashlib.sha256(view[at:at + CHUNK]).digest() for at in range(0, SIZE, CHUNK)],
        }[way]

    def track_megabytes_per_second(self, way):
        return SIZE / 1e6 / best_seconds(self.fn)

    track_megabytes_per_second.unit = "MB/s"

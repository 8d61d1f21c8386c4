"""Micro-benchmarks for the simulated TEE (run: pytest benchmarks/test_bench_tee.py --benchmark-only).

Seal and unseal throughput on the default model's payload (its GGUF file plus the compiled program),
side by side with the peer that bounds them: AES-256-GCM alone over the same bytes (cryptography /
OpenSSL); the Merkle tree is over the chunk tags, so no hash runs over the bytes. Start-up: opening the sealed package in an enclave
session (attest, key release, unseal, program check, compile) against loading and compiling the
plain GGUF, on the same target (ISTHMUS_BENCH_TARGET, default reference). Each test records MB/s
or seconds in extra_info; `--benchmark-json` keeps them.
"""

import os

import pytest

from isthmus.models import pull

TARGET = os.environ.get("ISTHMUS_BENCH_TARGET", "reference")


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    """The default model's sealing payload as the owner builds it (GGUF + compiled program)."""
    from isthmus.compiler.frontends import load_model
    from isthmus.runtime.tee.owner import compile_program
    from isthmus.runtime.tee.payload import PayloadReader

    path = pull(progress=False)
    program = compile_program(load_model(path)).encode()
    size = PayloadReader([("model.gguf", path), ("program.ir", program)]).size
    return path, program, size


@pytest.fixture(scope="module")
def tee(tmp_path_factory, payload):
    """A platform, key release service and the default model sealed for them."""
    from types import SimpleNamespace

    from isthmus.runtime.tee.attestation import Platform
    from isthmus.runtime.tee.crypto import generate_signing_key
    from isthmus.runtime.tee.keyrelease import KeyReleaseService
    from isthmus.runtime.tee.owner import seal_model

    d = tmp_path_factory.mktemp("tee")
    platform = Platform.create(d / "platform")
    kms = KeyReleaseService(d / "kms", root_fingerprint=platform.root_fingerprint)
    owner = generate_signing_key()
    pkg, _ = seal_model(payload[0], d / "model.isth", tenant="bench", owner_key=owner, kms=kms, targets=[TARGET])
    return SimpleNamespace(dir=d, platform=platform, kms=kms, owner=owner, path=d / "model.isth", pkg=pkg)


def _rate(benchmark, nbytes):
    benchmark.extra_info["MB"] = round(nbytes / 1e6, 1)
    benchmark.extra_info["MB/s (best)"] = round(nbytes / benchmark.stats.stats.min / 1e6, 1)
    benchmark.extra_info["MB/s (median)"] = round(nbytes / benchmark.stats.stats.median / 1e6, 1)


def test_seal_default_model(benchmark, payload, tmp_path):
    from isthmus.runtime.tee.crypto import generate_signing_key
    from isthmus.runtime.tee.package import seal
    from isthmus.runtime.tee.payload import PayloadReader

    path, program, size = payload
    owner, dek = generate_signing_key(), os.urandom(32)

    def run():
        reader = PayloadReader([("model.gguf", path), ("program.ir", program)])
        seal(reader, reader.size, tmp_path / "m.isth", tenant="bench", model="m", version=1, dek=dek,
             signer=owner, program_digest=bytes(48))
        reader.close()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _rate(benchmark, size)


def test_unseal_default_model(benchmark, tee):
    """Into one anonymous mapping, as the enclave does (the data key obtained once, outside the timing)."""
    import json

    from isthmus.runtime.tee.crypto import sha384, unwrap_with, zeroise
    from isthmus.runtime.tee.enclave import EnclaveSession
    from isthmus.runtime.tee.keyrelease import key_request
    from isthmus.runtime.tee.package import unseal

    s = EnclaveSession(tee.platform, target=TARGET)
    s.measure_program(tee.pkg)
    report = s.report(os.urandom(32), key_request(tee.pkg))
    dek = unwrap_with(s._key, json.loads(tee.kms.release(report, tee.pkg.signed_bytes()))["wrapped"], sha384(report))

    buffers = []
    benchmark.pedantic(lambda: buffers.append(unseal(tee.path, dek)[1]), rounds=5, warmup_rounds=1)
    _rate(benchmark, tee.pkg.header.payload_size)
    for buf in buffers:          # the enclave zeroises at close, not while unsealing
        zeroise(buf)
        buf.close()


def test_peer_aes_gcm_alone(benchmark, payload):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    data = memoryview(payload[0].read_bytes())
    out = bytearray(1 << 20)
    aes = algorithms.AES(os.urandom(32))

    def run():
        for i, at in enumerate(range(0, len(data), 1 << 20)):
            chunk = data[at:at + (1 << 20)]
            enc = Cipher(aes, modes.GCM(i.to_bytes(12, "big"))).encryptor()
            enc.update_into(chunk, memoryview(out)[:len(chunk)])
            enc.finalize()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _rate(benchmark, len(data))


def test_start_unsealed(benchmark, payload):
    import isthmus

    def run():
        return isthmus.compile(isthmus.load(payload[0]), target=TARGET)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["target"] = TARGET


def test_start_sealed(benchmark, tee):
    from isthmus.runtime.tee.enclave import EnclaveSession

    timings = []

    def run():
        s = EnclaveSession(tee.platform, target=TARGET)
        s.load(tee.path, tee.kms)
        timings.append(s.timings)
        s.close()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["target"] = TARGET
    for key in ("attest", "unseal", "compile"):
        benchmark.extra_info[f"{key} s (median)"] = round(sorted(t[key] for t in timings)[len(timings) // 2], 3)

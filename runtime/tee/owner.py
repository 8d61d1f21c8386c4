"""The model owner's side: compile a model, register it with the key release service, seal it.

    pkg = seal_model("model.gguf", "model.isth", tenant="acme", owner_key=load_signing_key("owner.key"),
                     kms=KeyReleaseService.local())

The compiled program is the IR text after the pass pipeline; its SHA-384 goes in the header and,
through `expected_pcrs`, in the allow-list the key release service enforces. The payload carries the
GGUF file as is (weights, tokenizer, hyperparameters) and the program text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from isthmus.errors import InputError, UnsupportedError
from isthmus.runtime.tee import measurement
from isthmus.runtime.tee.attestation import MODULE_ID
from isthmus.runtime.tee.crypto import zeroise
from isthmus.runtime.tee.keyrelease import owner_request
from isthmus.runtime.tee.package import DEFAULT_CHUNK, ID_RE, Package, seal
from isthmus.runtime.tee.payload import PayloadReader


def compile_program(model) -> str:
    """The compiled program of a loaded GGUF model: its graph after the pass pipeline, as IR text."""
    from isthmus.compiler.ir_text import print_graph
    from isthmus.compiler.passes.pipeline import run_pipeline
    return print_graph(run_pipeline(model.graph))


def model_id_for(name_or_path) -> str:
    """A registry name as is; a path's file stem with characters outside the id alphabet replaced."""
    from isthmus.models import REGISTRY
    text = str(name_or_path)
    stem = text if text in REGISTRY else Path(text).stem
    stem = re.sub(r"[^A-Za-z0-9._:@+-]", "-", stem).lstrip("._:@+-")[:128]
    return stem or "model"


def seal_model(model_path, out, *, tenant: str, owner_key, kms, model_id: str | None = None,
               version: int | None = None, targets: list[str] | None = None,
               chunk_size: int = DEFAULT_CHUNK, progress: bool = False) -> tuple[Package, list[dict]]:
    """Seal a GGUF model for `tenant`. Returns the package header and the PCR allow-list registered
    (one entry per target the enclave may run on)."""
    from isthmus.compiler.frontends import load_model
    from isthmus.compiler.targets import default_target

    model_id = model_id or model_id_for(model_path)
    for what, value in (("tenant", tenant), ("model id", model_id)):
        if not ID_RE.match(value):
            raise InputError(f"{what} {value!r} must be 1-128 characters of letters, digits and ._:@+- "
                             "starting with a letter or digit")
    model = load_model(model_path)
    if model.format != "gguf":
        raise UnsupportedError(f"{model_path}: only GGUF models can be sealed (this is {model.format})")
    program = compile_program(model)
    digest = measurement.program_digest(program)
    version = kms.next_version(tenant, model_id) if version is None else version
    allow = [measurement.expected_pcrs(digest, t) for t in (targets or [default_target()])]
    package_id = os.urandom(16)
    request = owner_request(owner_key, tenant=tenant, model=model_id, version=version, package=package_id, pcrs=allow)
    dek, blob = kms.register(request)
    reader = PayloadReader([("model.gguf", Path(model_path)), ("program.ir", program.encode())])
    try:
        pkg = seal(reader, reader.size, out, tenant=tenant, model=model_id, version=version, dek=dek,
                   signer=owner_key, program_digest=digest, key_blob=blob, package_id=package_id,
                   chunk_size=chunk_size, progress=progress)
    finally:
        zeroise(dek)
        reader.close()
    return pkg, allow


def policy_for(pkg: Package, allow: list[dict], root_fingerprint: str, max_age_s: int = 300) -> dict:
    """A verification policy a third party can give `isthmus verify` for reports of this package's enclave:
    the code and program (PCR0-2), and this very package (tenant, model, version, owner key, Merkle root)."""
    identity = pkg.identity()
    return {"root_sha256": root_fingerprint, "module_id": MODULE_ID, "pcrs": allow, "max_age_s": max_age_s,
            "allow_debug": False, **{k: identity[k] for k in ("tenant", "model", "version", "owner_key_sha256",
                                                                "merkle_root")}}

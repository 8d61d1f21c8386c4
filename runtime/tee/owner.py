"""The model owner's side: compile a model, register it with the key release service, seal it.

    pkg = seal_model("model.gguf", "model.isth", tenant="acme", owner_key=load_signing_key("owner.key"),
                     kms=KeyReleaseService.local())

The compiled program is the IR text after the pass pipeline; its SHA-384 goes in the header and,
through `expected_pcrs`, in the allow-list the key release service enforces. The payload carries the
model's files as they are, each a section "model/<name>" (payload.py): a GGUF file; an ONNX file,
the external data files its tensors name and the config, tokenizer and chat template files beside
it; a safetensors checkpoint's config.json, shards, index, tokenizer files and chat template. A section "model.json" says which frontend reads them
(format, entry file, the name the folder or file had), and "program.ir" holds the program text.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from isthmus.errors import InputError, ModelFormatError
from isthmus.runtime.tee import measurement
from isthmus.runtime.tee.attestation import MODULE_ID
from isthmus.runtime.tee.crypto import zeroise
from isthmus.runtime.tee.keyrelease import owner_request
from isthmus.runtime.tee.package import DEFAULT_CHUNK, ID_RE, Package, seal
from isthmus.runtime.tee.payload import FILE_PREFIX, MANIFEST, PROGRAM, PayloadReader


# What a safetensors checkpoint's frontend may read besides its *.safetensors shards.
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "chat_template.jinja", "model.safetensors.index.json")
# What the ONNX frontend reads beside an exported decoder (context length, end tokens, tokenizer, template).
ONNX_SIDE_FILES = ("config.json", "generation_config.json", "genai_config.json", "tokenizer.json",
                   "tokenizer_config.json", "chat_template.jinja")


def compile_program(model) -> str:
    """The compiled program of a loaded model: its graph after the pass pipeline, as IR text."""
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
    """Seal a model (GGUF, ONNX, or a safetensors checkpoint folder) for `tenant`. Returns the package
    header and the PCR allow-list registered (one entry per target the enclave may run on)."""
    from isthmus.compiler.frontends import load_model
    from isthmus.compiler.targets import default_target

    model_id = model_id or model_id_for(model_path)
    for what, value in (("tenant", tenant), ("model id", model_id)):
        if not ID_RE.match(value):
            raise InputError(f"{what} {value!r} must be 1-128 characters of letters, digits and ._:@+- "
                             "starting with a letter or digit")
    model = load_model(model_path)
    manifest, files = model_files(model_path, model.format)
    program = compile_program(model)
    digest = measurement.program_digest(program)
    version = kms.next_version(tenant, model_id) if version is None else version
    allow = [measurement.expected_pcrs(digest, t) for t in (targets or [default_target()])]
    package_id = os.urandom(16)
    request = owner_request(owner_key, tenant=tenant, model=model_id, version=version, package=package_id, pcrs=allow)
    dek, blob = kms.register(request)
    reader = PayloadReader([(MANIFEST, json.dumps(manifest, sort_keys=True).encode()),
                            *((FILE_PREFIX + name, path) for name, path in files), (PROGRAM, program.encode())])
    try:
        pkg = seal(reader, reader.size, out, tenant=tenant, model=model_id, version=version, dek=dek,
                   signer=owner_key, program_digest=digest, key_blob=blob, package_id=package_id,
                   chunk_size=chunk_size, progress=progress)
    finally:
        zeroise(dek)
        reader.close()
    return pkg, allow


def model_files(model_path, fmt: str) -> tuple[dict, list[tuple[str, Path]]]:
    """What a package carries for a model the frontend `fmt` loaded from `model_path`: the manifest
    (format, entry file, name) and the files, as (name relative to the model's folder, path)."""
    path = Path(model_path)
    if fmt == "gguf":
        return {"format": fmt, "entry": path.name, "name": path.name}, [(path.name, path)]
    if fmt == "onnx":
        if path.is_dir():
            path = sorted(path.glob("*.onnx"))[0]        # load_model accepted a folder with one .onnx
        files = [(path.name, path)] + [(loc, path.parent / loc) for loc in _external_files(path)]
        files += [(n, path.parent / n) for n in ONNX_SIDE_FILES if (path.parent / n).is_file()]
        return {"format": fmt, "entry": path.name, "name": path.resolve().parent.name}, files
    if fmt == "safetensors":
        names = [n for n in CHECKPOINT_FILES if (path / n).is_file()]
        names += sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
        return ({"format": fmt, "entry": ".", "name": path.resolve().name},
                [(n, path / n) for n in names])
    raise InputError(f"{model_path}: {fmt} models cannot be sealed")


def _external_files(path: Path) -> list[str]:
    """The external data files an ONNX model's tensors name (checked by the frontend already)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        raise ModelFormatError(f"{path}: not a valid ONNX model") from None
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    locations = set()
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            locations.add(Path(os.path.normpath(loc)).as_posix())
    return sorted(locations)


def policy_for(pkg: Package, allow: list[dict], root_fingerprint: str, max_age_s: int = 300) -> dict:
    """A verification policy a third party can give `isthmus verify` for reports of this package's enclave:
    the code and program (PCR0-2), and this very package (tenant, model, version, owner key, Merkle root)."""
    identity = pkg.identity()
    return {"root_sha256": root_fingerprint, "module_id": MODULE_ID, "pcrs": allow, "max_age_s": max_age_s,
            "allow_debug": False, **{k: identity[k] for k in ("tenant", "model", "version", "owner_key_sha256",
                                                                "merkle_root")}}

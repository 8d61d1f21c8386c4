"""The TEE commands: `isthmus keygen`, `seal`, `attest`, `verify`, and what `chat --sealed` calls.

State lives under $ISTHMUS_HOME/tee: platform/ (the simulated root and attestation key) and kms/
(the local key release service). Nothing here prints or writes plaintext weights or conversations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from isthmus.errors import InputError


def register(sub, common) -> None:
    """Add the TEE subcommands to the `isthmus` parser."""
    from isthmus.runtime.executable import TARGETS

    p = sub.add_parser("keygen", parents=[common], help="make a model owner's Ed25519 signing key")
    p.add_argument("-o", "--output", required=True, help="where to write the private key (PEM, mode 600)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(fn=cmd_keygen)

    p = sub.add_parser("seal", parents=[common], help="seal a GGUF model for a tenant into a .isth package")
    p.add_argument("model", help="a registry name or a .gguf path")
    p.add_argument("--tenant", required=True, help="the tenant id the model belongs to")
    p.add_argument("--owner-key", required=True, help="the owner's signing key (from `isthmus keygen`)")
    p.add_argument("-o", "--output", required=True, help="the package to write (.isth)")
    p.add_argument("--model-id", help="the model id in the package (default: the registry name or file stem)")
    p.add_argument("--version", type=int, help="monotonic package version (default: one past the registered one)")
    p.add_argument("--target", action="append", choices=TARGETS, default=None,
                   help="a target the enclave may run on (repeatable; default: this machine's default)")
    p.add_argument("--chunk-size", type=int, default=None, help="bytes per encrypted chunk (default 1 MiB)")
    p.add_argument("--policy-out", help="also write a verification policy for third parties (JSON)")
    p.set_defaults(fn=cmd_seal)

    p = sub.add_parser("attest", parents=[common], help="print a signed attestation report of the enclave")
    p.add_argument("--nonce", required=True, help="the verifier's nonce, hex (1-64 bytes)")
    p.add_argument("--sealed", help="measure this package's compiled program too (no key is released)")
    p.add_argument("--target", choices=TARGETS, default=None, help="the target the enclave runs on")
    p.add_argument("--user-data", default="", help="hex bytes to bind into the report")
    p.add_argument("--debug-enclave", action="store_true", help="report a debug-mode enclave (never gets keys)")
    p.add_argument("-o", "--output", help="write the report here instead of stdout")
    p.set_defaults(fn=cmd_attest)

    p = sub.add_parser("verify", parents=[common], help="check an attestation report against a policy")
    p.add_argument("report", help="the report (JSON, from `isthmus attest` or GET /v1/attestation)")
    p.add_argument("--policy", required=True, help="policy JSON: root_sha256, pcrs allow-list, max_age_s, ...")
    p.add_argument("--nonce", help="require the report to carry this nonce (hex)")
    p.set_defaults(fn=cmd_verify)


def _hex_arg(text: str, flag: str, max_bytes: int, min_bytes: int = 0) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"{flag} must be hex digits, got {text[:40]!r}") from None
    if not min_bytes <= len(raw) <= max_bytes:
        raise InputError(f"{flag} must be {min_bytes} to {max_bytes} bytes, got {len(raw)}")
    return raw


def _read_json(path, what: str):
    try:
        return json.loads(Path(path).read_bytes())
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path}: the {what} is not JSON") from None


def platform():
    from isthmus.runtime.tee.attestation import Platform, default_dir
    return Platform.load_or_create(default_dir())


# -- commands ------------------------------------------------------------------------------------

def cmd_keygen(args) -> int:
    from isthmus.runtime.tee.crypto import generate_signing_key, public_bytes, save_signing_key
    key = generate_signing_key()
    save_signing_key(key, args.output, force=args.force)
    print(f"wrote {args.output} (Ed25519, keep it private); public key {public_bytes(key).hex()}")
    return 0


def cmd_seal(args) -> int:
    from isthmus.models import resolve
    from isthmus.runtime.tee.crypto import load_signing_key
    from isthmus.runtime.tee.keyrelease import KeyReleaseService
    from isthmus.runtime.tee.owner import model_id_for, policy_for, seal_model
    from isthmus.runtime.tee.package import DEFAULT_CHUNK

    owner = load_signing_key(args.owner_key)
    path = resolve(args.model)
    kms = KeyReleaseService.local()
    pkg, allow = seal_model(path, args.output, tenant=args.tenant, owner_key=owner, kms=kms,
                            model_id=args.model_id or model_id_for(args.model), version=args.version,
                            targets=args.target, chunk_size=args.chunk_size or DEFAULT_CHUNK, progress=True)
    h = pkg.header
    print(f"sealed {h.tenant}/{h.model} version {h.version} -> {args.output}")
    print(f"  payload {h.payload_size / 1e6:.1f} MB in {h.chunk_count} chunks of {h.chunk_size} bytes, "
          f"merkle root {h.merkle_root.hex()[:16]}...")
    print(f"  program sha384 {h.program_digest.hex()}")
    for entry in allow:
        print("  allowed PCRs  " + "  ".join(f"{k}={v[:16]}..." for k, v in sorted(entry.items())))
    if args.policy_out:
        policy = policy_for(pkg, allow, kms.root_fingerprint)
        Path(args.policy_out).write_text(json.dumps(policy, indent=2) + "\n")
        print(f"  policy for verifiers -> {args.policy_out}")
    return 0


def cmd_attest(args) -> int:
    from isthmus.runtime.tee.enclave import EnclaveSession
    from isthmus.runtime.tee.package import read_header

    nonce = _hex_arg(args.nonce, "--nonce", 64, 1)
    user_data = _hex_arg(args.user_data, "--user-data", 1024)
    session = EnclaveSession(platform(), target=args.target, debug=args.debug_enclave)
    if args.sealed:
        session.measure_program(read_header(args.sealed))
    report = json.loads(session.report(nonce, user_data))
    text = json.dumps(report, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_verify(args) -> int:
    from isthmus.runtime.tee.attestation import check_policy
    from isthmus.runtime.tee.crypto import canonical

    doc = _read_json(args.report, "report")
    policy = _read_json(args.policy, "policy")
    nonce = _hex_arg(args.nonce, "--nonce", 64, 1) if args.nonce else None
    report = check_policy(canonical(doc), policy, nonce=nonce)
    import datetime as dt
    when = dt.datetime.fromtimestamp(report.timestamp, dt.timezone.utc).isoformat(timespec="seconds")
    print(f"verified: {report.module_id} at {when}, debug {'on' if report.debug else 'off'}, "
          f"chain to root {policy['root_sha256'][:16]}..., PCRs in the allow-list"
          + (", nonce matches" if nonce is not None else ""))
    for k, v in sorted(report.pcrs.items()):
        print(f"  PCR{k} {v}")
    print(f"  enclave key {report.enclave_key.hex()}")
    return 0


def open_sealed(args):
    """For `isthmus chat --sealed PKG`: an enclave session with the package loaded through the
    local key release service. The caller chats with `session.exe` and closes the session."""
    from isthmus.runtime.tee.enclave import EnclaveSession
    from isthmus.runtime.tee.keyrelease import KeyReleaseService

    kms = KeyReleaseService.local()
    session = EnclaveSession(platform(), target=args.target)
    try:
        session.load(args.sealed, kms, progress=sys.stderr.isatty())
    except BaseException:
        session.close()
        raise
    finally:
        kms.close()
    return session

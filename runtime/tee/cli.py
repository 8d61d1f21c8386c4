"""The TEE commands: `isthmus keygen`, `seal`, `attest`, `verify`, `audit verify`, `usage export|budget`,
and what `chat --sealed`, `run --sealed` and `serve --sealed` call.

State lives under $ISTHMUS_HOME: tee/platform/ (the simulated root and attestation key), tee/kms/ (the
local key release service), audit/audit.jsonl (the hash-chained audit log) and usage/ (raw usage
counts and the privacy ledger). Nothing here prints or writes plaintext weights or conversations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from isthmus.errors import InputError


def register(sub, common) -> None:
    """Add the TEE subcommands to the `isthmus` parser."""
    from isthmus.compiler.targets import TARGETS

    p = sub.add_parser("keygen", parents=[common], help="make a model owner's Ed25519 signing key")
    p.add_argument("-o", "--output", required=True, help="where to write the private key (PEM, mode 600)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(fn=cmd_keygen)

    p = sub.add_parser("seal", parents=[common], help="seal a model for a tenant into a .isth package")
    p.add_argument("model", help="a registry name or a path: .gguf, .onnx (external data files beside it "
                   "are sealed too), or a HF folder (config.json, *.safetensors, tokenizer files)")
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
    p.add_argument("--user-data", default=None,
                   help="hex bytes to bind into the report (default: the enclave's claim of the nonce and package)")
    p.add_argument("--debug-enclave", action="store_true", help="report a debug-mode enclave (never gets keys)")
    p.add_argument("-o", "--output", help="write the report here instead of stdout")
    p.set_defaults(fn=cmd_attest)

    p = sub.add_parser("verify", parents=[common], help="check an attestation report against a policy")
    p.add_argument("report", help="the report (JSON, from `isthmus attest` or GET /v1/attestation)")
    p.add_argument("--policy", required=True, help="policy JSON: root_sha256, pcrs allow-list, max_age_s, ...")
    p.add_argument("--nonce", help="require the report to carry this nonce (hex)")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("audit", parents=[common],
                       help="the hash-chained audit log of key releases, attestations, erasures")
    p.set_defaults(fn=lambda args: _usage(p))
    audit = p.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", parser_class=type(p))
    q = audit.add_parser("verify", parents=[common], help="check the whole chain; name the first broken line")
    q.add_argument("path", nargs="?", help="the log (default: $ISTHMUS_HOME/audit/audit.jsonl)")
    q.add_argument("--head", help="a head hash printed by an earlier verify: the log must still contain it")
    q.set_defaults(fn=cmd_audit_verify)

    p = sub.add_parser("usage", parents=[common], help="differentially private usage statistics per tenant")
    p.set_defaults(fn=lambda args: _usage(p))
    usage = p.add_subparsers(dest="usage_command", metavar="USAGE_COMMAND", parser_class=type(p))
    q = usage.add_parser("export", parents=[common], help="release one tenant's daily usage with differential privacy")
    q.add_argument("--tenant", required=True, help="the tenant id")
    q.add_argument("--epsilon", required=True, type=float, help="privacy loss to spend on each day covered")
    q.add_argument("--from", dest="first", help="first UTC day, YYYY-MM-DD (default: yesterday)")
    q.add_argument("--to", dest="last", help="last UTC day, YYYY-MM-DD (default: the first day)")
    q.add_argument("--max-messages", type=int, default=None, help="messages counted per user-day (default 20)")
    q.add_argument("--max-tokens", type=int, default=None, help="tokens counted per user-day (default 4000)")
    q.add_argument("-o", "--output", help="write the JSON here instead of stdout")
    q.set_defaults(fn=cmd_usage_export)
    q = usage.add_parser("budget", parents=[common], help="show (or set) a tenant's privacy budget per day")
    q.add_argument("--tenant", required=True, help="the tenant id")
    q.add_argument("--set", type=float, dest="epsilon", help="set the budget: epsilon per day of data")
    q.set_defaults(fn=cmd_usage_budget)


def _usage(p) -> int:
    p.print_help()
    return 2


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
    user_data = None if args.user_data is None else _hex_arg(args.user_data, "--user-data", 1024)
    session = EnclaveSession(platform(), target=args.target, debug=args.debug_enclave, audit=_audit_log())
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
    from isthmus.runtime.tee.attestation import PACKAGE_FIELDS, check_policy, package_claim
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
    if any(k in policy for k in PACKAGE_FIELDS):
        claim = package_claim(report)
        print(f"  package {claim['tenant']}/{claim['model']} version {claim['version']}, owner key sha256 "
              f"{claim['owner_key_sha256'][:16]}..., merkle root {claim['merkle_root'][:16]}... (PCR3 matches; "
              f"policy fields {', '.join(k for k in PACKAGE_FIELDS if k in policy)} hold)")
    return 0


def _audit_log():
    from isthmus.runtime.tee.audit import AuditLog
    return AuditLog.local()


def cmd_audit_verify(args) -> int:
    from isthmus.runtime.tee.audit import default_path, verify
    path = Path(args.path) if args.path else default_path()
    if args.head is not None:
        _hex_arg(args.head, "--head", 32, 32)
    result = verify(path, head=args.head)
    print(f"verified {path}: {result.entries} entries, chain intact"
          + (", ends where its head file says" if result.head_file else " (no head file to check the end against)"))
    print(f"  head {result.head}")
    return 0


def cmd_usage_export(args) -> int:
    import datetime as dt

    from isthmus.runtime import privacy
    if args.first:
        first = privacy.parse_day(args.first, "--from")
    else:
        first = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)
    last = privacy.parse_day(args.last, "--to") if args.last else first
    stats = privacy.UsageStats.local()
    try:
        doc = stats.export(args.tenant, args.epsilon, first, last,
                           max_messages=args.max_messages or privacy.DEFAULT_MAX_MESSAGES,
                           max_tokens=args.max_tokens or privacy.DEFAULT_MAX_TOKENS)
    finally:
        stats.close()
    text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    top = max(doc["spent"].values())
    print(f"released {args.tenant} {doc['first']}..{doc['last']} at epsilon {args.epsilon:g} per day; "
          f"most spent on a day {top:g} of {doc['budget_per_day']:g}", file=sys.stderr)
    return 0


def cmd_usage_budget(args) -> int:
    from isthmus.runtime import privacy
    stats = privacy.UsageStats.local()
    try:
        if args.epsilon is not None:
            stats.set_budget(args.tenant, args.epsilon)
        budget, spent = stats.budget(args.tenant), stats.spent(args.tenant)
    finally:
        stats.close()
    print(f"{args.tenant}: budget epsilon {budget:g} per day of data; {len(spent)} days charged")
    for day, eps in spent.items():
        print(f"  {day} spent {eps:g}, left {max(0.0, budget - eps):g}")
    return 0


def open_sealed(args):
    """For `isthmus chat | run | serve --sealed PKG`: an enclave session with the package loaded through
    the local key release service. The caller uses `session.exe` and closes the session."""
    from isthmus.runtime.tee.enclave import EnclaveSession
    from isthmus.runtime.tee.keyrelease import KeyReleaseService

    kms = KeyReleaseService.local()
    session = EnclaveSession(platform(), target=args.target, audit=_audit_log(),
                             batch_invariant=getattr(args, "batch_invariant", False))
    try:
        session.load(args.sealed, kms, progress=sys.stderr.isatty())
    except BaseException:
        session.close()
        raise
    finally:
        kms.close()
    return session

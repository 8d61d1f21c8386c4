"""`isthmus serve`: the Chat Completions server (and the messaging webhook) under uvicorn."""

from __future__ import annotations

import ipaddress
import socket
import sys

from isthmus.errors import InputError


def register(sub, common) -> None:
    from isthmus.cli import add_npu_options
    from isthmus.compiler.targets import TARGETS
    from isthmus.models import DEFAULT_MODEL

    p = sub.add_parser("serve", parents=[common], help="serve a model over the OpenAI Chat Completions API")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or path (default {DEFAULT_MODEL})")
    p.add_argument("--sealed", help="serve this sealed package (.isth) inside the simulated TEE instead")
    p.add_argument("--model-id", help="the model id clients send (default: the registry name or file stem)")
    p.add_argument("--target", default=None, choices=TARGETS,
                   help="where to run (default: numba on a CPU, triton with a CUDA GPU, when available)")
    add_npu_options(p)
    p.add_argument("--tenants", help="tenants file (TOML or JSON): API key hashes, model lists, rate limits, "
                   "and an optional [whatsapp] table for the webhook; without it the server is open")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="compute every token as it would be alone, so a request's logits (and its temperature-0 "
                        "or seeded reply) are bitwise the same under any load, however its prompt is batched or "
                        "cut; prompts are read ~1.3-1.4x slower (reference and numba targets)")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond the batch before 503 (default 64)")
    p.add_argument("--prefix-cache-mb", type=int, default=512,
                   help="memory for the KV caches of finished requests, reused by prompts that extend theirs "
                        "(per tenant, least recently used out first; 0: off; always off with --sealed) (default 512)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit, 413 above (default 1 MiB)")
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections in all; when full, the one idle longest is closed (default 1000)")
    p.add_argument("--max-connections-per-client", type=int, default=100,
                   help="open connections per client address, more are closed (default 100; 0: no limit, "
                   "e.g. behind a proxy that is the only client)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request's head to arrive, else the connection is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request's body to arrive, else 408 (default 30)")
    p.add_argument("--replicas", type=int, default=None,
                   help="serve N replicas through Ray Serve, each with its own engine, sharing limits, webhook "
                   "de-duplication and outbox, and routing a conversation to the replica holding its cache "
                   "(needs isthmus[scale]; docs/serving.md)")
    p.add_argument("--ray-address", help="with --replicas: join this Ray cluster (`ray start --head` prints it; "
                   "default: start a local Ray)")
    p.add_argument("--autoscale", metavar="MIN:MAX", help="with --replicas: let Ray Serve scale between MIN and MAX "
                   "replicas, aiming at --max-batch ongoing requests per replica (--replicas is the initial count)")
    p.add_argument("--replica-cpus", type=int, default=None, help="with --replicas: CPUs Ray reserves for each "
                   "replica, and the threads its engine uses (default: the cluster's CPUs / replicas (MAX with "
                   "--autoscale), at most one node's, at least 1)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--new-key", action="store_true", help="print a fresh API key and its hash for the tenants file, and exit")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("erase", parents=[common], help="erase one user's webhook conversations on a running server")
    p.add_argument("--tenant", required=True, help="the tenant id")
    p.add_argument("--user", required=True, help="the user's id on the platform (the sender's phone number)")
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000); "
                   "the admin key comes from $ISTHMUS_ADMIN_KEY")
    p.set_defaults(fn=cmd_erase)


def cmd_erase(args) -> int:
    from isthmus.interop.webhook import erase_on_server
    return erase_on_server(args.server, args.tenant, args.user)


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be 0..65535, got {port}")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def build(args, shared=None, replica: str | None = None):
    """The ASGI app and what it needs, from parsed `serve` arguments (also used by tests). A Ray
    Serve replica (interop/scale.py) passes the `shared` state (interop/shared_state.py) and its id:
    the tenants' rate limits, the webhook outbox and response ownership then live there."""
    import isthmus
    from isthmus.interop.app import create_app
    from isthmus.interop.envelope import SessionKey
    from isthmus.interop.tenants import Tenants, load_config
    from isthmus.interop.webhook import WhatsAppAdapter, WhatsAppConfig
    from isthmus.models import REGISTRY
    from isthmus.runtime.engine import Engine

    if args.max_batch < 1 or args.max_waiting < 0 or args.max_body_bytes < 1024:
        raise InputError("--max-batch must be >= 1, --max-waiting >= 0 and --max-body-bytes >= 1024")
    if args.prefix_cache_mb < 0:
        raise InputError("--prefix-cache-mb must be >= 0")
    from isthmus.cli import target_options

    limits = _limits(args)
    options = target_options(args)
    doc = load_config(args.tenants) if args.tenants else {}
    tenants = Tenants.from_config(doc, args.tenants or "tenants")
    if shared is not None:
        from isthmus.interop.shared_state import share_limits
        share_limits(tenants, shared)
    whatsapp_cfg = WhatsAppConfig.from_config(doc["whatsapp"], f"{args.tenants}: whatsapp") if "whatsapp" in doc else None
    if whatsapp_cfg is not None:
        whatsapp_cfg.check_tenants(tenants)
    from isthmus.interop.response_store import ResponsesConfig
    responses_cfg = ResponsesConfig.from_config(doc.get("responses", {}), f"{args.tenants}: responses")
    responses_cfg.check_tenants(tenants, f"{args.tenants}: responses")
    session = None
    if args.sealed:
        from isthmus.runtime.tee.cli import open_sealed
        session = open_sealed(args)
        exe, model_id = session.exe, args.model_id or session.package.header.model
        attestation, enclave = session, SessionKey(session)
    else:
        from pathlib import Path
        model = isthmus.load(args.model)
        exe = isthmus.compile(model, target=args.target, batch_invariant=args.batch_invariant, **options)
        model_id = args.model_id or (args.model if args.model in REGISTRY else Path(args.model).stem)
        attestation, enclave = None, None     # no attested key, so no end-to-end envelopes either
    cache_mb = 0 if session is not None else args.prefix_cache_mb    # sealed: no KV outlives its request
    engine = Engine(exe, name=model_id, max_batch=args.max_batch, max_waiting=args.max_waiting,
                    prefix_cache_bytes=cache_mb << 20)
    outbox = None
    if shared is not None and whatsapp_cfg is not None:
        from isthmus.interop.shared_state import SharedOutbox
        outbox = SharedOutbox(shared, replica)
    whatsapp = WhatsAppAdapter(whatsapp_cfg, enclave=enclave, outbox=outbox) if whatsapp_cfg else None
    from isthmus.runtime.privacy import UsageStats      # counts under $ISTHMUS_HOME/usage, released only with DP
    app = create_app({model_id: engine}, tenants=tenants, limits=limits,
                     attestation=attestation, whatsapp=whatsapp, usage=UsageStats.local(),
                     responses=_responses(responses_cfg, shared, replica))
    return app, session, tenants


def settle_heap() -> None:
    """Move everything alive once the model is loaded (graph, packed weights, kernels, the app:
    millions of objects, for the life of the process) out of the garbage collector's way. Otherwise
    every full collection walks them all: ~100 ms on the default model, on whichever request's
    thread happens to allocate then (a 16-token prefill's binding took 101 ms instead of 4: gc.freeze,
    as long-running Python servers do)."""
    import gc

    gc.collect()
    gc.freeze()


def _responses(config, shared, replica):
    if shared is None:
        from isthmus.interop.response_store import ResponseStore
        return ResponseStore(config)
    from isthmus.interop.shared_state import OwnedResponseStore
    return OwnedResponseStore(shared, replica, config)


def _limits(args):
    """The connection and timeout limits, checked against the process's open-file limit (a
    connection is a file descriptor: past the limit, accept() fails and nothing is served)."""
    import math
    import resource

    from isthmus.interop.app import Limits
    if not 1 <= args.max_connections <= 1_000_000 or args.max_connections_per_client < 0:
        raise InputError("--max-connections must be 1..1000000 and --max-connections-per-client >= 0")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not (math.isfinite(value) and 0 < value <= 3600):
            raise InputError(f"{flag} must be a number of seconds in (0, 3600], got {value}")
    need = args.max_connections + 256          # model files, threads, the outbox, logs
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard == resource.RLIM_INFINITY or hard >= need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        else:
            raise InputError(f"--max-connections {args.max_connections} needs {need} open files, over this "
                             f"process's limit of {hard} (ulimit -n); lower it")
    return Limits(args.max_body_bytes, args.max_connections, args.max_connections_per_client,
                  args.header_timeout, args.body_timeout)


def cmd_serve(args) -> int:
    if args.new_key:
        from isthmus.interop.tenants import new_key
        key, digest = new_key()
        print(f"api key (give to the tenant, not stored anywhere): {key}")
        print(f'tenants file entry:  api_key_sha256 = ["{digest}"]')
        return 0
    if args.replicas is not None:
        return _serve_replicas(args)
    for flag, value in (("--ray-address", args.ray_address), ("--autoscale", args.autoscale),
                        ("--replica-cpus", args.replica_cpus)):
        if value is not None:
            raise InputError(f"{flag} needs --replicas N")
    import uvicorn

    _limits(args)                    # a bad flag fails before the model loads
    sock = _listen(args.host, args.port)
    app, session, tenants = build(args)
    settle_heap()
    host, port = sock.getsockname()[:2]
    if tenants.open and not (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
        print(f"isthmus: warning: serving on {host} without a tenants file: anyone who can reach it may use it",
              file=sys.stderr)
    print(f"isthmus: serving {', '.join(app.state.isthmus.engines)} on http://{host}:{port}/v1 "
          f"({'sealed, attested' if session else 'unsealed'}; Ctrl-C stops)", file=sys.stderr)
    from isthmus.interop.connections import uvicorn_config
    config = uvicorn_config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:       # uvicorn shut down gracefully, then re-raised the Ctrl-C it caught
        pass
    finally:
        sock.close()
        if session is not None:
            session.close()
    return 0


def _scale_flags(args) -> tuple[int, int] | None:
    """Check --replicas, --autoscale and the flags that cannot apply under Ray Serve; the autoscale range."""
    if not 1 <= args.replicas <= 1024:
        raise InputError(f"--replicas must be 1..1024, got {args.replicas}")
    autoscale = None
    if args.autoscale is not None:
        lo, sep, hi = args.autoscale.partition(":")
        if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 1024):
            raise InputError(f"--autoscale must be MIN:MAX with 1 <= MIN <= MAX <= 1024, got {args.autoscale!r}")
        autoscale = int(lo), int(hi)
    if args.replica_cpus is not None and not 1 <= args.replica_cpus <= 4096:
        raise InputError(f"--replica-cpus must be 1..4096, got {args.replica_cpus}")
    if args.sealed:
        raise InputError("--sealed with --replicas is not supported: each replica would open its own enclave "
                         "session, with its own attestation and E2E key")
    # the client connections are Ray Serve's proxy's, not ours: these would be silently ignored
    for flag, value, default in (("--max-connections", args.max_connections, 1000),
                                 ("--max-connections-per-client", args.max_connections_per_client, 100),
                                 ("--header-timeout", args.header_timeout, 10.0)):
        if value != default:
            raise InputError(f"{flag} does not apply with --replicas (Ray Serve's proxy holds the connections)")
    return autoscale


def _serve_replicas(args) -> int:
    import importlib.util
    import os

    autoscale = _scale_flags(args)
    spec = importlib.util.find_spec("ray")      # found without importing it (Ray takes seconds to import)
    if spec is None or not any(os.path.isdir(os.path.join(p, "serve")) for p in spec.submodule_search_locations or []):
        raise InputError("--replicas needs Ray Serve: pip install 'isthmus[scale]'")
    if args.max_batch < 1 or args.max_waiting < 0 or args.max_body_bytes < 1024:
        raise InputError("--max-batch must be >= 1, --max-waiting >= 0 and --max-body-bytes >= 1024")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0..65535, got {args.port}")
    # the config is checked here, before Ray starts; the outbox's file is the state actor's
    from isthmus.interop.outbox import WEEK
    from isthmus.interop.response_store import ResponsesConfig
    from isthmus.interop.tenants import Tenants, load_config
    from isthmus.interop.webhook import WhatsAppConfig
    doc = load_config(args.tenants) if args.tenants else {}
    tenants = Tenants.from_config(doc, args.tenants or "tenants")
    outbox, window = ":memory:", WEEK
    if "whatsapp" in doc:
        cfg = WhatsAppConfig.from_config(doc["whatsapp"], f"{args.tenants}: whatsapp")
        cfg.check_tenants(tenants)
        from pathlib import Path
        outbox = cfg.outbox if cfg.outbox == ":memory:" else str(Path(cfg.outbox).resolve())
        window = cfg.dedup_window_s
    ResponsesConfig.from_config(doc.get("responses", {}), f"{args.tenants}: responses").check_tenants(
        tenants, f"{args.tenants}: responses")
    probe = _listen(args.host, args.port)          # the port is free (0: picks one); Serve's proxy then takes it
    port = probe.getsockname()[1]
    probe.close()
    if tenants.open and not (_is_ip(args.host) and ipaddress.ip_address(args.host).is_loopback):
        print(f"isthmus: warning: serving on {args.host} without a tenants file: anyone who can reach it may use it",
              file=sys.stderr)
    _reachable(args.ray_address)
    if not args.sealed:                 # a wrong path fails here, not in every replica; a registry
        from isthmus.models import resolve      # model is pulled once, before the replicas look for it
        resolve(args.model)
    from isthmus.interop import scale
    return scale.run(args, autoscale, port, outbox, window)


def _reachable(address: str | None) -> None:
    """A HOST:PORT cluster address that nothing answers on is a one-line error at once (Ray itself
    retries for minutes before it gives up)."""
    host, sep, port = (address or "").rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return                          # no address (a local Ray), "auto", or a ray:// client address
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise InputError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} "
                         "(start one with `ray start --head`)") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False

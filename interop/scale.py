"""`isthmus serve --replicas N`: the same app on Ray Serve, one engine per replica.

    HTTP ─▶ Serve proxy ─▶ Router (ingress) ─handle + AffinityRouter─▶ ModelReplica × N ─▶ create_app(...)
                              │                                              │
                              └──────────── the state actor (LocalState) ◀───┘

* **ModelReplica** builds the whole server (`cli.build`) inside its own process: engines own
  threads, so nothing of them is made in the driver. Its rate limits, webhook outbox and response
  ownership are bound to the state actor (interop/shared_state.py). It runs each request through
  the FastAPI app as ASGI messages, adds `x-isthmus-replica: <id>`, labels its /metrics series
  with `replica`, and counts requests in Ray's metrics (`isthmus_replica_requests`, exported by
  each Ray node as `ray_isthmus_replica_requests_total{replica, route, status}`).
* **Router** reads the body (up to --max-body-bytes, within --body-timeout), works out the request's affinity
  (interop/affinity.py: its conversation key, and the live owner of a response it names) and
  sends it through a deployment handle whose request router is `AffinityRouter`. When a replica
  dies under a request, the request ends with a clean error: a 503 in OpenAI's error shape before
  the response began, an `error` event (then `data: [DONE]` for chat completions) in a stream.
  Ray Serve restarts the replica; new requests go to the live ones.
* **the state actor** (`ray.remote(LocalState)`, named `isthmus-state`) is placed on the node of
  the `isthmus serve` process, whose disk holds the webhook outbox's SQLite file.

Ray is imported here only; nothing else imports this module unless `--replicas` is given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from isthmus.errors import InputError
from isthmus.interop.affinity import request_affinity
from isthmus.interop.shared_state import LocalState, RemoteState

log = logging.getLogger("isthmus.serve")
APP, NAMESPACE, STATE_ACTOR = "isthmus", "isthmus", "isthmus-state"
SCOPE_KEYS = ("type", "asgi", "http_version", "server", "client", "scheme", "method", "root_path", "path",
              "raw_path", "query_string", "headers")
HEALTH_PERIOD_S = 2.0


def state_client() -> RemoteState:
    actor = ray.get_actor(STATE_ACTOR, namespace=NAMESPACE)
    return RemoteState(lambda method, *args: ray.get(getattr(actor, method).remote(*args)))


class ModelReplica:
    """One replica: the whole server of `isthmus serve`, built here, driven as ASGI."""

    async def __init__(self, options: dict):
        import argparse

        from ray.util.metrics import Counter

        from isthmus.interop.cli import build, settle_heap
        self.id = serve.get_replica_context().replica_id.unique_id
        self.state = state_client()
        self.state.heartbeat(self.id)
        args = argparse.Namespace(**options)
        self.app, self.session, _ = await asyncio.to_thread(build, args, self.state, self.id)
        settle_heap()
        self.app.state.isthmus.metrics.labels = {"replica": self.id}
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()               # engines start, and the webhook's outbox worker
        self.requests = Counter("isthmus_replica_requests", "requests a replica answered, by replica, route and "
                                "status", tag_keys=("replica", "route", "status"))
        self.requests.set_default_tags({"replica": self.id})      # Ray's export adds only a worker id

    def check_health(self):
        """Serve calls this every few seconds: a replica whose engine thread died is restarted."""
        for name, engine in self.app.state.isthmus.engines.items():
            thread = getattr(engine, "_thread", None)
            if thread is not None and not thread.is_alive():
                raise RuntimeError(f"the engine of {name} stopped")
        self.state.heartbeat(self.id)

    async def handle(self, scope: dict, body: bytes, affinity: dict | None = None):
        """The app's ASGI messages for one request (a generator: streams stream)."""
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = [False]

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-isthmus-replica", self.id.encode())]}
                status[0] = message["status"]
            await out.put(message)

        status = [0]
        task = asyncio.get_running_loop().create_task(self.app(dict(scope), receive, send))
        task.add_done_callback(lambda _: out.put_nowait(None))
        try:
            while (message := await out.get()) is not None:
                yield message
            task.result()
        finally:
            gone.set()
            if not task.done():
                task.cancel()
            from isthmus.interop.app import Guard
            self.requests.inc(tags={"route": Guard.route(scope.get("path", "")), "status": str(status[0] or 499)})

    async def whole(self, scope: dict, body: bytes, affinity: dict | None = None) -> list[dict]:
        """All of `handle`'s messages in one reply: a request that does not stream costs one call."""
        return [m async for m in self.handle(scope, body, affinity)]

    async def __del__(self):
        try:
            await self._lifespan.__aexit__(None, None, None)
        finally:
            if self.session is not None:
                self.session.close()


class Router:
    """The HTTP ingress: affinity, then a replica through the handle; clean errors when one dies."""

    def __init__(self, replicas, max_body_bytes: int, body_timeout: float):
        self.replicas, self.streams = replicas, replicas.options(stream=True)
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        self.state = ray.get_actor(STATE_ACTOR, namespace=NAMESPACE)

    async def __call__(self, request: Request) -> Response:
        body = b""
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > self.max_body_bytes:
                        return _error(413, f"The request body is over the limit of {self.max_body_bytes} bytes.",
                                      "invalid_request_error", "request_too_large")
        except TimeoutError:
            return _error(408, f"The request body did not arrive within {self.body_timeout:g} s.",
                          "invalid_request_error", "request_timeout", {"Connection": "close"})
        scope = {k: request.scope[k] for k in SCOPE_KEYS if k in request.scope}
        affinity = request_affinity(request.method, request.url.path, request.headers.get("authorization"), body)
        if "response" in affinity:
            affinity["owner"] = await self.state.owner.remote("response", "", affinity["response"])
        if not affinity.get("stream"):      # one call for the whole answer, or a clean error instead of it
            try:
                start, *rest = await self.replicas.whole.remote(scope, body, affinity=affinity)
            except Exception as e:          # the replica died (or could not be reached) before answering
                return _replica_failed(e)
            return _raw(Response(b"".join(m.get("body", b"") for m in rest), status_code=start["status"]),
                        start.get("headers", []))
        messages = self.streams.handle.remote(scope, body, affinity=affinity)
        try:
            start = await messages.__anext__()
        except Exception as e:
            return _replica_failed(e)
        headers = list(start.get("headers", []))

        async def stream():
            try:
                async for m in messages:
                    if m.get("body"):
                        yield m["body"]
            except Exception as e:
                log.warning("replica failed mid-stream: %s", _why(e))
                yield _stream_error(request.url.path)
        return _raw(StreamingResponse(stream(), status_code=start["status"]), headers)


def _raw(response: Response, headers: list) -> Response:
    response.raw_headers = [(k, v) for k, v in headers]
    return response


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _error(status: int, message: str, kind: str, code: str, headers: dict | None = None) -> Response:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _replica_failed(e: BaseException) -> Response:
    log.warning("replica failed before answering: %s", _why(e))
    return _error(503, "The replica serving this request stopped before it answered; retry the request.",
                  "server_error", "replica_unavailable", {"Retry-After": "1"})


def _stream_error(path: str) -> bytes:
    error = {"message": "The replica serving this stream stopped; retry the request.", "type": "server_error",
             "param": None, "code": "replica_unavailable"}
    if path == "/v1/responses":          # the Responses API's typed `error` event; its streams have no [DONE]
        event = {"type": "error", "code": error["code"], "message": error["message"], "param": None}
        return f"event: error\ndata: {json.dumps(event)}\n\n".encode()
    return f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()


# -- deploying ----------------------------------------------------------------------------------------

def replica_cpus(args, autoscale: tuple[int, int] | None) -> int:
    """--replica-cpus, else the cluster's CPUs shared by the most replicas there may be, at most one
    node's: replicas whose engines each spin a thread per core of the machine would thrash it."""
    if args.replica_cpus is not None:
        return args.replica_cpus
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    most = autoscale[1] if autoscale else args.replicas
    return max(1, min(int(max(nodes, default=1)), int(sum(nodes)) // most))


def application(args, autoscale: tuple[int, int] | None, cpus: int = 1):
    """The Serve application for parsed `serve` arguments, each replica reserving `cpus` CPUs and
    running its engine on that many threads."""
    options = {k: v for k, v in vars(args).items() if k != "fn"}
    for key in ("model", "tenants", "sealed", "key_file"):      # replicas may run in another directory
        if isinstance(options.get(key), str) and Path(options[key]).exists():
            options[key] = str(Path(options[key]).resolve())
    per_replica = args.max_batch + args.max_waiting              # what one engine admits before its 503
    scaling = {"num_replicas": args.replicas}
    if autoscale is not None:
        lo, hi = autoscale
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=lo, max_replicas=hi, initial_replicas=min(max(args.replicas, lo), hi),
            target_ongoing_requests=args.max_batch)}
    env = {"NUMBA_NUM_THREADS": str(cpus), "OMP_NUM_THREADS": str(cpus)}
    if "ISTHMUS_HOME" in os.environ:        # the replicas' models, keys and usage counts: the same home as ours
        env["ISTHMUS_HOME"] = os.environ["ISTHMUS_HOME"]
    actor_options = {"num_cpus": cpus, "runtime_env": {"env_vars": env}}
    replicas = serve.deployment(
        ModelReplica, name="ModelReplica", max_ongoing_requests=per_replica, health_check_period_s=HEALTH_PERIOD_S,
        health_check_timeout_s=30, graceful_shutdown_timeout_s=5, ray_actor_options=actor_options,
        request_router_config=RequestRouterConfig(request_router_class="isthmus.interop.ray_router:AffinityRouter"),
        **scaling).bind(options)
    router = serve.deployment(Router, name="Router", num_replicas=1, max_ongoing_requests=4 * per_replica * args.replicas,
                              ray_actor_options={"num_cpus": 0})
    return router.bind(replicas, args.max_body_bytes, args.body_timeout)


def start_state(outbox: str, window_s: float):
    """The state actor, on this node (its disk holds the outbox file); restarted by Ray if it dies."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(LocalState).options(
        name=STATE_ACTOR, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(outbox, window_s)
    ray.get(actor.ping.remote())
    return actor


def run(args, autoscale: tuple[int, int] | None, port: int, outbox: str, window_s: float) -> int:
    """Deploy, print where, and block until Ctrl-C / SIGTERM; then take the application down."""
    local = not args.ray_address
    if local:       # Ray starts its workers at nice 15: the replicas are the server, so no lower than one
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=args.ray_address or None, namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=args.log_level == "debug", logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot reach the Ray cluster at {args.ray_address}: {str(e).splitlines()[0]}") from None
    actor, ours, deployed = None, False, False
    try:
        from ray.serve.context import _get_global_client
        from ray.serve.exceptions import RayServeException
        try:
            serving = _get_global_client().http_config        # Serve already runs on this cluster
        except RayServeException:
            serving = None
        if serving is not None and (serving.port, serving.host) != (port, args.host) and args.port != 0:
            raise InputError(f"Ray Serve on this cluster already listens on {serving.host}:{serving.port}; "
                             f"pass --host {serving.host} --port {serving.port}, or stop it (`serve shutdown`)")
        if serving is not None:
            port = serving.port
        with _quiet():
            serve.start(http_options={"host": args.host, "port": port})
        ours = serving is None                 # we started Serve: we stop it (and free its port)
        try:        # a stale one from an earlier run (one `isthmus serve --replicas` per cluster: the app is "isthmus")
            ray.kill(ray.get_actor(STATE_ACTOR, namespace=NAMESPACE))
        except ValueError:
            pass
        actor = start_state(outbox, window_s)
        t0 = time.monotonic()
        deployed = True
        cpus = replica_cpus(args, autoscale)
        try:
            serve.run(application(args, autoscale, cpus), name=APP, route_prefix="/", blocking=False)
        except RuntimeError as e:           # a replica's constructor failed, again and again
            reason = next((line.strip() for line in reversed(str(e).splitlines()) if line.strip()), "")
            raise InputError(f"the replicas did not start: {reason[:300]} (Ray's logs have the rest)") from None
        count = f"{autoscale[0]}..{autoscale[1]} (autoscaled)" if autoscale else str(args.replicas)
        print(f"isthmus: serving on http://{args.host}:{port}/v1 with {count} replicas of {cpus} CPU(s) on Ray "
              f"{'(local)' if local else 'at ' + args.ray_address} (ready in {time.monotonic() - t0:.1f} s; "
              "Ctrl-C stops)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _interrupt)      # SIGTERM takes the application down, as Ctrl-C does
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        with _quiet():
            try:
                if deployed:
                    serve.delete(APP)
                if local or ours:
                    serve.shutdown()
            except Exception as e:          # the cluster went first: nothing left to take down
                log.warning("stopping the Serve application: %s", _why(e))
            if actor is not None:
                ray.kill(actor)
            ray.shutdown()
    return 0


def _interrupt(*_):
    raise KeyboardInterrupt


class _quiet:
    """Ray Serve logs its progress at INFO on the driver; the CLI prints its own line."""

    def __enter__(self):
        self.logger = logging.getLogger("ray.serve")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)

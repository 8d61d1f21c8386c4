"""Which replica should serve a request: the affinity of a conversation, and the ranking of replicas.

A conversation's later turns are cheapest on the replica that served its earlier ones: its prompt's
KV prefix is in that engine's prefix cache (runtime/engine.py), and its stored responses are in that
replica's store. So the router (interop/ray_router.py) ranks replicas per request:

1. the replica that **owns** the response named by `previous_response_id` (or by the path of
   `GET/DELETE /v1/responses/{id}`), when it is alive: only it has that response;
2. else the replica that **rendezvous hashing** picks for the conversation's key (the caller's key,
   the model and the conversation's first turn up to its first user message, which every later
   turn repeats): the same replica every turn while the set of replicas is the same, and when a
   replica goes, only its conversations move;
3. the others, least loaded first, which also take over when the chosen one is `slack` requests
   busier than the least loaded (affinity is worth a cache hit, not a queue).

Pure functions of the request; nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import json

SLACK = 4           # ongoing requests a replica may be above the least loaded and still be preferred


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _first_turn(items) -> list:
    """The messages up to and including the first user message."""
    out = []
    for m in items if isinstance(items, list) else []:
        out.append(m)
        if isinstance(m, dict) and m.get("role") == "user":
            break
    return out


def request_affinity(method: str, path: str, authorization: str | None, body: bytes) -> dict:
    """{"response": id} when the request needs the replica that stored a response, {"key": hex} for
    a conversation to keep on one replica, {} when any replica will do; plus "stream": True when the
    body asks for a stream (the router then relays the answer as it comes). A body that is not JSON
    gets {}: the replica that takes it answers the 400."""
    if path.startswith("/v1/responses/") and method in ("GET", "DELETE"):
        return {"response": path.removeprefix("/v1/responses/")}
    if method != "POST" or path not in ("/v1/chat/completions", "/v1/responses"):
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict):
        return {}
    stream = {"stream": True} if doc.get("stream") is True else {}
    caller = hashlib.sha256((authorization or "").encode("utf-8", "surrogatepass")).hexdigest()
    if path == "/v1/chat/completions":
        return {"key": _digest(caller, doc.get("model"), _first_turn(doc.get("messages"))), **stream}
    if isinstance(doc.get("previous_response_id"), str):
        return {"response": doc["previous_response_id"], **stream}
    given = doc.get("input")
    first = given if isinstance(given, str) else _first_turn(given)
    return {"key": _digest(caller, doc.get("model"), doc.get("instructions"), first), **stream}


def _weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}/{replica}".encode()).digest()[:8], "big")


def rank(replicas: list[str], affinity: dict, owner: str | None, load: dict[str, int], slack: int = SLACK) -> list[list[str]]:
    """Replica ids in ranks, best first (a rank's members are equal: the router takes its least
    loaded). `owner`: the live replica holding the response the request names (None: none or gone).
    `load`: ongoing requests per replica, where known."""
    if not replicas:
        return []
    by_load = sorted(replicas, key=lambda r: load.get(r, 0))
    least = load.get(by_load[0], 0)
    preferred = None
    if owner in replicas:
        preferred = owner               # the only one with the response: never bypassed for load
    elif "key" in affinity:
        top = max(replicas, key=lambda r: _weight(affinity["key"], r))
        if load.get(top, 0) - least < slack:
            preferred = top
    if preferred is None:
        return [by_load]
    return [[preferred], [r for r in by_load if r != preferred]]

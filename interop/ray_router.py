"""Ray Serve's request router for the model replicas: conversation affinity (interop/affinity.py).

Serve calls `choose_replicas` for each request the router deployment (interop/scale.py) sends
through its handle, with the request's `affinity` keyword (its conversation key, and the live owner
of the response it names); it returns ranks of replicas, and Serve takes the least loaded replica
of the first rank that has room (`max_ongoing_requests`), else of the next. Loaded by Ray only.
"""

from __future__ import annotations

from ray.serve.request_router import RequestRouter

from isthmus.interop.affinity import rank


class AffinityRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        affinity = (pending_request.kwargs.get("affinity") if pending_request is not None else None) or {}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        load = {}
        for rid, r in by_id.items():
            q = self.replica_queue_len_cache.get(r.replica_id)
            if q is not None:
                load[rid] = q
        return [[by_id[i] for i in tier] for tier in rank(list(by_id), affinity, affinity.get("owner"), load)]

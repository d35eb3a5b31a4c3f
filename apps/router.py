"""The model deployments' request router: Serve's extension point (``RequestRouter``) running
``orch/routing.py``'s choice, set per model as ``routing`` (``least_loaded`` or ``prefix``).

A replica's load is Serve's count of its requests in flight (updated as requests are sent and end, and by
Serve's probes), else the engine's running + waiting the replica reports (``record_routing_stats``). The
router runs in the caller's process (a tap's gateway replica) and sees a request's arguments, so prefix
affinity needs the prompt to reach the model through a handle: Serve's HTTP proxy hands an ingress replica
the ASGI scope only, so a tap with ``routing: prefix`` runs its front as a deployment of its own
(``TapConfig.colocated``). Each gateway replica learns from what it routed; prefix hashes are stable across
processes, so all of them send a prefix nobody served to the same replica.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from orch.routing import ReplicaChoice


class OrchRouter(RequestRouter):
    """Least outstanding work, with prefix affinity when ``prefix`` is set."""

    def initialize_state(self, prefix: bool = False, **kwargs: Any) -> None:
        self.choice = ReplicaChoice(prefix=prefix, **kwargs)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        target = pending_request.kwargs.get("replica_id") if pending_request is not None else None
        if target:  # a call for one replica by its id (``stats(replica_id=...)``: tests, status)
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {i: self._load(r) for i, r in by_id.items()}
        ranks = self.choice.rank(loads, self._hashes(pending_request))
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.choice.served(self._hashes(pending_request), replica_id.unique_id)

    def _load(self, replica: RunningReplica) -> float:
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        if queued is not None:
            return float(queued)
        stats = replica.routing_stats or {}
        return float(stats.get("running", 0) + stats.get("waiting", 0))

    def _hashes(self, pending_request: PendingRequest | None) -> list[int]:
        if pending_request is None or pending_request.metadata.call_method != "generate" or not pending_request.args:
            return []
        return self.choice.hashes(pending_request.args[0])

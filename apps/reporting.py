"""A replica's gauges for ``/admin/metrics``: its engine's counts (a model replica) and its admission
queues' (a front), reported to the metrics hub every few seconds (``actors/metrics_hub.py``)."""

from __future__ import annotations

from typing import Any

from ray import serve

from actors.metrics_hub import start_reporting
from orch.metrics import ReplicaReport


def report_of(replica: Any) -> ReplicaReport:
    """What ``replica`` (a ModelHost, an OpenAIFront, or both) has to report now."""
    context = serve.get_replica_context()
    actor = getattr(replica, "_actor", None)
    model, engine = None, None
    if actor is not None:
        stats = actor.stats()
        model = actor.config.name
        engine = {"running": stats.running, "waiting": stats.waiting, "kv_cache_usage": stats.kv_cache_usage}
    queues = replica.admission_stats() if getattr(replica, "_queues", None) is not None else {}
    return ReplicaReport(
        context.app_name, context.deployment, context.replica_id.unique_id, model, engine, queues
    )  # fmt: skip


def keep_reporting(replica: Any) -> None:
    """Starts the replica's reports once (a tap replica hosts both an engine and a front)."""
    if getattr(replica, "_reporting", None) is None:
        replica._reporting = start_reporting(lambda: report_of(replica))

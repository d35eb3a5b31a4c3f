"""The metrics hub: every replica's latest gauges (its engine's and its admission queues'), for the one
``/admin/metrics`` scrape (``orch/metrics.py``).

Serve gives no way to call one chosen replica of a deployment routed by its default router, so replicas
push instead: each reports every :data:`REPORT_PERIOD_S` seconds (:func:`start_reporting`), and a replica
silent for three periods (stopped, or scaled down) is dropped. Counters never come from here: they come
from the ledger's committed usage rows, exact and restart-proof; the hub holds gauges only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from actors.ledger import HEAD_NODE_RESOURCE
from orch.metrics import HUB_NAME, HUB_NAMESPACE, ReplicaReport

log = logging.getLogger("ray.serve")

REPORT_PERIOD_S = 5.0


class MetricsHub:
    """The latest :class:`ReplicaReport` of each replica, for ``3 × period`` after it came.

    >>> hub = MetricsHub(period_s=5.0, clock=iter([0.0, 1.0, 16.0]).__next__)
    >>> hub.report(ReplicaReport("public", "gateway", "r1"))
    >>> [r.replica for r in hub.reports()]
    ['r1']
    >>> hub.reports()  # 16 s later: r1 went silent
    []
    """

    def __init__(self, period_s: float = REPORT_PERIOD_S, clock: Any = time.monotonic) -> None:
        self._ttl_s = 3 * period_s
        self._clock = clock
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}

    def report(self, report: ReplicaReport) -> None:
        self._reports[report.replica] = (self._clock(), report)

    def reports(self) -> list[ReplicaReport]:
        now = self._clock()
        for replica in [r for r, (at, _) in self._reports.items() if now - at > self._ttl_s]:
            del self._reports[replica]
        return [report for _, report in self._reports.values()]

    def ready(self) -> bool:
        return True


def metrics_hub() -> Any:
    """The hub's actor handle, creating it (detached, named, restarting, on the head node) if needed."""
    import ray

    actor_cls = ray.remote(MetricsHub).options(  # type: ignore[attr-defined]
        name=HUB_NAME,
        namespace=HUB_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        resources={HEAD_NODE_RESOURCE: 0.001},
        scheduling_strategy="DEFAULT",  # not a GPU group's placement group (see actors/ledger.py)
    )
    return actor_cls.remote()


def start_reporting(collect: Any, period_s: float = REPORT_PERIOD_S) -> asyncio.Task[None]:
    """Reports ``collect()`` (a :class:`ReplicaReport`) to the hub every ``period_s`` in a task of the
    replica's loop, until it is cancelled. A hub that is away costs a log line at debug level, never a
    request."""

    async def loop() -> None:
        hub: Any = None
        while True:
            try:
                hub = hub or await asyncio.to_thread(metrics_hub)  # a GCS lookup: never on the replica's loop
                await hub.report.remote(collect())
            except Exception as exc:  # the hub restarts; the next period tries again
                log.debug("metrics report failed: %s", exc)
                hub = None
            await asyncio.sleep(period_s)

    return asyncio.ensure_future(loop())

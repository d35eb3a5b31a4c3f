"""Prometheus metrics of the whole stack in one scrape: ``GET /admin/metrics`` (the admin key as a Bearer
token) on any tap's front. Names are ``llama_orch_*`` with their units, as Prometheus names them.

Where the numbers come from, so that one scrape covers every replica and is exact:

- Requests, tokens, micro-credits and the TTFT, inter-token and end-to-end latency histograms come from
  the usage rows each ledger shard commits (:class:`UsageMetrics`): every request that reached an engine,
  on any replica of any tap, counted once, when its row is durable. A shard seeds them from its file at
  start (:meth:`orch.store.Store.usage_metrics`), so they never go back across restarts.
- Open holds, held micro-credits and the commit latency: each ledger shard.
- Engines (running, waiting, KV cache use) and admission queues (running, waiting, by tenant): each replica
  reports them every few seconds to the metrics hub (``actors/metrics_hub.py``); a replica that stops
  reporting is dropped after three periods.

:func:`render` turns these snapshots into the text format.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HUB_NAME, HUB_NAMESPACE = "metrics-hub", "llama-orch"  # the actor replicas report to (actors/metrics_hub.py)

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# What each histogram observes of a usage row, in seconds, and of which rows: SQL over the usage table,
# as :func:`observed` computes it per row in Python.
HISTOGRAMS: dict[str, tuple[tuple[float, ...], str, str]] = {
    "ttft": (TTFT_BUCKETS_S, "ttft_ms::DOUBLE / 1000", "ttft_ms IS NOT NULL"),
    "itl": (
        ITL_BUCKETS_S,
        "(latency_ms - ttft_ms)::DOUBLE / 1000 / (completion_tokens - 1)",
        "ttft_ms IS NOT NULL AND completion_tokens > 1",
    ),  # fmt: skip
    "latency": (LATENCY_BUCKETS_S, "latency_ms::DOUBLE / 1000", "TRUE"),
}


@dataclass
class Histogram:
    """Observations per bucket (not cumulative; the last bucket is +Inf) and their sum.

    >>> h = Histogram((0.1, 1.0))
    >>> for v in (0.05, 0.1, 0.5, 7.0):
    ...     h.observe(v)
    >>> h.counts, h.sum
    ([2, 1, 1], 7.65)
    """

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bucket_of(self.bounds, value)] += 1
        self.sum += value

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum


def _codes(column: Any) -> tuple[list[str], np.ndarray]:
    """The distinct values of a string column and each row's index into them."""
    encoded = pc.dictionary_encode(column)
    encoded = encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy()


def _sums(codes: np.ndarray, n: int, column: Any) -> list[int]:
    """Σ of an integer column per code, exactly (int64)."""
    sums = np.zeros(n, np.int64)
    np.add.at(sums, codes, column.to_numpy().astype(np.int64))
    return [int(v) for v in sums]


def bucket_of(bounds: Sequence[float], value: float) -> int:
    """The index of the first bucket whose upper bound is ≥ ``value`` (Prometheus's ``le``)."""
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)


def observed(row: Any) -> dict[str, float | None]:
    """What each histogram observes of one usage row, in seconds (None: not observed), as :data:`HISTOGRAMS`
    computes it in SQL: inter-token latency only for rows with a first token and at least two tokens."""
    ttft = row.ttft_ms / 1000.0 if row.ttft_ms is not None else None
    itl = None
    if row.ttft_ms is not None and row.completion_tokens > 1:
        itl = (row.latency_ms - row.ttft_ms) / 1000.0 / (row.completion_tokens - 1)
    return {"ttft": ttft, "itl": itl, "latency": row.latency_ms / 1000.0}


@dataclass
class UsageMetrics:
    """Counters and histograms of committed usage rows, by (tap, model[, status]) and by tenant.

    >>> from datetime import UTC, datetime
    >>> from orch.store import UsageRow
    >>> m = UsageMetrics()
    >>> m.add(UsageRow("r1", datetime.now(UTC), "t-1", None, "public", "m", 10, 5, 700, 30, 130, "ok", "stop"))
    >>> m.requests[("public", "m", "ok")], m.completion_tokens[("public", "m")], m.micro_credits["t-1"]
    (1, 5, 700)
    >>> m.histograms["itl"][("public", "m")].sum  # (130 - 30) ms over 4 tokens after the first
    0.025
    """

    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    prompt_tokens: Counter[tuple[str, str]] = field(default_factory=Counter)
    completion_tokens: Counter[tuple[str, str]] = field(default_factory=Counter)
    micro_credits: Counter[str] = field(default_factory=Counter)  # settled, per tenant
    histograms: dict[str, dict[tuple[str, str], Histogram]] = field(default_factory=lambda: {k: {} for k in HISTOGRAMS})

    def add(self, row: Any) -> None:
        where = (row.tap, row.model)
        self.requests[(*where, str(row.status))] += 1
        self.prompt_tokens[where] += row.prompt_tokens
        self.completion_tokens[where] += row.completion_tokens
        self.micro_credits[row.tenant_id] += row.cost_micro
        for name, value in observed(row).items():
            if value is not None:
                self._histogram(name, where).observe(value)

    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        """:meth:`add` of each row of a batch of usage rows (:func:`orch.usage_log.to_arrow`), vectorised: the
        ledger's writer takes gateways' batches at hundreds of thousands of rows a second."""
        if not batch.num_rows:
            return
        table = (batch if isinstance(batch, pa.Table) else pa.table(batch)).combine_chunks()  # then one chunk each
        wheres, group = _codes(pc.binary_join_element_wise(table["tap"], table["model"], "\x00"))
        where_of = [(tap, model) for tap, model in (w.split("\x00", 1) for w in wheres)]
        statuses, status = _codes(table["status"])
        requests = np.bincount(group * len(statuses) + status, minlength=len(wheres) * len(statuses))
        for i, n in enumerate(requests.tolist()):
            if n:
                self.requests[(*where_of[i // len(statuses)], statuses[i % len(statuses)])] += n
        for counter, column in ((self.prompt_tokens, "prompt_tokens"), (self.completion_tokens, "completion_tokens")):
            for where, n in zip(where_of, _sums(group, len(wheres), table[column]), strict=True):
                counter[where] += n
        tenants, tenant = _codes(table["tenant_id"])
        for tenant_id, n in zip(tenants, _sums(tenant, len(tenants), table["cost_micro"]), strict=True):
            self.micro_credits[tenant_id] += n
        ttft = table["ttft_ms"].to_numpy().astype(np.float64)  # NaN where NULL
        latency, tokens = table["latency_ms"].to_numpy().astype(np.float64), table["completion_tokens"].to_numpy()
        has_first = ~np.isnan(ttft)
        values = {
            "ttft": (ttft / 1000.0, has_first),
            "itl": ((latency - ttft) / 1000.0 / np.maximum(tokens - 1, 1), has_first & (tokens > 1)),
            "latency": (latency / 1000.0, np.ones(len(group), bool)),
        }
        for name, (value, seen) in values.items():
            bounds = HISTOGRAMS[name][0]
            buckets = len(bounds) + 1
            at = group[seen] * buckets + np.searchsorted(bounds, value[seen], side="left")
            counts = np.bincount(at, minlength=len(wheres) * buckets).reshape(len(wheres), buckets)
            sums = np.bincount(group[seen], weights=value[seen], minlength=len(wheres))
            for i, where in enumerate(where_of):
                if counts[i].any():
                    h = self._histogram(name, where)
                    h.counts = [a + b for a, b in zip(h.counts, counts[i].tolist(), strict=True)]
                    h.sum += float(sums[i])

    def _histogram(self, name: str, where: tuple[str, str]) -> Histogram:
        found = self.histograms[name].get(where)
        if found is None:
            found = self.histograms[name][where] = Histogram(HISTOGRAMS[name][0])
        return found

    def merge(self, other: UsageMetrics) -> None:
        """Adds another shard's metrics to these."""
        self.requests.update(other.requests)
        self.prompt_tokens.update(other.prompt_tokens)
        self.completion_tokens.update(other.completion_tokens)
        self.micro_credits.update(other.micro_credits)
        for name, by_where in other.histograms.items():
            for where, h in by_where.items():
                self._histogram(name, where).merge(h)


@dataclass
class LedgerGauges:
    """One ledger shard's state besides usage: open holds (credit leases among them) and commit latency."""

    shard: int
    open_holds: int
    open_leases: int
    held_micro_credits: int
    commit_seconds: Histogram


@dataclass
class ReplicaReport:
    """What one replica reported to the hub: its engine's counts and its admission queues'."""

    app: str
    deployment: str
    replica: str
    model: str | None = None  # the engine's model, if the replica hosts one
    engine: dict[str, float] | None = None  # running, waiting, kv_cache_usage
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> running, waiting, queued by tenant


def render(usage: UsageMetrics, ledgers: Iterable[LedgerGauges], replicas: Iterable[ReplicaReport]) -> str:
    """The Prometheus text exposition of everything above.

    >>> usage = UsageMetrics()
    >>> print(render(usage, [], [ReplicaReport("public", "gateway", "r1", queues={"m": {"running": 2,
    ...       "waiting": 1, "queued": {"t-1": 1}}})]).splitlines()[-1])
    llama_orch_queue_waiting_by_tenant{app="public",model="m",tenant="t-1"} 1.0
    """
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            out.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")

    def histogram(name: str, help_: str, by: Iterable[tuple[dict[str, str], Histogram]]) -> None:
        samples: list[tuple[str, dict[str, str], float]] = []
        for labels, h in by:
            running = 0
            for bound, count in zip((*h.bounds, math.inf), h.counts, strict=True):
                running += count
                samples.append(("_bucket", labels | {"le": _number(bound)}, running))
            samples += [("_sum", labels, h.sum), ("_count", labels, running)]
        family(name, "histogram", help_, samples)

    def tm(where: tuple[str, str]) -> dict[str, str]:
        return {"tap": where[0], "model": where[1]}

    requests = sorted(usage.requests.items())
    family("llama_orch_requests_total", "counter", "Requests that reached an engine, by how they ended.",
           (("", tm((tap, model)) | {"status": status}, n) for (tap, model, status), n in requests))  # fmt: skip
    family("llama_orch_prompt_tokens_total", "counter", "Prompt tokens the engines counted.",
           (("", tm(w), n) for w, n in sorted(usage.prompt_tokens.items())))  # fmt: skip
    family("llama_orch_completion_tokens_total", "counter", "Completion tokens the engines generated.",
           (("", tm(w), n) for w, n in sorted(usage.completion_tokens.items())))  # fmt: skip
    family("llama_orch_settled_micro_credits_total", "counter", "Micro-credits settled (debited), per tenant.",
           (("", {"tenant": t}, n) for t, n in sorted(usage.micro_credits.items())))  # fmt: skip
    for name, help_ in (
        ("ttft", "Time to first token, from arrival at the front (the admission queue included)."),
        ("itl", "Inter-token latency: each request's mean time between tokens after its first."),
        ("latency", "End-to-end request latency, from arrival at the front to the last token."),
    ):
        metric = {"ttft": "time_to_first_token", "itl": "inter_token_latency", "latency": "request_duration"}[name]
        histogram(
            f"llama_orch_{metric}_seconds", help_, ((tm(w), h) for w, h in sorted(usage.histograms[name].items()))
        )

    ledgers = sorted(ledgers, key=lambda g: g.shard)
    family("llama_orch_open_holds", "gauge", "Holds open in the ledger (credit leases among them).",
           (("", {"shard": str(g.shard)}, g.open_holds) for g in ledgers))  # fmt: skip
    family("llama_orch_open_leases", "gauge", "Credit leases open in the ledger.",
           (("", {"shard": str(g.shard)}, g.open_leases) for g in ledgers))  # fmt: skip
    family("llama_orch_held_micro_credits", "gauge", "Micro-credits reserved by open holds and leases.",
           (("", {"shard": str(g.shard)}, g.held_micro_credits) for g in ledgers))  # fmt: skip
    histogram("llama_orch_ledger_commit_seconds", "Group commits of the ledger to its file (since the shard started).",
              (({"shard": str(g.shard)}, g.commit_seconds) for g in ledgers))  # fmt: skip

    replicas = sorted(replicas, key=lambda r: (r.app, r.deployment, r.replica))
    engines = [r for r in replicas if r.engine is not None]
    for key, help_ in (
        ("running", "Sequences in the engine's running batch."),
        ("waiting", "Sequences waiting in the engine's own scheduler."),
        ("kv_cache_usage", "Fraction of the engine's KV cache in use (0 to 1)."),
    ):
        name = "llama_orch_engine_kv_cache_usage_ratio" if key == "kv_cache_usage" else f"llama_orch_engine_{key}"
        family(name, "gauge", help_, (("", {"app": r.app, "model": r.model or "", "replica": r.replica},
                                       (r.engine or {}).get(key, 0.0)) for r in engines))  # fmt: skip
    queues = [(r, model, q) for r in replicas for model, q in sorted(r.queues.items())]
    family("llama_orch_queue_running", "gauge", "Requests admitted to the engine by the front's gate.",
           (("", {"app": r.app, "model": m, "replica": r.replica}, q["running"]) for r, m, q in queues))  # fmt: skip
    family("llama_orch_queue_waiting", "gauge", "Requests waiting at the front's gate (admission queue depth).",
           (("", {"app": r.app, "model": m, "replica": r.replica}, q["waiting"]) for r, m, q in queues))  # fmt: skip
    by_tenant: Counter[tuple[str, str, str]] = Counter()
    for r, m, q in queues:
        for tenant, n in q.get("queued", {}).items():
            by_tenant[(r.app, m, tenant)] += n
    family("llama_orch_queue_waiting_by_tenant", "gauge", "Requests waiting at the gates, per tenant (all replicas).",
           (("", {"app": a, "model": m, "tenant": t}, n) for (a, m, t), n in sorted(by_tenant.items())))  # fmt: skip
    return "\n".join(out) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value))

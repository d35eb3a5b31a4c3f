"""``GET /admin/metrics`` on the session's real stack: one scrape covers every replica, and its counters
are exact: N requests add exactly N, and the token and credit counters equal the usage rows' sums. The
scrape is parsed with prometheus_client's own parser (a malformed exposition fails here)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MODEL, TAP_REPLICAS, Stack
from tests.integration.test_tap_billing import new_tenant, usage

pytestmark = pytest.mark.integration

N = 5
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(stack: Stack, headers: dict[str, str] | None = None) -> Samples:
    resp = httpx.get(stack.base_url + "/admin/metrics", headers=headers or stack.admin_headers, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


def rows_of(stack: Stack, tenant: str, n: int) -> list[dict[str, Any]]:
    """The tenant's usage rows, once all ``n`` are committed (a lease's batch commits a moment later)."""
    deadline = time.monotonic() + 60
    while True:
        rows: list[dict[str, Any]] = usage(stack, tenant)["data"]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def running_replicas(app: str, deployment: str) -> set[str]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app]["deployments"][deployment]["replicas"]
    return {r["replica_id"] for r in replicas if r["state"] == "RUNNING"}


def test_one_scrape_counts_every_request_exactly_and_shows_every_replica(stack: Stack, ray_driver: None) -> None:
    tenant, key = new_tenant(stack, 10**9)
    before = scrape(stack)
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        for i in range(N):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8,
                    "stream": i % 2 == 1}  # fmt: skip
            resp = client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
    rows = rows_of(stack, tenant, N)
    assert len(rows) == N, rows
    after = scrape(stack)

    (tap,) = {r["tap"] for r in rows}
    where = {"tap": tap, "model": MODEL}
    delta = {
        name: value(after, name, **where, **extra) - value(before, name, **where, **extra)
        for name, extra in (
            ("llama_orch_requests_total", {"status": "ok"}),
            ("llama_orch_prompt_tokens_total", {}),
            ("llama_orch_completion_tokens_total", {}),
            ("llama_orch_time_to_first_token_seconds_count", {}),
            ("llama_orch_request_duration_seconds_count", {}),
        )
    }
    assert delta["llama_orch_requests_total"] == N, delta
    assert delta["llama_orch_time_to_first_token_seconds_count"] == N, delta
    assert delta["llama_orch_request_duration_seconds_count"] == N, delta
    assert delta["llama_orch_prompt_tokens_total"] == sum(r["prompt_tokens"] for r in rows), (delta, rows)
    assert delta["llama_orch_completion_tokens_total"] == sum(r["completion_tokens"] for r in rows), (delta, rows)
    spent = sum(r["cost_micro"] for r in rows)
    assert spent > 0 and value(after, "llama_orch_settled_micro_credits_total", tenant=tenant) == spent

    # Every running replica of the public tap reported: its engine and its front's queue (the front runs
    # inside it). A replica killed in an earlier test may still show for its last 15 s.
    running = running_replicas("public", f"model-{MODEL}")
    assert len(running) == TAP_REPLICAS, running
    engines = [s for s in labelled(after, "llama_orch_engine_running") if s["model"] == MODEL]
    queues = [s for s in labelled(after, "llama_orch_queue_waiting") if s["model"] == MODEL]
    assert running <= {s["replica"] for s in engines} and running <= {s["replica"] for s in queues}, (engines, queues)
    assert 0.0 <= value(after, "llama_orch_engine_kv_cache_usage_ratio", **engines[0]) <= 1.0
    assert labelled(after, "llama_orch_open_holds") == [{"shard": "0"}]
    assert value(after, "llama_orch_ledger_commit_seconds_count", shard="0") > 0


def test_metrics_are_for_the_admin_only(stack: Stack) -> None:
    _, key = new_tenant(stack, 0)
    resp = httpx.get(stack.base_url + "/admin/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "wrong_key_kind", resp.text

"""Fair share under saturation, on vs off in one test (issue 11's acceptance): two private taps of the tiny
Llama that differ only in ``admission.fair_share``. Tenant A keeps 4x the engine's admission capacity in
flight, so a queue of ~3x forms; tenant B sends 4 sequential streamed requests, five times over (a median
of 20: on 2 busy cores single TTFTs swing between 20 and 270 ms).

What makes it stable on 2 cores (an earlier version swung 20x, 2.3x, 0.9x between runs):

- B sends only once the gate itself reports at least 2 batches of A's requests waiting (its ``admission_stats()``,
  read through a Serve handle). The flood reaches the gate through Serve's proxy unevenly; without this
  check B sometimes met no queue at all.
- A's requests ask for random lengths (seeded), so their ends spread out and a place frees every few
  engine steps. Equal lengths keep the batch in lockstep: every place frees at once, a batch apart.
- TTFTs are the gateway's own (each usage row's ``ttft_ms``, from arrival at the front to the first token).
  They count the gate's queue and the engine, not the proxy's delays on a loaded 2-core machine. The
  client's TTFTs are shown beside them when an assertion fails.

The fair tap keeps one place of its batch of 8 for a tenant with nothing running (``admission.reserve: 1``;
the default reserves 1 per 64). Without it B waited for the next place to free, ~1.5 engine steps here,
as long as the engine-bound TTFT itself on this tiny model: the ratio below came out 1.78x to 2.44x.

Asserted, with fair share: B's median TTFT is within 2x of the engine-bound TTFT at full batch (A's
requests while A keeps the engine full and nobody queues), and at least 5x lower than without fair share
(measured 10x to 15x); and the orders: how many of A's queued requests were admitted while each of B's
waited (rows' ``ts``, the admission time, against when B's request was sent): with fair share fewer than
one batch (B takes the reserved place), without it at least one batch (measured 14 to 24)."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_private_tap import ENGINE, TINY, tap, tiny  # noqa: F401  (tiny: a fixture)
from tests.integration.test_tap_billing import admin, usage

pytestmark = pytest.mark.integration

RUNNING = 8  # the engine's batch (ENGINE's max_num_seqs) and the admission capacity
TOKENS = (4, 20)  # each of A's requests asks for a length in this range: a place frees every ~1.5 engine steps
LIGHT = 5 * 4  # B's sequential requests: the 4, five times over, for a median that 2 busy cores don't move
QUEUED = 2 * RUNNING  # B sends once at least this many of A's requests wait at the gate
FAIR, FIFO = "fair", "fifo"


@pytest.fixture(scope="module")
def taps(stack: Stack, tiny: Path, ray_driver: None) -> Iterator[dict[str, str]]:  # noqa: F811
    try:
        for client, fair in ((FAIR, True), (FIFO, False)):
            admission = {"max_running": RUNNING, "max_queue": 8 * RUNNING, "fair_share": fair, "reserve": 1}
            done = tap(stack, "create", client, "--model", str(tiny), "--gpus", "1", *ENGINE,
                       "--set", f"admission={json.dumps(admission)}")  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
        yield {c: f"{stack.base_url}/private/{c}/v1/chat/completions" for c in (FAIR, FIFO)}
    finally:
        for client in (FAIR, FIFO):
            tap(stack, "delete", client, timeout=300)


def _tenant(stack: Stack, client: str) -> tuple[str, str]:
    tenant_id = admin(stack, "POST", "/admin/tenants", {"name": f"{client}-{time.monotonic_ns() % 10**7}"})["tenant_id"]
    key: str = admin(stack, "POST", f"/admin/tenants/{tenant_id}/keys", {"tap": f"private-{client}"})["key"]
    return tenant_id, key


class Gate:
    """The tap's admission queue as its (one, colocated) replica reports it."""

    def __init__(self, client: str) -> None:
        from ray import serve

        self._handle = serve.get_deployment_handle(f"model-{TINY}", app_name=f"private-{client}")

    def _stats(self) -> dict[str, Any]:
        admission: dict[str, Any] = self._handle.admission_stats.remote().result(timeout_s=30)  # no engine stats
        return admission

    def _queued(self, tenant: str) -> int:
        return sum(q["queued"].get(tenant, 0) for q in self._stats().values())

    def warm(self) -> Gate:
        """One call first: a new handle takes seconds to learn its replicas, longer than a flood lasts."""
        self._stats()
        return self

    async def wait_for_running(self, at_least: int, timeout_s: float = 60) -> int:
        """Waits until the gate runs ``at_least`` requests; returns how many it runs."""
        deadline = time.monotonic() + timeout_s
        while True:
            running = sum(q["running"] for q in (await asyncio.to_thread(self._stats)).values())
            if running >= at_least or time.monotonic() > deadline:
                return running
            await asyncio.sleep(0.02)

    async def wait_for_queue(self, tenant: str, at_least: int, timeout_s: float = 60) -> int:
        """Waits until ``tenant`` has ``at_least`` requests waiting; returns how many it has."""
        deadline = time.monotonic() + timeout_s
        while True:
            queued = await asyncio.to_thread(self._queued, tenant)
            if queued >= at_least or time.monotonic() > deadline:
                return queued
            await asyncio.sleep(0.05)


async def _ttft(client: httpx.AsyncClient, url: str, key: str, label: str) -> tuple[datetime, float]:
    """(when it was sent, its TTFT at the client in seconds)."""
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "ignore_eos": True, "stream": True, "user": label}  # fmt: skip
    sent, start, first = datetime.now(UTC), time.monotonic(), None
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic() - start
    assert first is not None
    return sent, first


async def _scenario(
    url: str, a: tuple[str, str], key_b: str, flood: int, label: str, gate: Gate | None = None
) -> tuple[list[tuple[datetime, float]], list[int]]:
    """A keeps ``flood`` requests in flight while B sends :data:`LIGHT` requests one after the other; with
    ``gate``, each of B's waits until A has :data:`QUEUED` requests queued there. B's (sent, TTFT at the client) and the
    queue B met each time. Their usage rows say ``user`` a-<label> and b-<label>."""
    (tenant_a, key_a), lengths = a, random.Random(f"{label}-{url}")
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=flood + 4)) as client:

        async def one_of_a() -> None:
            while not stop.is_set():
                body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True,
                        "max_tokens": lengths.randint(*TOKENS), "user": f"a-{label}"}  # fmt: skip
                resp = await client.post(url, json=body, headers={"Authorization": f"Bearer {key_a}"})
                assert resp.status_code == 200, resp.text

        workers = [asyncio.ensure_future(one_of_a()) for _ in range(flood)]
        await asyncio.sleep(2.0)  # the flood is up
        b_ttft, met = [], []
        for _ in range(LIGHT):
            met.append(await gate.wait_for_queue(tenant_a, QUEUED) if gate is not None else 0)
            b_ttft.append(await _ttft(client, url, key_b, f"b-{label}"))
        stop.set()
        await asyncio.gather(*workers)
    return b_ttft, met


def _rows(stack: Stack, tenant_id: str, at_least: int = 1) -> list[dict[str, Any]]:
    """The tenant's usage rows (the latest 1000), in admission order (a row is written just after its
    response; its ``ts`` is when the request was admitted, after its wait)."""
    deadline = time.monotonic() + 10
    while True:
        found: list[dict[str, Any]] = usage(stack, tenant_id)["data"]
        if len(found) >= at_least or time.monotonic() > deadline:
            return sorted(found, key=lambda r: r["ts"])
        time.sleep(0.2)


def _admitted_between(stack: Stack, tenant_id: str, since: datetime, until: str) -> int:
    """How many of the tenant's requests were admitted in ``[since, until)``: the report's totals, which
    count every row (a flood writes more rows than one page holds)."""
    query = urllib.parse.urlencode({"since": since.isoformat(), "until": until})
    return int(admin(stack, "GET", f"/admin/tenants/{tenant_id}/usage?{query}")["totals"]["requests"])


def test_a_light_tenant_skips_a_floods_queue_only_with_fair_share(stack: Stack, taps: dict[str, str]) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for client in (FAIR, FIFO):
        url, gate = taps[client], Gate(client)
        # A tenant A per scenario, so that each one's rows are its own; B is one tenant throughout.
        a_warm, a_full, a_flood, (b, key_b) = (_tenant(stack, client) for _ in range(4))
        asyncio.run(_scenario(url, a_warm, key_b, 2, "warm"))
        b_full, _ = asyncio.run(_scenario(url, a_full, key_b, RUNNING - 1, "full"))  # engine full, none queued
        b_flood, met = asyncio.run(_scenario(url, a_flood, key_b, 4 * RUNNING, "flood", gate))  # a queue of ~3x
        unqueued = _rows(stack, a_full[0])
        light = [r for r in _rows(stack, b, 3 * LIGHT) if r["end_user"] == "b-flood"]
        assert len(light) == LIGHT and unqueued, (unqueued, light)
        # How many of A's queued requests were admitted while each of B's waited (sent, then admitted).
        ahead = [
            _admitted_between(stack, a_flood[0], sent, row["ts"]) for (sent, _), row in zip(b_flood, light, strict=True)
        ]
        seen[client] = {
            "queue_b_met": met,
            "engine_bound_ttft_ms": statistics.median(r["ttft_ms"] for r in unqueued),
            "light_ttft_ms": statistics.median(r["ttft_ms"] for r in light),
            "light_ttfts_ms": [r["ttft_ms"] for r in light],
            "a_admitted_ahead_of_b": statistics.median(ahead),
            "client_full_ttft_ms": round(statistics.median(t for _, t in b_full) * 1000, 1),
            "client_light_ttft_ms": round(statistics.median(t for _, t in b_flood) * 1000, 1),
        }
    print("fair share on vs off:", json.dumps(seen))
    ratio = seen[FAIR]["light_ttft_ms"] / seen[FAIR]["engine_bound_ttft_ms"]
    print(f"B with fair share vs the engine-bound TTFT: {ratio:.2f}x (the issue's goal: <= 2x)")
    fair, fifo = seen[FAIR], seen[FIFO]
    assert ratio <= 2, seen
    assert min(fair["queue_b_met"] + fifo["queue_b_met"]) >= QUEUED, seen  # the queue existed each time B sent
    assert fair["a_admitted_ahead_of_b"] <= RUNNING, seen  # B takes one of the next free places
    # First come first served: behind A's queue (a few of those B met may start before B reaches the gate).
    assert fifo["a_admitted_ahead_of_b"] >= RUNNING, seen
    assert fifo["light_ttft_ms"] >= 5 * fair["light_ttft_ms"], seen

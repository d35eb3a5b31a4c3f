"""Fair share under saturation, on vs off in one test: two private taps of the tiny Llama that differ only
in ``admission.fair_share``. Tenant A keeps 4x the engine's admission capacity in flight (a queue of 3x
forms; A's requests are not streamed) while tenant B sends 4 sequential streamed requests.

Asserted: with fair share, at most one batch of A's requests is admitted while one of B's waits (measured:
2.5); without it, at least 1.5 batches are (measured: 20 of A's queue of 24); and B's TTFT is at least
twice as long without fair share (measured: 20x and 2.3x in two runs). The order comes from each usage
row's ``ts`` (when the request was admitted) against when the client sent B's request; TTFTs are the rows'
own ``ttft_ms`` (from arrival at the front). The engine-bound TTFT at full batch (A's requests while A keeps
the engine full and nobody queues) and the TTFTs at the client are measured beside them and shown when an
assertion fails. Ratios and orders only, never absolute times."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
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
TOKENS = 48  # each of A's requests: the queue's wait is ~3 x 48 engine steps, a free place's ~48 / 8
FAIR, FIFO = "fair", "fifo"


@pytest.fixture(scope="module")
def taps(stack: Stack, tiny: Path) -> Iterator[dict[str, str]]:  # noqa: F811
    try:
        for client, fair in ((FAIR, True), (FIFO, False)):
            admission = {"max_running": RUNNING, "max_queue": 8 * RUNNING, "fair_share": fair}
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


async def _ttft(client: httpx.AsyncClient, url: str, key: str, tokens: int, label: str) -> tuple[datetime, float]:
    """(when it was sent, its TTFT at the client in seconds)."""
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True, "user": label}  # fmt: skip
    sent, start, first = datetime.now(UTC), time.monotonic(), None
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic() - start
    assert first is not None
    return sent, first


async def _scenario(url: str, key_a: str, key_b: str, flood: int, label: str) -> list[tuple[datetime, float]]:
    """A keeps ``flood`` requests in flight while B sends 4 requests one after the other: B's TTFTs at the
    client. Their usage rows say ``user`` a-<label> and b-<label>."""
    stop = asyncio.Event()
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": TOKENS, "ignore_eos": True,
            "user": f"a-{label}"}  # fmt: skip
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=flood + 4)) as client:

        async def one_of_a() -> None:
            while not stop.is_set():
                resp = await client.post(url, json=body, headers={"Authorization": f"Bearer {key_a}"})
                assert resp.status_code == 200, resp.text

        workers = [asyncio.ensure_future(one_of_a()) for _ in range(flood)]
        await asyncio.sleep(2.0)  # the flood is up, and its queue formed
        b_ttft = [await _ttft(client, url, key_b, 4, f"b-{label}") for _ in range(4)]
        stop.set()
        await asyncio.gather(*workers)
    return b_ttft


def _rows(stack: Stack, tenant_id: str, label: str, at_least: int = 1) -> list[dict[str, Any]]:
    """The tenant's usage rows labelled ``label``, in admission order (a row is written just after its
    response; its ``ts`` is when the request was admitted, after its wait)."""
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in usage(stack, tenant_id)["data"] if r["end_user"] == label]
        if len(found) >= at_least or time.monotonic() > deadline:
            return sorted(found, key=lambda r: r["ts"])
        time.sleep(0.2)


def _at(row: dict[str, Any]) -> datetime:
    at = datetime.fromisoformat(row["ts"])
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def test_a_light_tenant_skips_a_floods_queue_only_with_fair_share(stack: Stack, taps: dict[str, str]) -> None:
    seen: dict[str, dict[str, float]] = {}
    for client in (FAIR, FIFO):
        (a, key_a), (b, key_b) = _tenant(stack, client), _tenant(stack, client)
        asyncio.run(_scenario(taps[client], key_a, key_b, 2, "warm"))
        full = asyncio.run(_scenario(taps[client], key_a, key_b, RUNNING - 1, "full"))  # engine full, none queued
        flood = asyncio.run(_scenario(taps[client], key_a, key_b, 4 * RUNNING, "flood"))  # a queue of 3 x RUNNING
        unqueued, light, a_flood = _rows(stack, a, "a-full"), _rows(stack, b, "b-flood", 4), _rows(stack, a, "a-flood")
        assert len(light) == 4 and unqueued, (unqueued, light)
        # How many of A's queued requests were admitted while each of B's waited (sent, then admitted).
        ahead = [sum(sent <= _at(r) < _at(row) for r in a_flood) for (sent, _), row in zip(flood, light, strict=True)]
        seen[client] = {
            "engine_bound_ttft_ms": statistics.median(r["ttft_ms"] for r in unqueued),  # at the front, as below
            "light_ttft_ms": statistics.median(r["ttft_ms"] for r in light),
            "a_admitted_ahead_of_b": statistics.median(ahead),
            "client_full_ttft_ms": round(statistics.median(t for _, t in full) * 1000, 1),
            "client_light_ttft_ms": round(statistics.median(t for _, t in flood) * 1000, 1),
        }
    fair, fifo = seen[FAIR], seen[FIFO]
    assert fair["a_admitted_ahead_of_b"] <= RUNNING, seen  # B takes one of the next free places
    assert fifo["a_admitted_ahead_of_b"] >= 1.5 * RUNNING, seen  # first come first served: behind A's queue
    assert fifo["light_ttft_ms"] >= 2 * fair["light_ttft_ms"], seen

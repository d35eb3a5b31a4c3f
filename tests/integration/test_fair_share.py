"""Fair share under saturation, on vs off in one test: two private taps of the tiny Llama that differ only
in ``admission.fair_share``. Tenant A keeps 4x the engine's admission capacity in flight (a queue of 3x
forms) while tenant B sends 4 sequential requests. A 2-core CPU slows every step of a full batch, so B's
TTFT is compared with like: the TTFT of A's requests when the engine is full but nobody queues. Ratios and
orders only, never absolute times."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_private_tap import ENGINE, TINY, tap, tiny  # noqa: F401  (tiny: a fixture)
from tests.integration.test_tap_billing import admin

pytestmark = pytest.mark.integration

RUNNING = 8  # the engine's batch (ENGINE's max_num_seqs) and the admission capacity
TOKENS = 32  # each of A's requests
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


def _key(stack: Stack, client: str) -> str:
    tenant_id = admin(stack, "POST", "/admin/tenants", {"name": f"{client}-{time.monotonic_ns() % 10**7}"})["tenant_id"]
    key: str = admin(stack, "POST", f"/admin/tenants/{tenant_id}/keys", {"tap": f"private-{client}"})["key"]
    return key


async def _ttft(client: httpx.AsyncClient, url: str, key: str, tokens: int) -> float:
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True}  # fmt: skip
    start, first = time.monotonic(), None
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic() - start
    assert first is not None
    return first


async def _scenario(url: str, key_a: str, key_b: str, streams: int) -> tuple[list[float], list[float]]:
    """A keeps ``streams`` in flight while B sends 4 requests one after the other: (A's TTFTs, B's)."""
    stop, a_ttft = asyncio.Event(), []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=streams + 4)) as client:

        async def flood() -> None:
            while not stop.is_set():
                a_ttft.append(await _ttft(client, url, key_a, TOKENS))

        workers = [asyncio.ensure_future(flood()) for _ in range(streams)]
        await asyncio.sleep(2.0)  # the flood is up, and its queue formed
        a_ttft.clear()
        b_ttft = [await _ttft(client, url, key_b, 4) for _ in range(4)]
        stop.set()
        await asyncio.gather(*workers)
    return a_ttft, b_ttft


def test_a_light_tenant_skips_a_floods_queue_only_with_fair_share(stack: Stack, taps: dict[str, str]) -> None:
    median = {}
    for client in (FAIR, FIFO):
        key_a, key_b = _key(stack, client), _key(stack, client)
        asyncio.run(_scenario(taps[client], key_a, key_b, 2))  # warm-up
        full, _ = asyncio.run(_scenario(taps[client], key_a, key_b, RUNNING - 1))  # engine full, nobody queued
        _, light = asyncio.run(_scenario(taps[client], key_a, key_b, 4 * RUNNING))  # a queue of 3 x RUNNING
        median[client] = {"engine_bound": statistics.median(full), "light": statistics.median(light)}
    fair, fifo = median[FAIR], median[FIFO]
    assert fair["light"] <= 2 * fair["engine_bound"], median  # B waits about as long as an unqueued request
    assert fifo["light"] >= 5 * fair["light"], median  # without fair share B waits behind A's queue

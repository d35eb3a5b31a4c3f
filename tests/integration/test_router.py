"""The router on private taps of the tiny Llama with two model replicas each: prefix affinity against Serve's
default choice (the replicas' own counters say where each request ran and what their prefix caches hit),
and rate limits counted across two gateway replicas (exact: 10 of 30 with an RPM limit of 10), with
OpenAI's ``x-ratelimit-*`` headers, ``Retry-After`` and the official client's ``RateLimitError``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_private_tap import ENGINE, TINY, tap, tiny  # noqa: F401  (tiny: a fixture)
from tests.integration.test_tap_billing import admin

pytestmark = pytest.mark.integration

TWO = ["--min", "2", "--max", "2", "--set", "num_cpus=0.25"]  # two replicas; 8 logical CPUs hold both taps
ROUTED, PLAIN = "routed", "plain"
WORDS = "the river runs past old stone walls where lanterns hang and quiet boats drift".split()


def _create(stack: Stack, tiny: Path, client: str, *extra: str) -> None:  # noqa: F811
    done = tap(stack, "create", client, "--model", str(tiny), "--gpus", "1", *TWO, *ENGINE, *extra)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def taps(stack: Stack, tiny: Path) -> Iterator[dict[str, str]]:  # noqa: F811
    """``routed``: prefix routing, two gateway replicas; ``plain``: Serve's default choice behind a gateway."""
    try:
        _create(stack, tiny, ROUTED, "--set", "routing=prefix", "--set", "gateway_replicas=2")
        _create(stack, tiny, PLAIN, "--separate-gateway")
        yield {name: f"{stack.base_url}/private/{name}/v1" for name in (ROUTED, PLAIN)}
    finally:
        for name in (ROUTED, PLAIN):
            tap(stack, "delete", name, timeout=300)


def _key(stack: Stack, client: str, **policy: Any) -> tuple[str, str]:
    tenant_id = admin(stack, "POST", "/admin/tenants", {"name": f"{client}-{time.monotonic_ns() % 10**7}"})["tenant_id"]
    key = admin(stack, "POST", f"/admin/tenants/{tenant_id}/keys", {"tap": f"private-{client}", **policy})
    return tenant_id, key["key"]


def _replica_stats(client: str) -> list[dict[str, Any]]:
    """Each model replica's own ``stats``: its engine's prefix-cache counters and the requests it served."""
    from ray import serve
    from ray.serve.context import _get_global_client

    app = f"private-{client}"
    details = _get_global_client().get_serve_details()
    (deployment,) = [d for name, d in details["applications"][app]["deployments"].items() if name.startswith("model-")]
    handle = serve.get_deployment_handle(deployment["name"], app_name=app)
    ids = [r["replica_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"]
    if client == PLAIN:  # Serve's own router can't be asked for one replica: ask until both answered
        seen: dict[str, dict[str, Any]] = {}
        for _ in range(200):
            s = handle.stats.remote().result(timeout_s=30)
            seen[s["replica"]] = s
            if len(seen) == len(ids):
                break
        return list(seen.values())
    return [handle.stats.remote(replica_id=i).result(timeout_s=30) for i in ids]


def _prompt(doc: int, question: int) -> list[dict[str, str]]:
    text = " ".join(WORDS[(doc + i) % len(WORDS)] for i in range(260))  # ~260 tokens: two cache blocks of 128
    return [{"role": "system", "content": f"Document {doc}. {text}"}, {"role": "user", "content": f"Q{question}?"}]


async def _shared_prefix_load(url: str, key: str, docs: int = 4, rounds: int = 4) -> dict[str, int]:
    """Each document's prompt ``rounds`` times, one request at a time; request id -> document."""
    served: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        for r in range(rounds):
            for d in range(docs):
                body = {"model": TINY, "messages": _prompt(d, r), "max_tokens": 1}
                resp = await client.post(url + "/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                served[resp.json()["id"]] = d
    return served


def _hit_rate(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    queries = sum(a["prefix_queries"] for a in after) - sum(b["prefix_queries"] for b in before)
    hits = sum(a["prefix_hits"] for a in after) - sum(b["prefix_hits"] for b in before)
    assert queries > 0
    return hits / queries


def test_requests_sharing_a_prefix_land_on_one_replica_and_hit_its_cache_more(
    stack: Stack, taps: dict[str, str], ray_driver: None
) -> None:
    rates, where = {}, {}
    for client in (ROUTED, PLAIN):
        _, key = _key(stack, client)
        before = _replica_stats(client)
        assert len(before) == 2, before
        served = asyncio.run(_shared_prefix_load(taps[client], key))
        after = _replica_stats(client)
        rates[client] = _hit_rate(before, after)
        replica_of = {rid: s["replica"] for s in after for rid in s["recent_requests"] if rid in served}
        assert set(replica_of) == set(served)  # every request is on one replica's own list
        docs: dict[int, set[str]] = {}
        for rid, doc in served.items():
            docs.setdefault(doc, set()).add(replica_of[rid])
        where[client] = docs
    assert all(len(replicas) == 1 for replicas in where[ROUTED].values()), where  # affinity
    assert rates[ROUTED] > rates[PLAIN], (rates, where)  # Serve's choice splits some documents over both
    assert rates[ROUTED] > 0.5, rates  # 12 of 16 prompts find their two blocks cached


def _chat(url: str, key: str) -> httpx.Response:
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    return httpx.post(url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


async def _many(url: str, key: str, n: int) -> list[httpx.Response]:
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        return list(await asyncio.gather(*(client.post(url + "/chat/completions", json=body) for _ in range(n))))


def test_an_rpm_limit_is_exact_across_two_gateway_replicas(stack: Stack, taps: dict[str, str]) -> None:
    import openai

    url = taps[ROUTED]
    fronts = {httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json()["replica"] for _ in range(30)}
    assert len(fronts) == 2, fronts  # two gateway replicas take this tap's requests
    _, key = _key(stack, ROUTED, rpm=10)
    answers = asyncio.run(_many(url, key, 30))
    codes = [r.status_code for r in answers]
    assert codes.count(200) == 10 and codes.count(429) == 20, codes
    ok = next(r for r in answers if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "10"
    assert 0 <= int(ok.headers["x-ratelimit-remaining-requests"]) < 10
    refused = next(r for r in answers if r.status_code == 429)
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "10/min" in error["message"], error
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert raised.value.response.headers["retry-after"]


def test_a_tenant_limit_set_by_patch_counts_all_its_keys(stack: Stack, taps: dict[str, str]) -> None:
    url = taps[ROUTED]
    tenant_id, first = _key(stack, ROUTED)
    second = admin(stack, "POST", f"/admin/tenants/{tenant_id}/keys", {"tap": f"private-{ROUTED}"})["key"]
    policy = admin(stack, "PATCH", f"/admin/tenants/{tenant_id}", {"rpm": 4, "weight": 2.0})
    assert (policy["rpm"], policy["weight"], policy["tpm"]) == (4, 2.0, None)
    assert admin(stack, "GET", f"/admin/tenants/{tenant_id}/account")["policy"]["rpm"] == 4
    # (the keys were never used: no gateway replica has them cached from before the change)
    codes = [_chat(url, k).status_code for k in (first, second, first, second, first, second)]
    assert codes == [200] * 4 + [429] * 2, codes
    cleared = admin(stack, "PATCH", f"/admin/tenants/{tenant_id}", {"rpm": None})
    assert cleared["rpm"] is None and cleared["weight"] == 2.0  # the fields not given are kept
    bad = httpx.patch(f"{stack.base_url}/admin/tenants/{tenant_id}", json={"rpm": 0}, headers=stack.admin_headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm", bad.text

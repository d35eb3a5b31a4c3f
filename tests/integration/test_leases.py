"""Credit leases on the session's real stack (two tap replicas, each an engine with the OpenAI front inside;
real Ray, vLLM CPU, DuckDB): a replica killed under load leaves the ledger consistent, and its lease
expires back into the balance.

The 200-stream storm on a grant for ~20 requests, the ledger killed under load, `down`/`up` and key
revocation run in test_tap_billing.py against the same two replicas.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import ray

from orch.ledger import cost
from tests.integration.conftest import LEASE_TTL_S, MODEL, TAP_REPLICAS, Stack, kill_replica
from tests.integration.test_tap_billing import PRICE, QUESTION, account, new_tenant, shard_invariants, usage
from tests.reliability.table import record

pytestmark = pytest.mark.integration


def tap_replicas() -> list[str]:
    """The public tap's replicas: the model deployment, whose replicas serve the OpenAI routes themselves."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names if a["name"].startswith(f"SERVE_REPLICA::public#model-{MODEL}#"))


def running_replicas(timeout_s: float) -> int:
    """The public tap's RUNNING replicas, once there are :data:`TAP_REPLICAS` of them or ``timeout_s`` passed."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        states = serve.status().applications["public"].deployments[f"model-{MODEL}"].replica_states
        running = states.get("RUNNING", 0)
        if running >= TAP_REPLICAS or time.monotonic() > deadline:
            return running
        time.sleep(1)


def test_two_replicas_serve_the_public_tap_each_with_its_front(stack: Stack, ray_driver: None) -> None:
    from ray import serve

    assert len(tap_replicas()) == TAP_REPLICAS == 2
    # No gateway in between; the embedding model is a deployment of its own, reached by handle.
    assert set(serve.status().applications["public"].deployments) == {f"model-{MODEL}", "model-all-minilm-l6-v2"}


@pytest.mark.reliability
def test_killing_a_tap_replica_under_load_leaves_the_ledger_exact(stack: Stack, ray_driver: None) -> None:
    grant = 10_000_000
    tenant, key = new_tenant(stack, grant)
    victim = tap_replicas()[0]

    async def run() -> list[tuple[int | str, dict[str, Any] | None]]:
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(i: int) -> tuple[int | str, dict[str, Any] | None]:
                await asyncio.sleep(i * 0.05)
                body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
                try:
                    resp = await client.post(
                        stack.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                    )
                except httpx.HTTPError as exc:  # the killed replica's connections
                    return type(exc).__name__, None
                if resp.status_code != 200:  # e.g. Serve's proxy's 500 for a request on the killed replica
                    return resp.status_code, None
                answer = resp.json()
                return resp.status_code, {**answer["usage"], "id": answer["id"]}

            async def kill() -> None:
                await asyncio.sleep(1.0)
                kill_replica(victim)

            results = await asyncio.gather(*(one(i) for i in range(60)), kill())
            return [r for r in results if r is not None]

    responses = asyncio.run(run())
    statuses = [s for s, _ in responses]
    assert statuses.count(200) >= 30, statuses

    # Every lease comes back: the dead replica's by its timeout, the live one's when idle.
    deadline = time.monotonic() + LEASE_TTL_S + 30
    a: dict[str, Any] = account(stack, tenant, settled=False)
    while a["held_micro_credits"] and time.monotonic() < deadline:
        time.sleep(0.5)
        a = account(stack, tenant, settled=False)
    assert a["held_micro_credits"] == 0 and a["open_holds"] == [], a
    report = usage(stack, tenant)
    charged = {r["request_id"]: r["cost_micro"] for r in report["data"]}
    answered = {u["id"]: u for s, u in responses if s == 200 and u}
    # A 200's body left only once its usage row was committed (LeaseSettings.durable_end): each one is charged,
    # exactly. (A request cut by the kill may be charged for the tokens it produced, as a client that leaves is.)
    assert set(answered) <= set(charged), sorted(set(answered) - set(charged))
    assert report["totals"]["cost_micro_credits"] == a["spent_micro_credits"] == grant - a["balance_micro_credits"]
    audit = ray.get(ray.get_actor("tenant-ledger-0", namespace="llama-orch").call.remote("audit"), timeout=60)
    assert audit["debited"] == audit["usage_cost"]
    figures = shard_invariants()
    lost = sum(max(0, cost(PRICE, u["prompt_tokens"], u["completion_tokens"]) - charged.get(i, 0))
               for i, u in answered.items())  # fmt: skip
    record("kill a tap replica holding a lease", len(responses), lost, figures["double_charges"],
           figures["violations"])  # fmt: skip
    assert lost == 0 and figures["double_charges"] == 0

    # Serve replaces the replica (an engine start: up to minutes on 2 busy cores); the tap serves on.
    assert running_replicas(timeout_s=300) == TAP_REPLICAS  # and the tests after this one find both
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    headers = {"Authorization": f"Bearer {key}"}
    again = httpx.post(stack.v1 + "/chat/completions", json=body, headers=headers, timeout=120)
    assert again.status_code == 200, again.text

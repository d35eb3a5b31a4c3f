"""The Public Tap's billing over HTTP, against the session's real stack (Ray, Serve, vLLM CPU, DuckDB).

Each test makes its own tenant through the admin API, so tests never share a balance.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import httpx
import openai
import pytest
import ray

from actors.ledger import ledger_actor
from orch.control.cluster import read_state, use_cluster
from orch.ledger import Hold, Price, cost
from tests.integration.conftest import MODEL, NUM_GPUS, TAP_REPLICAS, Stack, cli
from tests.reliability.table import record

pytestmark = pytest.mark.integration

PRICE = Price(1_000_000, 2_000_000)  # configs/local.yaml's price of the default model
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def admin(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    resp = httpx.request(method, stack.base_url + path, json=body, headers=stack.admin_headers, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def new_tenant(stack: Stack, micro_credits: int) -> tuple[str, str]:
    """A fresh tenant with one grant and one key: (tenant_id, key)."""
    tenant = admin(stack, "POST", "/admin/tenants", {"name": f"test-{uuid.uuid4().hex[:6]}"})["tenant_id"]
    if micro_credits:
        grant = {"micro_credits": micro_credits, "idempotency_key": f"{tenant}-first"}
        admin(stack, "POST", f"/admin/tenants/{tenant}/grants", grant)
    key = admin(stack, "POST", f"/admin/tenants/{tenant}/keys", {})["key"]
    return tenant, key


def account(stack: Stack, tenant: str, settled: bool = True) -> dict[str, Any]:
    """The tenant's account; with ``settled``, once no hold is open (settles run after the response)."""
    deadline = time.monotonic() + 30
    while True:
        a: dict[str, Any] = admin(stack, "GET", f"/admin/tenants/{tenant}/account")
        if not settled or a["held_micro_credits"] == 0 or time.monotonic() > deadline:
            return a
        time.sleep(0.1)


def usage(stack: Stack, tenant: str) -> dict[str, Any]:
    result: dict[str, Any] = admin(stack, "GET", f"/admin/tenants/{tenant}/usage")
    return result


def chat(stack: Stack, key: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(
        stack.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def test_auth_is_required_and_openai_shaped(stack: Stack) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-orch-nope"}, {"Authorization": "Basic x"}):
        resp = httpx.get(stack.v1 + "/models", headers=headers)
        assert resp.status_code == 401, resp.text
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.v1, api_key="sk-orch-wrong", max_retries=0).models.list()
    # Admin routes refuse tenant keys; tenant routes refuse the admin key.
    assert httpx.get(stack.base_url + "/admin/tenants", headers=stack.headers).status_code == 403
    assert httpx.get(stack.base_url + "/admin/tenants").status_code == 401
    assert httpx.get(stack.v1 + "/account", headers=stack.admin_headers).status_code == 403
    assert httpx.get(stack.base_url + "/health").status_code == 200  # open


def test_revoked_key_is_refused_within_5_seconds(stack: Stack) -> None:
    tenant, key = new_tenant(stack, 1_000_000)
    assert chat(stack, key, max_tokens=1).status_code == 200
    key_id = key.removeprefix("sk-orch-").split("-")[0]
    admin(stack, "DELETE", f"/admin/keys/{key_id}")
    t0 = time.monotonic()
    while chat(stack, key, max_tokens=1).status_code == 200:  # refused by one tap replica first
        assert time.monotonic() - t0 < 5.5, "a revoked key still works after 5 s"
        time.sleep(0.2)
    time.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))
    for _ in range(12):  # 5 s after the revocation, every replica refuses it (each call lands on either)
        resp = chat(stack, key, max_tokens=1)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", resp.text


def hold_of_question(max_tokens: int) -> int:
    """The hold the gateway takes for QUESTION: computed from the replica's measured prompt limits."""
    from ray import serve

    from orch.billing import hold_amount, prompt_token_bound

    limits = serve.get_deployment_handle(f"model-{MODEL}", app_name="public").limits.remote().result(timeout_s=60)
    return hold_amount(PRICE, limits, prompt_token_bound(limits, messages=[QUESTION[0]["content"]]), max_tokens)


def test_tenant_flow_402_at_zero_then_grant_works_again(stack: Stack, ray_driver: None) -> None:
    granted = hold_of_question(8) + 1  # the first request's hold fits; after its charge the next one doesn't
    tenant, key = new_tenant(stack, granted)
    first = chat(stack, key)
    assert first.status_code == 200, first.text
    u = first.json()["usage"]
    charged = cost(PRICE, u["prompt_tokens"], u["completion_tokens"])
    a = account(stack, tenant)
    assert a["balance_micro_credits"] == granted - charged and a["spent_micro_credits"] == charged

    refused = chat(stack, key)  # the hold (worst case) no longer fits the balance
    assert refused.status_code == 402, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_credits")
    with pytest.raises(openai.APIStatusError) as err:
        openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0).chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=8,  # type: ignore[arg-type]
        )
    assert err.value.status_code == 402
    assert account(stack, tenant)["balance_micro_credits"] == granted - charged  # a refusal costs nothing

    admin(stack, "POST", f"/admin/tenants/{tenant}/grants", {"micro_credits": 1_000, "idempotency_key": "top-up"})
    again = admin(
        stack, "POST", f"/admin/tenants/{tenant}/grants", {"micro_credits": 1_000, "idempotency_key": "top-up"}
    )
    assert again["replayed"] is True  # a repeated grant is applied once
    conflict = httpx.post(
        f"{stack.base_url}/admin/tenants/{tenant}/grants",
        json={"micro_credits": 5, "idempotency_key": "top-up"},
        headers=stack.admin_headers,
    )
    assert conflict.status_code == 409
    assert chat(stack, key).status_code == 200

    # The tenant sees the same through its own key (once the leases are back: a replica's batch of usage
    # reaches the ledger within 50 ms, and a lease holds credit until it is idle).
    settled = account(stack, tenant)
    own = httpx.get(stack.v1 + "/account", headers={"Authorization": f"Bearer {key}"}).json()
    assert own["balance_micro_credits"] == settled["balance_micro_credits"]
    assert [g["micro_credits"] for g in own["grants"]] == [granted, 1_000]
    report = httpx.get(stack.v1 + "/usage?group_by=model", headers={"Authorization": f"Bearer {key}"}).json()
    assert report["totals"]["requests"] == 2
    spent = own["spent_micro_credits"]
    assert report["totals"]["cost_micro_credits"] == spent == granted + 1_000 - own["balance_micro_credits"]
    assert [g["key"] for g in report["data"]] == [MODEL]


async def _stream(client: httpx.AsyncClient, url: str, key: str) -> tuple[int, dict[str, int] | None]:
    body = {
        "model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True,
    }  # fmt: skip
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, None
        usage = None
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        return 200, usage


def served_cost(responses: list[tuple[int, dict[str, Any] | None]]) -> int:
    """What the answered requests cost by the usage each answer reported (what was served)."""
    return sum(cost(PRICE, u["prompt_tokens"], u["completion_tokens"]) for s, u in responses if s == 200 and u)


def test_200_concurrent_streams_never_overspend(stack: Stack, ray_driver: None) -> None:
    hold = hold_of_question(8)
    grant = 20 * hold + hold // 2  # covers about 20 holds at once
    tenant, key = new_tenant(stack, grant)

    async def run() -> list[tuple[int, dict[str, int] | None]]:
        limits_ = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=600, limits=limits_) as client:
            return await asyncio.gather(*(_stream(client, stack.v1 + "/chat/completions", key) for _ in range(200)))

    results = asyncio.run(run())
    statuses = [s for s, _ in results]
    ok = [u for s, u in results if s == 200]
    assert set(statuses) <= {200, 402}, statuses
    # The grant covers 20.5 worst cases at once; each replica's lease may strand less than one of them.
    assert 20 - (TAP_REPLICAS - 1) <= len(ok) < 200 and statuses.count(402) >= 1, (len(ok), statuses.count(402))
    a = account(stack, tenant)
    assert a["held_micro_credits"] == 0 and a["balance_micro_credits"] >= 0
    charged = served_cost(results)
    assert all(u is not None and u["completion_tokens"] == 8 for u in ok)
    report = usage(stack, tenant)
    assert report["totals"]["requests"] == len(ok)
    assert (
        report["totals"]["cost_micro_credits"]
        == a["spent_micro_credits"]
        == charged
        == grant - a["balance_micro_credits"]
    )


def _ledger_actor() -> Any:
    return ray.get_actor("tenant-ledger-0", namespace="llama-orch")


def shard_invariants() -> dict[str, int]:
    """orch.invariants over the ledger shard's own file (raises on a violation)."""
    figures: dict[str, int] = ray.get(_ledger_actor().call.remote("check_invariants"), timeout=300)
    return figures


@pytest.mark.reliability
def test_killing_the_ledger_under_load_loses_and_doubles_nothing(stack: Stack, ray_driver: None) -> None:
    tenant, key = new_tenant(stack, 10_000_000)

    async def run() -> list[tuple[int, dict[str, Any] | None]]:
        async with httpx.AsyncClient(timeout=600) as client:

            async def one(i: int) -> tuple[int, dict[str, Any] | None]:
                await asyncio.sleep(i * 0.05)
                body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "temperature": 0}
                url = stack.v1 + "/chat/completions"
                resp = await client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
                return resp.status_code, resp.json().get("usage") if resp.status_code == 200 else None

            async def kill() -> None:
                await asyncio.sleep(0.6)
                ray.kill(_ledger_actor(), no_restart=False)  # restarts and replays its file

            results = await asyncio.gather(*(one(i) for i in range(40)), kill())
            return [r for r in results if r is not None]

    responses = asyncio.run(run())
    statuses = [s for s, _ in responses]
    assert statuses.count(200) >= 30, statuses  # the gateway waits out the restart: requests succeed
    assert set(statuses) <= {200, 503}, statuses
    a = account(stack, tenant)
    assert a["held_micro_credits"] == 0
    report = usage(stack, tenant)
    figures = shard_invariants()
    lost = served_cost(responses) - a["spent_micro_credits"]
    doubled = report["totals"]["requests"] - statuses.count(200) + figures["double_charges"]
    record("kill the ledger actor (restarts, replays)", len(responses), lost, doubled, figures["violations"])
    assert report["totals"]["requests"] == statuses.count(200)  # one row per served request, none doubled
    assert report["totals"]["cost_micro_credits"] == a["spent_micro_credits"] == 10_000_000 - a["balance_micro_credits"]
    assert a["spent_micro_credits"] == served_cost(responses)  # every answer charged what its usage said
    audit = ray.get(_ledger_actor().call.remote("audit"), timeout=60)
    assert audit["debited"] == audit["usage_cost"]
    assert audit["granted"] - audit["debited"] - audit["held"] >= audit["balance"]  # expired grants forfeit


def stream_then_leave(url: str, body: dict[str, Any], headers: dict[str, str], tokens: int) -> None:
    """Streams a chat completion and closes the connection after ``tokens`` content chunks."""
    received = 0
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                received += 1
            if received >= tokens:
                return


def test_disconnect_mid_stream_charges_the_tokens_produced(stack: Stack) -> None:
    tenant, key = new_tenant(stack, 10_000_000)
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    body = {"model": MODEL, "messages": story, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    stream_then_leave(stack.v1 + "/chat/completions", body, {"Authorization": f"Bearer {key}"}, 5)
    a = account(stack, tenant)  # waits until the hold is settled
    assert a["held_micro_credits"] == 0 and a["open_holds"] == []
    rows = usage(stack, tenant)["data"]
    assert len(rows) == 1 and rows[0]["status"] == "aborted", rows
    row = rows[0]
    assert 5 <= row["completion_tokens"] < 1500  # what the engine produced before the abort, not the hold
    assert row["cost_micro"] == cost(PRICE, row["prompt_tokens"], row["completion_tokens"])
    assert a["spent_micro_credits"] == row["cost_micro"] == 10_000_000 - a["balance_micro_credits"]


@pytest.mark.restarts_stack
@pytest.mark.reliability
def test_restarting_the_whole_stack_keeps_every_balance(stack: Stack) -> None:
    tenant, key = new_tenant(stack, 5_000)
    assert chat(stack, key).status_code == 200
    before = {t["tenant_id"]: account(stack, t["tenant_id"]) for t in admin(stack, "GET", "/admin/tenants")["data"]}
    audit_before = usage(stack, tenant)["totals"]

    # A Ray driver whose cluster goes away exits its process after a minute: leave the cluster first.
    ray.shutdown()
    down = cli("--data-dir", str(stack.data_dir), "down", timeout=120)
    assert down.returncode == 0, down.stderr
    up = cli("--data-dir", str(stack.data_dir), "up", "--config", str(stack.config_path), "--num-gpus", str(NUM_GPUS))
    assert up.returncode == 0, up.stderr[-3000:]
    assert stack.key not in up.stdout  # the demo key is shown once, on the first start only

    after = {t["tenant_id"]: account(stack, t["tenant_id"]) for t in admin(stack, "GET", "/admin/tenants")["data"]}
    state = read_state(stack.data_dir)  # a driver of the new cluster, for the ledger's own check
    assert state is not None
    use_cluster(state)
    ray.init(address=state.gcs_address, namespace="serve", log_to_driver=False, logging_level="WARNING")
    try:
        figures = shard_invariants()
    finally:
        ray.shutdown()
    balance = "balance_micro_credits"
    lost = sum(abs(before[t][balance] - after.get(t, {}).get(balance, 0)) for t in before)
    record("down and up of the whole stack", 0, lost, figures["double_charges"], figures["violations"])
    assert after == before
    assert usage(stack, tenant)["totals"] == audit_before
    assert chat(stack, key).status_code == 200  # keys and balance still work
    assert chat(stack, stack.key).status_code == 200


def test_readme_tenant_flow_with_the_cli(stack: Stack) -> None:
    """The README's tenant flow, command by command: create -> key -> grant 80 -> call -> 402 -> grant -> call."""

    def orch(*args: str) -> str:
        done = cli("--data-dir", str(stack.data_dir), *args, timeout=120)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout.strip()

    tenant = orch("tenants", "create", "acme")
    assert re.fullmatch(r"t-[0-9a-f]{12}", tenant)
    made = cli("--data-dir", str(stack.data_dir), "keys", "create", tenant, timeout=120)
    key, key_id = made.stdout.strip(), re.search(r"key (\w+) for tenant", made.stderr).group(1)  # type: ignore[union-attr]
    assert "granted 80 µc" in orch("credits", "grant", tenant, "80")
    hi = [{"role": "user", "content": "Hi"}]
    assert chat(stack, key, messages=hi).status_code == 200
    assert chat(stack, key, messages=hi).status_code == 402
    orch("credits", "grant", tenant, "1000000")
    assert chat(stack, key, messages=hi).status_code == 200
    account_text = orch("account", tenant)
    assert f"tenant {tenant} (acme)" in account_text and "expires 20" in account_text
    assert orch("usage", tenant, "--group-by", "model").startswith("2 requests")
    deadline = time.monotonic() + 20  # the lease the last call took is returned once idle (2 s)
    while (held := json.loads(orch("account", tenant, "--json"))["held_micro_credits"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert held == 0
    assert orch("keys", "revoke", key_id) == f"revoked {key_id}"


@pytest.mark.reliability
def test_dropping_100_clients_mid_stream_charges_each_at_least_what_it_got(stack: Stack, ray_driver: None) -> None:
    grant = 100_000_000
    tenant, key = new_tenant(stack, grant)
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    body = {"model": MODEL, "messages": story, "max_tokens": 300, "stream": True, "ignore_eos": True}

    async def leave_after(client: httpx.AsyncClient, tokens: int) -> tuple[str, int]:
        """Streams, then drops the connection after ``tokens`` content chunks: (request id, chunks seen)."""
        request_id, received = "", 0
        async with client.stream("POST", stack.v1 + "/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:  # fmt: skip
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    request_id = chunk["id"]
                    received += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
                if received >= tokens:
                    break
        return request_id, received

    async def run() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(leave_after(client, 1 + i % 5) for i in range(100)))

    clients = asyncio.run(run())
    a = account(stack, tenant)
    assert a["held_micro_credits"] == 0 and a["open_holds"] == [], a
    rows = {r["request_id"]: r for r in admin(stack, "GET", f"/admin/tenants/{tenant}/usage?limit=1000")["data"]}
    assert len(rows) == 100 and {r["status"] for r in rows.values()} == {"aborted"}, len(rows)
    # Each was charged the tokens the engine produced for it: at least what it received, never the hold.
    short = [(rid, got, rows[rid]["completion_tokens"]) for rid, got in clients if rows[rid]["completion_tokens"] < got]
    lost = sum(cost(PRICE, rows[rid]["prompt_tokens"], got) - rows[rid]["cost_micro"] for rid, got, _ in short)
    figures = shard_invariants()
    record("drop 100 clients mid-stream", len(clients), lost, figures["double_charges"], figures["violations"])
    assert not short, short[:5]
    assert all(r["completion_tokens"] < 300 for r in rows.values())
    assert all(r["cost_micro"] == cost(PRICE, r["prompt_tokens"], r["completion_tokens"]) for r in rows.values())
    assert sum(r["cost_micro"] for r in rows.values()) == a["spent_micro_credits"] == grant - a["balance_micro_credits"]


@pytest.mark.reliability
def test_a_hold_whose_request_vanished_expires_back_into_the_balance(stack: Stack, ray_driver: None) -> None:
    """A hold opened for a request that then vanished (its gateway gone before any settle): the ledger's
    expiry tick ends it at its timeout and its credit is back in the balance."""
    tenant, _ = new_tenant(stack, 1_000_000)

    shard = ledger_actor(stack.data_dir, 0)  # the stack's shard, by the handle its class gives (a named one
    # looked up with ray.get_actor takes no second positional argument)
    held = ray.get(shard.call.remote("apply", Hold(f"vanished-{tenant}", tenant, 400_000, 2)), timeout=60)
    assert held.ok and account(stack, tenant, settled=False)["held_micro_credits"] == 400_000
    a = account(stack, tenant)  # waits until no hold is open: the tick (every second) expires it after 2 s
    figures = shard_invariants()
    lost = 1_000_000 - a["balance_micro_credits"]
    record("a hold whose request vanished expires", 1, lost, figures["double_charges"], figures["violations"])
    assert a["held_micro_credits"] == 0 and a["balance_micro_credits"] == 1_000_000 and a["spent_micro_credits"] == 0

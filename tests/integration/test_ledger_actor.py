"""TenantLedger on real Ray and real DuckDB: group commit under concurrency, kill and restart, replay,
placement on the head node, late settles, the admin key and a tap's keys."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import ray

from actors.ledger import ledger_actor
from orch.ledger import Code, GrantCredits, Hold, Settle
from orch.store import UsageRow

pytestmark = pytest.mark.integration


@pytest.fixture()
def ledger(ray_driver: None, tmp_path: Path):  # type: ignore[no-untyped-def]
    shard = random.randrange(1000, 10**6)  # its own name: never the stack's shard 0
    actor = ledger_actor(tmp_path, shard)
    ray.get(actor.ready.remote())
    yield actor, tmp_path, shard
    ray.kill(actor, no_restart=True)


def _call(actor, method: str, *args):  # type: ignore[no-untyped-def]
    return ray.get(actor.call.remote(method, *args), timeout=120)


def test_concurrent_holds_never_overspend_and_survive_a_kill(ledger) -> None:  # type: ignore[no-untyped-def]
    actor, data, shard = ledger
    tenant = _call(actor, "create_tenant", "acme").tenant_id
    assert _call(actor, "apply", GrantCredits("g1", tenant, 20_000)).code is Code.OK

    async def one(i: int) -> int:
        hold = await actor.call.remote("apply", Hold(f"h{i}", tenant, 1_000, 60))
        # EXISTS: the kill landed after the hold was committed but before its reply; Ray retried the
        # call and the ledger answered with the first (OK) result. Only OK results are remembered.
        if not hold.ok:
            assert hold.code is Code.INSUFFICIENT_CREDITS
            return 0
        settled = await actor.call.remote("apply", Settle(f"s{i}", f"h{i}", 700))
        assert settled.ok
        return 700

    async def run(n: int, start: int) -> list[int]:
        return await asyncio.gather(*(one(start + i) for i in range(n)))

    first = asyncio.run(run(100, 0))
    ray.kill(actor, no_restart=False)  # it restarts and replays its file
    second = asyncio.run(run(100, 100))
    spent = sum(first) + sum(second)
    account = _call(actor, "account", tenant)
    assert account["balance_micro_credits"] == 20_000 - spent >= 0
    assert account["open_holds"] == []
    audit = _call(actor, "audit")
    assert audit["debited"] == spent and audit["granted"] == 20_000

    # Repeating a committed op after the restart returns the first result, not a second debit.
    assert _call(actor, "apply", Settle("s0", "h0", 700)).code in (Code.EXISTS, Code.HOLD_NOT_FOUND)
    assert _call(actor, "account", tenant)["balance_micro_credits"] == 20_000 - spent


def test_raw_keys_never_reach_the_file(ledger) -> None:  # type: ignore[no-untyped-def]
    actor, data, shard = ledger
    tenant = _call(actor, "create_tenant", "acme").tenant_id
    key_id, raw = _call(actor, "create_key", tenant)
    secret = raw.rsplit("-", 1)[1]
    assert _call(actor, "get_key", key_id).tenant_id == tenant
    ray.kill(actor, no_restart=True)
    blob = b"".join(p.read_bytes() for p in data.glob(f"ledger-{shard}.duckdb*"))
    assert secret.encode() not in blob and raw.encode() not in blob
    assert key_id.encode() in blob


def test_the_ledger_actor_is_pinned_to_the_head_node(ledger) -> None:  # type: ignore[no-untyped-def]
    actor, data, shard = ledger
    placement = ray.get(actor.placement.remote(), timeout=60)
    assert placement["resources"].get("node:__internal_head__", 0) > 0  # asked for, not just landed there
    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    assert heads == [placement["node_id"]]


def test_a_settle_after_its_hold_expired_is_charged_and_recorded(ledger) -> None:  # type: ignore[no-untyped-def]
    actor, data, shard = ledger
    tenant = _call(actor, "create_tenant", "acme").tenant_id
    assert _call(actor, "apply", GrantCredits("g1", tenant, 1_000)).code is Code.OK
    assert _call(actor, "apply", Hold("h1", tenant, 600, 1)).code is Code.OK
    while _call(actor, "account", tenant)["open_holds"]:  # the actor's tick expires it
        time.sleep(0.2)
    assert _call(actor, "apply", Hold("h2", tenant, 700, 60)).code is Code.OK  # its credit, held again
    row = UsageRow("r1", datetime.now(UTC), tenant, None, "public", "m", 10, 5, 500, 40, 2_000, "ok", "stop")
    late = _call(actor, "apply", Settle("s1", "h1", 500), row)
    assert (late.ok, late.late, late.micro_credits) == (True, True, 300)
    report = _call(actor, "usage", tenant, None, None, None)
    assert [r.cost_micro for r in report.rows] == [300]
    audit = _call(actor, "audit")
    assert audit["debited"] == audit["usage_cost"] == 300 and audit["balance"] == 0


def test_the_admin_key_and_a_taps_keys_come_from_the_ledger(ledger) -> None:  # type: ignore[no-untyped-def]
    actor, data, shard = ledger
    admin_key = _call(actor, "admin_key")
    if (data / "admin_key").exists():  # else the cluster's environment sets it
        assert (data / "admin_key").read_text().strip() == admin_key
    tenant = _call(actor, "create_tenant", "acme").tenant_id
    key_id, _ = _call(actor, "create_key", tenant, "private-acme")
    assert _call(actor, "revoke_tap_keys", "private-acme") == 1
    assert _call(actor, "get_key", key_id).revoked_at is not None


def test_a_snapshot_forked_inside_the_actor_restores_its_accounts(ray_driver: None, tmp_path: Path) -> None:
    """The ledger actor snapshots aside (a forked child pickles it) inside a Ray worker, under concurrent
    commits; the file's snapshot and the ops after it give back every account."""
    from actors.ledger import LedgerService
    from orch.store import Store

    shard = random.randrange(1000, 10**6)
    actor = ledger_actor(tmp_path, shard, snapshot_every=50)
    try:
        tenant = _call(actor, "create_tenant", "acme").tenant_id
        assert _call(actor, "apply", GrantCredits("g1", tenant, 10**6)).code is Code.OK

        async def one(i: int) -> None:
            assert (await actor.call.remote("apply", Hold(f"h{i}", tenant, 1_000, 60))).ok
            assert (await actor.call.remote("apply", Settle(f"s{i}", f"h{i}", 300 + i))).ok

        async def run() -> None:
            await asyncio.gather(*(one(i) for i in range(150)))  # 302 ops: several snapshots, forked mid-load
            await actor.call.remote("snapshot_done")

        asyncio.run(run())
        account = _call(actor, "account", tenant)
    finally:
        ray.kill(actor, no_restart=True)
    path = tmp_path / f"ledger-{shard}.duckdb"
    deadline = time.monotonic() + 30
    while True:  # the killed process lets the file go
        try:
            store = Store(path)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    found = store.load_snapshot()
    store.close()
    assert found is not None and 50 <= found[0] <= 302, found and found[0]
    service = LedgerService(path)
    assert service._ledger.account(tenant).balance == account["balance_micro_credits"]
    assert service._ledger.account(tenant).spent == account["spent_micro_credits"] == sum(300 + i for i in range(150))
    service.close()

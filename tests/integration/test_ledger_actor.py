"""TenantLedger on real Ray and real DuckDB: group commit under concurrency, kill and restart, replay."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import ray

from actors.ledger import ledger_actor
from orch.ledger import Code, GrantCredits, Hold, Settle

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
        if hold.code is not Code.OK:
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

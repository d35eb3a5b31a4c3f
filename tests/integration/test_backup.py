"""`llama-orch backup` of the session's running stack, restored into a new data dir with `llama-orch restore`
and read back in this process: the restored ledger has every account the live one had at the backup, the
money invariants hold in it, and its keys verify with the restored pepper.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from orch.invariants import check_invariants
from orch.keys import load_or_create_pepper, verify
from orch.ledger import Ledger
from orch.store import Store
from tests.integration.conftest import LEASE_TTL_S, MODEL, Stack, cli
from tests.integration.test_tap_billing import QUESTION, account, chat, new_tenant
from tests.reliability.table import record

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

GRANT = 5_000_000


def quiet_account(stack: Stack, tenant: str) -> dict[str, Any]:
    """The tenant's account once no hold is open: its lease back (idle, or by its timeout) and all settled."""
    deadline = time.monotonic() + LEASE_TTL_S + 30
    a = account(stack, tenant, settled=False)
    while a["held_micro_credits"] and time.monotonic() < deadline:
        time.sleep(0.5)
        a = account(stack, tenant, settled=False)
    assert a["held_micro_credits"] == 0, a
    return a


def backup_cli(stack: Stack, dest: Path) -> str:
    env = {**stack.client_env, "RAY_ADDRESS": ""}  # the stack's own head, by its state file
    done = cli("--data-dir", str(stack.data_dir), "backup", str(dest), env=env, timeout=300)
    assert done.returncode == 0, f"backup failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def restored_ledger(backup: Path, data_dir: Path) -> tuple[Store, Ledger]:
    """The backup restored into the new ``data_dir`` by the CLI, its shard 0 opened read-only and replayed."""
    done = cli("--data-dir", str(data_dir), "restore", str(backup), timeout=300)
    assert done.returncode == 0, f"restore failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    store = Store(data_dir / "ledger-0.duckdb", read_only=True)
    ledger = Ledger()
    ledger.replay(store.load_ops())
    return store, ledger


def figures_of(a: Any) -> tuple[int, int, int, list[tuple[str, int, int]]]:
    """An account's money, from the admin API's JSON or a replayed ledger's Account."""
    if isinstance(a, dict):
        grants = [(g["grant_id"], g["micro_credits"], g["remaining_micro_credits"]) for g in a["grants"]]
        return a["balance_micro_credits"], a["held_micro_credits"], a["spent_micro_credits"], grants
    return a.balance, a.held, a.spent, [(g.grant_id, g.micro_credits, g.remaining) for g in a.grants]


def test_a_backup_of_the_running_stack_restores_every_account_and_under_load_keeps_the_invariants(
    stack: Stack, tmp_path: Path
) -> None:
    tenants = [new_tenant(stack, GRANT) for _ in range(3)]
    for _, key in tenants:
        for _ in range(2):
            assert chat(stack, key).status_code == 200
    live = {tenant: quiet_account(stack, tenant) for tenant, _ in tenants}

    out = backup_cli(stack, tmp_path / "quiet")
    assert "ledger-0.duckdb: " in out and "ops (to seq " in out and "key_pepper" in out
    store, ledger = restored_ledger(tmp_path / "quiet", tmp_path / "restored-quiet")
    lost = 0
    for tenant, key in tenants:
        restored = ledger.account(tenant)
        lost += abs(live[tenant]["balance_micro_credits"] - restored.balance)
        assert figures_of(restored) == figures_of(live[tenant])
        key_id = key.removeprefix("sk-orch-").split("-")[0]
        found = store.get_key(key_id)
        assert found is not None and verify(key, found.secret_hash, load_or_create_pepper(tmp_path / "restored-quiet"))
    check_invariants(store)
    store.close()
    assert (tmp_path / "restored-quiet" / "admin_key").read_text().strip() == stack.admin_key
    assert (tmp_path / "restored-quiet" / "key_pepper").stat().st_mode & 0o777 == 0o600

    # A second backup while one tenant's requests keep arriving: a point in the middle of them.
    tenant, key = tenants[0]
    before = live[tenant]

    async def under_load() -> tuple[str, int]:
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
            headers = {"Authorization": f"Bearer {key}"}
            started = [0]
            backing_up = asyncio.ensure_future(asyncio.to_thread(backup_cli, stack, tmp_path / "busy"))

            async def requests(lane: int) -> None:
                while not backing_up.done():
                    started[0] += 1
                    resp = await client.post(stack.v1 + "/chat/completions", json=body, headers=headers)
                    assert resp.status_code == 200, resp.text

            await asyncio.gather(*(requests(lane) for lane in range(4)))
            return await backing_up, started[0]

    _, in_flight = asyncio.run(under_load())
    after = quiet_account(stack, tenant)
    store, ledger = restored_ledger(tmp_path / "busy", tmp_path / "restored-busy")
    figures = check_invariants(store)
    restored = ledger.account(tenant)
    store.close()
    assert before["spent_micro_credits"] <= restored.spent <= after["spent_micro_credits"]
    assert restored.balance + restored.held + restored.spent == GRANT  # every micro-credit is somewhere
    record("backup under load, restored elsewhere", in_flight, lost, figures.double_charges, figures.violations)
    assert lost == 0

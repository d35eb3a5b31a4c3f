"""LedgerService without Ray: late settles' usage rows, a broken ledger, usage reports off the loop,
a tap's keys, the one admin key. Real DuckDB files in tmp dirs; fakes are named as fakes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import actors.ledger
from actors.ledger import LedgerService, LedgerUnavailable, TenantLedgerActor
from orch import snapshot
from orch.keys import ADMIN_KEY_ENV, load_or_create_admin_key, verify
from orch.ledger import Code, CreateTenant, GrantCredits, Hold, Ledger, Op, Result, Settle
from orch.metrics import UsageMetrics
from orch.store import Batch, Store, UsageReport, UsageRow

T0 = datetime(2026, 11, 27, 5, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class FakeFailingStore:
    """A store whose disk went away: every commit fails, and so does reading the file back after the
    first ``good_loads`` loads (the replay of a restart)."""

    def __init__(self, good_loads: int = 1) -> None:
        self.good_loads = good_loads
        self.commits = 0

    def load_snapshot(self) -> None:
        return None

    def load_ops(self, from_seq: int = 0) -> Iterator[tuple[Op, Result]]:
        if self.good_loads <= 0:
            raise OSError("cannot read the ledger file")
        self.good_loads -= 1
        return iter(())

    def commit(self, batch: Batch) -> None:
        self.commits += 1
        raise OSError("cannot write the ledger file")

    def usage_metrics(self) -> UsageMetrics:
        return UsageMetrics()  # an empty file

    def close(self) -> None:
        pass


class FakeSlowUsageStore(Store):
    """The real store, whose usage report waits until the test lets it go on: provably in progress."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.report_started = threading.Event()
        self.let_report_finish = threading.Event()

    def usage(self, *args: Any, **kwargs: Any) -> UsageReport:
        self.report_started.set()
        self.let_report_finish.wait(timeout=60)  # a guard only: on the loop's thread nothing could set it
        return super().usage(*args, **kwargs)


def usage_row(request_id: str, tenant_id: str, cost: int) -> UsageRow:
    return UsageRow(request_id, T0, tenant_id, "k1", "public", "m", 10, 5, cost, 40, 300, "ok", "stop")


def test_a_late_settle_writes_its_usage_row_at_the_cost_actually_debited(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        service = LedgerService(tmp_path / "ledger-0.duckdb", clock)
        tenant = (await service.create_tenant("acme")).tenant_id
        await service.apply(GrantCredits("g", tenant, 1_000))
        await service.apply(Hold("h", tenant, 600, 10))
        clock.now += timedelta(seconds=10)  # the request outlives its hold
        assert (await service.expire_holds()).hold_ids == ("h",)  # type: ignore[union-attr]
        await service.apply(Hold("h2", tenant, 800, 60))  # its credit is held again: 200 left
        late = await service.apply(Settle("s", "h", 500), usage_row("s", tenant, 500))
        assert (late.ok, late.late, late.micro_credits) == (True, True, 200)
        report = await service.usage(tenant, None, None, None)
        assert [r.cost_micro for r in report.rows] == [200]  # type: ignore[union-attr]
        audit = service.audit()
        assert audit["debited"] == audit["usage_cost"] == 200 and audit["usage_rows"] == 1
        assert audit["balance"] == 0
        with pytest.raises(ValueError, match="costs 7"):  # a row that disagrees with its settle is a bug
            await service.apply(Settle("s3", "h2", 8), usage_row("s3", tenant, 7))
        service.close()

    asyncio.run(scenario())


def test_metrics_count_committed_rows_and_holds_and_survive_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        service = LedgerService(tmp_path / "ledger-0.duckdb", FakeClock())
        tenant = (await service.create_tenant("acme")).tenant_id
        await service.apply(GrantCredits("g", tenant, 10_000))
        await service.apply(Hold("h1", tenant, 600, 60))
        await service.apply(Settle("s1", "h1", 500), usage_row("s1", tenant, 500))
        await service.apply(Hold("lease-public-x-1", tenant, 900, 60))  # a credit lease, still open
        await service.record(usage_row("c1", tenant, 0))  # contract billing: a row, no money
        usage, gauges = service.metrics(3)
        assert usage.requests[("public", "m", "ok")] == 2 and usage.micro_credits[tenant] == 500
        assert (gauges.shard, gauges.open_holds, gauges.open_leases, gauges.held_micro_credits) == (3, 1, 1, 900)
        assert sum(gauges.commit_seconds.counts) >= 5  # one group commit per awaited call here
        service.close()
        restarted = LedgerService(tmp_path / "ledger-0.duckdb", FakeClock())
        assert restarted.metrics(3)[0] == usage  # seeded from the file: counters never go back
        restarted.close()

    asyncio.run(scenario())


def test_a_failed_replay_after_a_failed_commit_fails_every_caller_and_refuses_the_rest(tmp_path: Path) -> None:
    broken: list[str] = []
    store = FakeFailingStore(good_loads=1)

    async def scenario() -> None:
        service = LedgerService(
            tmp_path / "ledger-0.duckdb", FakeClock(), store=store, on_broken=lambda: broken.append("restart")
        )  # type: ignore[arg-type]
        calls = [asyncio.ensure_future(service.apply(CreateTenant(f"c{i}", f"t{i}", "T"))) for i in range(3)]
        done, hanging = await asyncio.wait(calls, timeout=60)  # a guard: before the fix they hung for ever
        assert not hanging
        assert all(isinstance(call.exception(), LedgerUnavailable) for call in calls)
        assert broken == ["restart"] and store.commits == 1
        # No empty ledger answers anyone: every later call raises at once.
        with pytest.raises(LedgerUnavailable, match="replay"):
            await service.apply(CreateTenant("c9", "t9", "T"))
        with pytest.raises(LedgerUnavailable):
            await service.record(usage_row("r", "t0", 0))
        with pytest.raises(LedgerUnavailable):
            service.check_usable()
        assert store.commits == 1

    asyncio.run(scenario())


def test_a_broken_ledger_actor_exits_its_process_so_that_ray_restarts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exits: list[int] = []
    monkeypatch.setattr(actors.ledger.os, "_exit", exits.append)
    monkeypatch.setattr(TenantLedgerActor, "EXIT_DELAY_S", 0)

    async def scenario() -> None:
        actor = TenantLedgerActor(str(tmp_path / "ledger-0.duckdb"))
        actor.service.close()
        actor.service._store = FakeFailingStore(good_loads=0)  # type: ignore[assignment]
        with pytest.raises(LedgerUnavailable):
            await actor.call("create_tenant", "acme")
        with pytest.raises(LedgerUnavailable):  # reads too: the ledger in memory is ahead of its file
            await actor.call("tenant_list")
        for _ in range(3):
            await asyncio.sleep(0)
        assert exits == [1]
        assert actor._ticker is not None
        actor._ticker.cancel()

    asyncio.run(scenario())


def test_a_usage_report_in_progress_does_not_hold_up_holds_and_settles(tmp_path: Path) -> None:
    store = FakeSlowUsageStore(tmp_path / "ledger-0.duckdb")
    events: list[str] = []

    async def scenario() -> None:
        service = LedgerService(tmp_path / "ledger-0.duckdb", FakeClock(), store=store)
        tenant = (await service.create_tenant("acme")).tenant_id
        await service.apply(GrantCredits("g", tenant, 1_000))
        report = asyncio.ensure_future(service.usage(tenant, None, None, "day"))
        assert await asyncio.to_thread(store.report_started.wait, 60)
        events.append("report started")
        assert (await service.apply(Hold("h", tenant, 100, 60))).ok
        events.append("hold committed")
        assert (await service.apply(Settle("s", "h", 40), usage_row("s", tenant, 40))).ok
        events.append("settle committed")
        events.append("report running" if not report.done() else "report done")
        store.let_report_finish.set()
        assert (await report).totals.cost_micro in (0, 40)
        events.append("report done")
        service.close()

    asyncio.run(scenario())
    assert events == ["report started", "hold committed", "settle committed", "report running", "report done"]


def test_revoke_tap_keys_revokes_that_taps_keys_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        service = LedgerService(tmp_path / "ledger-0.duckdb", FakeClock())
        tenant = (await service.create_tenant("acme")).tenant_id
        private = [service.create_key(tenant, "private-acme") for _ in range(2)]
        public = service.create_key(tenant, "public")
        assert service.revoke_tap_keys("private-acme") == 2
        assert service.revoke_tap_keys("private-acme") == 0
        for key_id, _ in private:  # type: ignore[misc]
            assert service.get_key(key_id).revoked_at == T0  # type: ignore[union-attr]
        assert service.get_key(public[0]).revoked_at is None  # type: ignore[index, union-attr]
        service.close()

    asyncio.run(scenario())


def test_admin_key_is_the_data_dirs_one_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    service = LedgerService(tmp_path / "ledger-0.duckdb", FakeClock())
    key = service.admin_key()
    assert key == load_or_create_admin_key(tmp_path) == service.admin_key()
    assert (tmp_path / "admin_key").read_text().strip() == key
    service.close()


def test_a_usage_row_without_money_is_written_once_however_often_it_is_retried(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.duckdb", FakeClock()
    service = LedgerService(path, clock=clock)
    tenant = asyncio.run(service.create_tenant("Acme")).tenant_id
    row = usage_row("chatcmpl-" + "c" * 32, tenant, 0)

    async def twice() -> list[Result]:  # the retry arrives while the first is still on its way to the file
        return await asyncio.gather(service.record(row), service.record(row))

    first, again = asyncio.run(twice())
    assert (first.code, again.code) == (Code.OK, Code.EXISTS)
    service.close()
    service = LedgerService(path, clock=clock)  # a restart: the retry of a lost reply still finds it
    assert asyncio.run(service.record(row)).code is Code.EXISTS
    assert asyncio.run(service.record(usage_row("r-unknown", "t-nobody", 0))).code is Code.TENANT_NOT_FOUND
    assert service.audit()["usage_rows"] == 1
    service.close()


def test_a_restart_loads_the_snapshot_and_replays_only_the_ops_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, clock = tmp_path / "ledger.duckdb", FakeClock()
    service = LedgerService(path, clock=clock, snapshot_every=10)
    tenant = asyncio.run(service.create_tenant("Acme")).tenant_id
    asyncio.run(service.apply(GrantCredits("g", tenant, 10**6)))
    for i in range(14):  # snapshots after op 10 (then the last 6 ops are only in the log)
        asyncio.run(service.apply(Hold(f"h{i}", tenant, 100, 60)))
        if i % 2:
            asyncio.run(service.apply(Settle(f"s{i}", f"h{i}", 40), usage_row(f"r{i}", tenant, 40)))
    state = service._ledger.account(tenant), service._ledger.open_holds()
    service.close()
    seq = Store(path).load_snapshot()[0]  # type: ignore[index]
    assert 0 < seq < 23
    replayed = []
    real_replay = Ledger.replay
    monkeypatch.setattr(Ledger, "replay", lambda self, ops: replayed.append(n := real_replay(self, ops)) or n)
    service = LedgerService(path, clock=clock)
    assert replayed == [23 - seq] and (service._ledger.account(tenant), service._ledger.open_holds()) == state
    assert asyncio.run(service.apply(Settle("s1", "h1", 40))).code is Code.EXISTS  # its memory came back too
    service.close()
    monkeypatch.setattr(snapshot, "CODE", "other-code")  # an upgrade: the snapshot is ignored
    service = LedgerService(path, clock=clock)
    assert replayed[-1] == 23 and (service._ledger.account(tenant), service._ledger.open_holds()) == state
    service.close()


def test_a_snapshot_aside_holds_the_state_of_its_fork_while_the_loop_commits_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """snapshot_aside (the ledger actor's): a forked child pickles the ledger; ops applied and committed
    while it does are not in the snapshot, which says so by its seq, and a restart replays them."""
    path, clock = tmp_path / "ledger.duckdb", FakeClock()
    slow_dumps = snapshot.dumps

    def dumps_slowly(ledger: Ledger) -> bytes:  # runs in the child: the parent commits meanwhile
        time.sleep(0.3)
        return slow_dumps(ledger)

    monkeypatch.setattr(snapshot, "dumps", dumps_slowly)

    async def scenario() -> tuple[int, Any, Any]:
        service = LedgerService(path, clock=clock, snapshot_every=10, snapshot_aside=True)
        tenant = (await service.create_tenant("Acme")).tenant_id
        await service.apply(GrantCredits("g", tenant, 10**6))
        for i in range(8):  # the 10th op forks a snapshot
            await service.apply(Hold(f"h{i}", tenant, 100, 60))
        assert service._snapshotting is not None and not service._snapshotting.done()
        forked_at = service._store.next_seq
        t0 = time.perf_counter()
        for i in range(8, 14):  # committed while the child pickles
            await service.apply(Hold(f"h{i}", tenant, 100, 60))
        assert time.perf_counter() - t0 < 0.25  # the loop did not wait for the pickling
        await service.snapshot_done()
        found = service._store.load_snapshot()
        assert found is not None and found[0] == forked_at
        state = service._ledger.account(tenant), service._ledger.open_holds()
        service.close()
        return found[0], *state

    seq, account, holds = asyncio.run(scenario())
    monkeypatch.setattr(snapshot, "dumps", slow_dumps)
    replayed = []
    real_replay = Ledger.replay
    monkeypatch.setattr(Ledger, "replay", lambda self, ops: replayed.append(n := real_replay(self, ops)) or n)
    service = LedgerService(path, clock=clock)
    assert replayed == [16 - seq] and replayed[0] >= 6  # the ops after the fork, from the log
    assert (service._ledger.account(account.tenant_id), service._ledger.open_holds()) == (account, holds)
    service.close()


def test_keys_are_stored_as_hmacs_with_the_pepper_kept_beside_the_file(tmp_path: Path) -> None:
    service = LedgerService(tmp_path / "ledger.duckdb")
    tenant = asyncio.run(service.create_tenant("Acme")).tenant_id
    made = service.create_key(tenant)
    assert made is not None
    key_id, raw = made
    record = service.get_key(key_id)
    assert record is not None and record.secret_hash.startswith("p1$")
    assert verify(raw, record.secret_hash, service.key_pepper()) and not verify(raw, record.secret_hash)
    service.close()
    assert raw.encode() not in (tmp_path / "ledger.duckdb").read_bytes()
    assert service.key_pepper().hex().encode() not in (tmp_path / "ledger.duckdb").read_bytes()

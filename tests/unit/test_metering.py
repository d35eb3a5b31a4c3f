"""Metering over fake ledgers (named as such): admission on a lease, by a hold of its own or 402; settles retried with
the same op id, and the drain at shutdown."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from actors.ledger import LedgerUnavailable
from orch.billing import Principal
from orch.engine import Delta
from orch.errors import InsufficientCredits
from orch.lease import Leases
from orch.ledger import Code, Op, Price, Release, Result, Settle
from orch.metering import Admission, Meter, Settler
from orch.store import UsageRow


class FakeLedger:
    """Stands in for LedgerClient: fails the first ``failures`` calls with LedgerUnavailable, then
    commits; a repeated op id is answered with its first result (as the real ledger does)."""

    def __init__(self, failures: int = 0, delay_s: float = 0.0) -> None:
        self.failures = failures
        self.delay_s = delay_s
        self.calls = 0
        self.committed: dict[str, tuple[Op, UsageRow | None]] = {}
        self.recorded: list[UsageRow] = []

    async def apply(self, tenant_id: str, op: Op, usage: UsageRow | None = None) -> Result:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.failures > 0:
            self.failures -= 1
            raise LedgerUnavailable("ledger shard 0 unavailable")
        if op.op_id in self.committed:
            return Result(Code.EXISTS, op.op_id, datetime.now(UTC), tenant_id)
        self.committed[op.op_id] = (op, usage)
        return Result(Code.OK, op.op_id, datetime.now(UTC), tenant_id)

    async def tenant_call(self, tenant_id: str, method: str, *args: Any) -> Any:
        assert method == "record"
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise LedgerUnavailable("ledger shard 0 unavailable")
        self.recorded.append(args[0])


class FakeSleep:
    """Records backoff delays instead of sleeping them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _meter(hold_id: str | None = "hold-cmpl-1") -> Meter:
    meter = Meter(Principal("t-1", "k" * 16, "public"), "m", Price(1_000_000, 2_000_000), "cmpl-1", hold_id, 1_000)
    meter.last = Delta("hi", 10, 5, "stop")
    return meter


def test_a_failed_settle_is_retried_with_the_same_op_id_until_it_commits_once() -> None:
    ledger, sleep = FakeLedger(failures=5), FakeSleep()
    settler = Settler(ledger, "public", sleep=sleep)

    async def scenario() -> None:
        await settler.settle(_meter(), "ok")

    asyncio.run(scenario())
    assert ledger.calls == 6
    assert list(ledger.committed) == ["settle-cmpl-1"]
    op, row = ledger.committed["settle-cmpl-1"]
    assert op == Settle("settle-cmpl-1", "hold-cmpl-1", 20) and row is not None and row.cost_micro == 20
    assert sleep.delays == sorted(sleep.delays) and len(sleep.delays) == 5  # backs off


def test_a_settle_gives_up_only_after_its_retry_bound() -> None:
    ledger, sleep = FakeLedger(failures=10**9), FakeSleep()
    now = [0.0]

    async def advancing_sleep(seconds: float) -> None:
        await sleep(seconds)
        now[0] += seconds

    settler = Settler(ledger, "public", retry_s=600.0, sleep=advancing_sleep, clock=lambda: now[0])

    async def scenario() -> None:
        await settler.settle(_meter(), "ok")

    asyncio.run(scenario())
    assert ledger.committed == {} and 570 <= sum(sleep.delays) <= 600
    assert max(sleep.delays) <= 30.0


def test_contract_usage_rows_are_retried_too() -> None:
    ledger = FakeLedger(failures=2)

    async def scenario() -> None:
        await Settler(ledger, "public", sleep=FakeSleep()).settle(_meter(hold_id=None), "ok")

    asyncio.run(scenario())
    assert [r.request_id for r in ledger.recorded] == ["cmpl-1"]


def test_settle_is_idempotent_per_request() -> None:
    ledger = FakeLedger()
    settler = Settler(ledger, "public")
    meter = _meter()

    async def scenario() -> None:
        first = settler.settle(meter, "ok")
        assert settler.settle(meter, "aborted") is first
        await first

    asyncio.run(scenario())
    assert ledger.calls == 1


def test_an_observer_sees_each_settled_row_once_and_its_failure_never_stops_the_charge() -> None:
    """The tap's post_call hooks observe settles this way (orch/hooks.py)."""
    ledger, seen = FakeLedger(), []

    def observe(meter: Meter, row: UsageRow) -> None:
        seen.append(row)
        raise RuntimeError("an observer that fails")

    settler = Settler(ledger, "public", observe=observe)

    async def scenario() -> None:
        meter = _meter()
        await settler.settle(meter, "ok")
        await settler.settle(meter, "ok")  # idempotent: observed once

    asyncio.run(scenario())
    (op, row) = ledger.committed["settle-cmpl-1"]
    assert seen == [row] and row is not None and row.cost_micro == op.micro_credits == 20  # type: ignore[attr-defined]


def test_drain_waits_for_pending_settles_and_releases() -> None:
    ledger = FakeLedger(failures=3)
    settler = Settler(ledger, "public", sleep=lambda s: asyncio.sleep(0.01))

    async def scenario() -> int:
        settler.settle(_meter(), "aborted")
        settler.release("t-1", "hold-cmpl-2")
        assert settler.pending == 2
        return await settler.drain(timeout_s=60)

    assert asyncio.run(scenario()) == 0
    assert set(ledger.committed) == {"settle-cmpl-1", "release-hold-cmpl-2"}
    assert isinstance(ledger.committed["release-hold-cmpl-2"][0], Release)


def test_drain_gives_up_at_its_timeout_and_says_how_many_were_left() -> None:
    ledger = FakeLedger(failures=10**9)
    settler = Settler(ledger, "public", sleep=lambda s: asyncio.sleep(0.01))

    async def scenario() -> int:
        settler.settle(_meter(), "ok")
        return await settler.drain(timeout_s=0.1)

    assert asyncio.run(scenario()) == 1


def test_a_late_settle_of_an_expired_hold_is_logged_as_a_warning_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class LateLedger(FakeLedger):
        async def apply(self, tenant_id: str, op: Op, usage: UsageRow | None = None) -> Result:
            self.calls += 1
            return Result(Code.OK, op.op_id, datetime.now(UTC), tenant_id, micro_credits=7, late=True)

    ledger = LateLedger()

    async def scenario() -> None:
        await Settler(ledger, "public").settle(_meter(), "ok")

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(scenario())
    assert ledger.calls == 1
    levels = [r.levelno for r in caplog.records]
    assert logging.WARNING in levels and logging.ERROR not in levels
    assert "7 of 20" in caplog.text


def test_overhead_is_the_time_outside_the_engine_and_never_negative() -> None:
    import time

    meter = Meter(Principal("t", "k", "public"), "m", Price(0, 0), "r", None, t0=time.monotonic() - 0.200)
    assert 200.0 <= meter.overhead_ms() < 1000.0  # no delta yet: all of it is the tap's
    meter.last = Delta("Hi", 3, 1, engine_ms=150.0)
    assert 50.0 <= meter.overhead_ms() < 850.0
    meter.last = Delta("Hi", 3, 1, engine_ms=10_000.0)  # clocks of two processes: never below zero
    assert meter.overhead_ms() == 0.0


# ---- Admission: lease, direct hold, 402, a client gone while its hold commits ----


def _admission(grant: int, leases: bool = True):  # type: ignore[no-untyped-def]
    from tests.unit.test_lease import FAST, FakeLeaseLedger

    ledger = FakeLeaseLedger(grant)
    lease_set = Leases(ledger, "public", FAST) if leases else None
    settler = Settler(ledger, "public", leases=lease_set)
    return ledger, settler, Admission(ledger, settler, lease_set, hold_timeout_s=60)


PRINCIPAL = Principal("t-1", "k" * 16, "public")
PRICE = Price(1_000_000, 2_000_000)


def test_admission_uses_the_lease_then_settles_into_its_batch() -> None:
    ledger, settler, admission = _admission(10_000)

    async def scenario() -> None:
        meter = await admission.admit(PRINCIPAL, "m", PRICE, "cmpl-1", 100, why="test")
        assert meter.lease is not None and meter.hold_id is None and meter.held == 100
        meter.last = Delta("hi", 10, 5, "stop")
        await settler.settle(meter, "ok")  # at once: the cost joined the lease's batch
        await asyncio.sleep(0.1)
        assert [(r.request_id, r.cost_micro) for r in ledger.rows] == [("cmpl-1", 20)]

    asyncio.run(scenario())
    ledger.check(10_000)


def test_admission_falls_back_to_a_hold_of_its_own_and_402_says_what_is_free() -> None:
    ledger, settler, admission = _admission(1_000, leases=False)

    async def scenario() -> None:
        meter = await admission.admit(PRINCIPAL, "m", PRICE, "cmpl-1", 600, why="test")
        assert meter.lease is None and meter.hold_id == "hold-cmpl-1"
        assert ledger.account().held == 600
        with pytest.raises(InsufficientCredits) as refused:
            await admission.admit(PRINCIPAL, "m", PRICE, "cmpl-2", 600, why="a prompt of at most 9 tokens")
        assert "up to 600 micro-credits (a prompt of at most 9 tokens); 400 micro-credits are free" in str(
            refused.value
        )
        meter.last = Delta("hi", 10, 5, "stop")
        await settler.settle(meter, "ok")

    asyncio.run(scenario())
    assert ledger.account().held == 0 and ledger.account().balance == 1_000 - 20
    ledger.check(1_000)


def test_a_request_the_lease_cannot_cover_takes_a_direct_hold_when_the_balance_can() -> None:
    ledger, settler, admission = _admission(1_000)

    async def scenario() -> None:
        small = await admission.admit(PRINCIPAL, "m", PRICE, "cmpl-1", 100, why="test")
        assert small.lease is not None
        big = await admission.admit(PRINCIPAL, "m", PRICE, "cmpl-2", 900, why="test")  # lease grows to 1000
        assert big.lease is small.lease and small.lease.in_flight == 1_000
        with pytest.raises(InsufficientCredits):
            await admission.admit(PRINCIPAL, "m", PRICE, "cmpl-3", 1, why="test")
        for meter in (small, big):
            meter.last = Delta("hi", 1, 1, "stop")
            settler.settle(meter, "ok")
        await asyncio.sleep(0.6)

    asyncio.run(scenario())
    assert ledger.account().held == 0 and ledger.account().balance == 1_000 - 6
    ledger.check(1_000)


def test_a_hold_whose_client_left_is_released_once_it_commits() -> None:
    ledger, settler, admission = _admission(1_000, leases=False)
    ledger.delay_s = 0.05

    async def scenario() -> None:
        task = asyncio.ensure_future(admission.admit(PRINCIPAL, "m", PRICE, "cmpl-1", 600, why="test"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        assert await settler.drain(5) == 0

    asyncio.run(scenario())
    assert ledger.account().held == 0 and ledger.account().balance == 1_000

"""Credit leases (orch.lease) over the real in-memory Ledger behind a fake ledger seam (named as such:
no Ray, no DuckDB): local admission, batched settles with their usage rows, top-ups, returns, expiry,
retries, and the money invariants after each."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from actors.ledger import LedgerUnavailable
from orch.billing import Principal
from orch.engine import Delta
from orch.lease import Lease, Leases, LeaseSettings
from orch.ledger import Code, CreateTenant, ExpireHolds, GrantCredits, Hold, Ledger, Op, Price, Result, Settle
from orch.metering import Meter, Settler
from orch.renewal import Renewal, Renewed, apply_renewal
from orch.usage_log import UsageRow
from orch.usage_log import rows as usage_rows

T = "t-1"
FAST = LeaseSettings(flush_s=0.01, idle_s=0.2, retry_s=0.01, top_up_every_s=0.01)


class FakeLeaseLedger:
    """Stands in for LedgerClient.renew: the real Ledger, applied as the ledger actor does; records the
    ops and usage rows it would commit. ``fail`` next calls raise LedgerUnavailable; with ``lose_reply``
    they are applied first (a commit whose answer never arrived)."""

    def __init__(self, grant: int) -> None:
        self.now = datetime(2026, 11, 27, tzinfo=UTC)
        self.ledger = Ledger(clock=lambda: self.now)
        self.ledger.apply(CreateTenant("c", T, "acme"))
        self.ledger.apply(GrantCredits("g", T, grant))
        self.calls: list[Renewal] = []
        self.rows: list[UsageRow] = []
        self.debited = 0
        self.fail = 0
        self.lose_reply = False
        self.delay_s = 0.0

    async def renew(self, tenant_id: str, renewal: Renewal) -> Renewed:
        self.calls.append(renewal)
        await asyncio.sleep(self.delay_s)
        if self.fail and not self.lose_reply:
            self.fail -= 1
            raise LedgerUnavailable("ledger shard 0 unavailable")
        renewed, done = apply_renewal(self.ledger, renewal)
        for op, _result, rows in done:
            self.rows.extend(usage_rows(rows))  # as the gateway sent them: Arrow
            if isinstance(op, Settle):
                self.debited += _result.micro_credits
        if self.fail:
            self.fail -= 1
            raise LedgerUnavailable("reply lost")
        return renewed

    async def apply(self, tenant_id: str, op: Op, usage: UsageRow | None = None) -> Result:
        """A direct hold or settle (LedgerClient.apply), on the same Ledger."""
        await asyncio.sleep(self.delay_s)
        result = self.ledger.apply(op)
        if isinstance(op, Settle) and result.code is Code.OK:
            self.debited += result.micro_credits
            self.rows.extend([usage] if usage is not None else [])
        return result

    async def tenant_call(self, tenant_id: str, method: str, *args: Any) -> Any:
        raise AssertionError(f"not used here: {method}")

    def account(self):  # type: ignore[no-untyped-def]
        return self.ledger.account(T)

    def check(self, grant: int) -> None:
        """Σ usage cost == Σ debits == grant − balance, and the ledger's own invariants."""
        self.ledger.check_invariants()
        a = self.account()
        assert sum(r.cost_micro for r in self.rows) == self.debited == a.spent == grant - a.balance - a.held


def row(request_id: str, cost: int = 0) -> UsageRow:
    return UsageRow(request_id, datetime.now(UTC), T, "k", "public", "m", 1, 1, cost, 1, 1, "ok", "stop")


async def settle_soon(leases: Leases) -> None:
    await asyncio.sleep(FAST.flush_s * 10)


def test_first_request_takes_a_lease_then_admission_needs_no_round_trip() -> None:
    ledger = FakeLeaseLedger(10_000)
    leases = Leases(ledger, "public", FAST)

    async def scenario() -> None:
        first = await leases.admit(T, 100)
        assert first is not None and len(ledger.calls) == 1
        others = [leases.try_admit(T, 100) for _ in range(3)]  # no await at all
        assert all(lease is first for lease in others)
        assert len(ledger.calls) == 1
        assert ledger.account().held == first.held >= 100
        first.check()

    asyncio.run(scenario())


def test_finished_requests_settle_in_one_batch_with_their_usage_rows() -> None:
    ledger = FakeLeaseLedger(10_000)
    leases = Leases(ledger, "public", FAST)

    async def scenario() -> None:
        lease = await leases.admit(T, 100)
        assert lease is not None and leases.try_admit(T, 100) is lease
        leases.finish(lease, 100, row("a", 30))
        leases.finish(lease, 100, row("b", 45))
        lease.check()
        await settle_soon(leases)
        settles = [c.settle for c in ledger.calls if c.settle is not None]
        assert [s.micro_credits for s in settles if s.micro_credits] == [75]  # both in one Settle
        assert [r.request_id for r in ledger.rows] == ["a", "b"]
        ledger.check(10_000)
        await asyncio.sleep(FAST.idle_s * 3)  # idle: returned
        assert ledger.account().held == 0 and ledger.account().balance == 10_000 - 75
        ledger.check(10_000)

    asyncio.run(scenario())


def test_a_storm_never_overspends_and_every_cost_is_a_usage_row() -> None:
    grant = 2_000
    ledger = FakeLeaseLedger(grant)
    ledger.delay_s = 0.002
    leases = Leases(ledger, "public", FAST)
    rng = random.Random(7)
    admitted = []

    async def one(i: int) -> None:
        await asyncio.sleep(rng.random() * 0.05)
        lease = await leases.admit(T, 100)
        if lease is None:
            return
        admitted.append(i)
        lease.check()
        assert ledger.account().balance >= 0
        await asyncio.sleep(rng.random() * 0.02)
        leases.finish(lease, 100, row(f"r{i}", rng.randrange(0, 101)))

    async def scenario() -> None:
        await asyncio.gather(*(one(i) for i in range(300)))
        await asyncio.sleep(FAST.idle_s * 3)

    asyncio.run(scenario())
    assert 10 <= len(admitted) < 300  # how many fit depends on timing: a loaded machine admits fewer
    assert sorted(r.request_id for r in ledger.rows) == sorted(f"r{i}" for i in admitted)
    assert ledger.account().held == 0
    ledger.check(grant)


def test_a_lease_grows_with_demand_and_falls_back_when_the_balance_cannot() -> None:
    ledger = FakeLeaseLedger(1_000)
    leases = Leases(ledger, "public", FAST)

    async def scenario() -> None:
        lease = await leases.admit(T, 100)
        assert lease is not None
        first = lease.held
        running = [lease] + [await leases.admit(T, 100) for _ in range(8)]
        assert all(r is lease for r in running) and lease.held > first  # topped up on the way
        assert lease.held <= 1_000 and lease.in_flight == 900
        assert await leases.admit(T, 200) is None  # 900 running + 200 > 1000: a direct hold would say 402
        assert leases.free(T) == lease.held - 900
        for i in range(9):
            leases.finish(lease, 100, row(f"r{i}", 10))
        lease.check()

    asyncio.run(scenario())


def test_a_failed_renewal_is_retried_with_the_same_ops_and_charges_once() -> None:
    ledger = FakeLeaseLedger(10_000)
    leases = Leases(ledger, "public", FAST)

    async def scenario() -> None:
        lease = await leases.admit(T, 100)
        assert lease is not None
        ledger.fail, ledger.lose_reply = 2, True  # applied, but the answers never came back
        leases.finish(lease, 100, row("a", 60))
        await asyncio.sleep(0.3)
        assert ledger.fail == 0
        sent = [c for c in ledger.calls if c.usage]
        assert len(sent) == 3 and sent[0] == sent[1] == sent[2]  # the same renewal, op ids and rows
        assert [r.request_id for r in ledger.rows] == ["a"]  # written once
        lease.check()
        await asyncio.sleep(FAST.idle_s * 3)
        ledger.check(10_000)
        assert ledger.account().held == 0 and ledger.account().balance == 10_000 - 60

    asyncio.run(scenario())


def test_a_dead_replicas_lease_expires_back_into_the_balance() -> None:
    ledger = FakeLeaseLedger(10_000)
    leases = Leases(ledger, "public", LeaseSettings(ttl_s=30))

    async def scenario() -> None:
        lease = await leases.admit(T, 500)
        assert lease is not None and ledger.account().held >= 500
        leases._closed = True  # the replica is gone: nothing renews or settles any more

    asyncio.run(scenario())
    ledger.now += timedelta(seconds=31)
    assert ledger.ledger.apply(ExpireHolds("x")).code is Code.OK
    assert ledger.account().held == 0 and ledger.account().balance == 10_000  # its request went uncharged


def test_admission_stops_before_the_lease_hold_can_expire() -> None:
    ledger = FakeLeaseLedger(10_000)
    now = [1000.0]
    leases = Leases(ledger, "public", LeaseSettings(ttl_s=32), clock=lambda: now[0])  # margin: 8 s

    async def scenario() -> None:
        lease = await leases.admit(T, 100)
        assert lease is not None
        now[0] += 23.5  # not renewed (no loop tick ran): still admits
        assert leases.try_admit(T, 100) is lease
        now[0] += 1.0  # 32 - 8 s after the renewal that took it was sent
        assert leases.try_admit(T, 100) is None

    asyncio.run(scenario())


def test_close_settles_and_returns_every_lease() -> None:
    ledger = FakeLeaseLedger(10_000)
    leases = Leases(ledger, "public", LeaseSettings(flush_s=10, idle_s=60))

    async def scenario() -> int:
        lease = await leases.admit(T, 100)
        assert lease is not None
        leases.finish(lease, 100, row("a", 42))
        left = await leases.close(timeout_s=5)
        assert await leases.admit(T, 100) is None  # closed: requests take direct holds
        return left

    assert asyncio.run(scenario()) == 0
    assert ledger.account().held == 0 and ledger.account().balance == 10_000 - 42
    ledger.check(10_000)


def test_a_renewal_frees_the_old_hold_before_taking_the_next() -> None:
    """The Settle's freed credit is there for the next Hold: a lease as large as the balance renews."""
    ledger = Ledger(clock=lambda: datetime(2026, 11, 27, tzinfo=UTC))
    ledger.apply(CreateTenant("c", T, "acme"))
    ledger.apply(GrantCredits("g", T, 1_000))
    assert ledger.apply(Hold("l1", T, 1_000, 30)).code is Code.OK
    renewed, done = apply_renewal(ledger, Renewal(T, Settle("s1", "l1", 10), (row("a", 10),), "l2", (990,), 30))
    assert renewed.hold is not None and renewed.hold.code is Code.OK and renewed.hold.micro_credits == 990
    assert [type(op).__name__ for op, _, _ in done] == ["Settle", "Hold"]
    again, redone = apply_renewal(ledger, Renewal(T, Settle("s1", "l1", 10), (row("a", 10),), "l2", (990,), 30))
    assert again.hold is not None and again.hold.ok and again.hold.micro_credits == 990 and redone == []
    with pytest.raises(ValueError):
        apply_renewal(ledger, Renewal(T, Settle("s2", "l2", 10), (row("b", 9),), None, (), 30))


def test_a_renewal_larger_than_the_balance_takes_all_that_is_free() -> None:
    """Bounded by the balance, not refused: a lease asking past it gets what is free, so two replicas'
    leases strand less than one request's worth each (never a whole tier of the amounts asked)."""
    ledger = Ledger(clock=lambda: datetime(2026, 11, 27, tzinfo=UTC))
    ledger.apply(CreateTenant("c", T, "acme"))
    ledger.apply(GrantCredits("g", T, 1_000))
    assert ledger.apply(Hold("other", T, 333, 30)).code is Code.OK  # another replica's lease
    renewed, done = apply_renewal(ledger, Renewal(T, None, (), "l1", (5_000, 800, 700), 30))
    assert renewed.hold is not None and renewed.hold.code is Code.OK and renewed.hold.micro_credits == 667
    assert [type(op).__name__ for op, _, _ in done] == ["Hold"] and ledger.account(T).balance == 0
    nothing, none_done = apply_renewal(ledger, Renewal(T, None, (), "l2", (10,), 30))
    assert nothing.hold is not None and nothing.hold.code is Code.INSUFFICIENT_CREDITS and none_done == []


def test_a_lease_meter_is_settled_in_the_lease_batch_without_a_ledger_call() -> None:
    ledger = FakeLeaseLedger(10_000)
    leases = Leases(ledger, "public", FAST)

    class NoLedger:  # the Settler must not call the ledger itself for a lease's meter
        async def apply(self, *args: object) -> None:
            raise AssertionError("called")

        async def tenant_call(self, *args: object) -> None:
            raise AssertionError("called")

    async def scenario() -> None:
        settler = Settler(NoLedger(), "public", leases=leases)  # type: ignore[arg-type]
        lease = await leases.admit(T, 1_000)
        assert isinstance(lease, Lease)
        meter = Meter(Principal(T, "k" * 16, "public"), "m", Price(1_000_000, 2_000_000), "cmpl-1", None, 1_000,
                      lease=lease)  # fmt: skip
        meter.last = Delta("hi", 10, 5, "stop")
        done = settler.settle(meter, "ok")
        assert not done.done() and lease.unflushed == 20 and lease.in_flight == 0
        await done  # the request's last bytes wait for its row's batch: committed when this is done
        assert [(r.request_id, r.cost_micro) for r in ledger.rows] == [("cmpl-1", 20)]

    asyncio.run(scenario())


def test_a_finished_request_is_done_once_its_row_is_committed_at_once_or_right_after_the_renewal_out() -> None:
    ledger = FakeLeaseLedger(100_000)
    leases = Leases(ledger, "public", LeaseSettings(flush_s=10, idle_s=60, durable_wait_s=5))  # no timed flush

    async def scenario() -> None:
        lone = await leases.admit(T, 100)
        assert lone is not None
        calls = len(ledger.calls)
        done = leases.finish(lone, 100, row("lone", 10))
        await asyncio.wait_for(done, 0.5)  # its own renewal, at once
        assert len(ledger.calls) == calls + 1 and [r.request_id for r in ledger.rows] == ["lone"]
        running = [await leases.admit(T, 100) for _ in range(4)]
        assert all(running)
        ledger.delay_s = 0.05  # a renewal is out while more requests end
        first = leases.finish(running[0], 100, row("r0", 10))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        calls = len(ledger.calls)
        ended = [leases.finish(lease, 100, row(f"r{i}", 10)) for i, lease in enumerate(running[1:3], 1) if lease]
        await asyncio.sleep(0)
        assert not first.done() and not any(f.done() for f in ended) and len(ledger.calls) == calls  # wait
        await asyncio.wait_for(first, 1.0)
        assert not any(f.done() for f in ended)  # their rows were not in that renewal
        await asyncio.wait_for(asyncio.gather(*ended), 1.0)  # the next one, sent as it returned: one more call
        assert len(ledger.calls) == calls + 1 and {"r0", "r1", "r2"} <= {r.request_id for r in ledger.rows}
        assert running[3] is not None
        await leases.finish(running[3], 100, row("r3", 10))
        await leases.close(1.0)
        ledger.check(100_000)

    asyncio.run(scenario())


def test_a_ledger_that_does_not_answer_holds_a_request_end_at_most_durable_wait_s() -> None:
    ledger = FakeLeaseLedger(100_000)
    leases = Leases(ledger, "public", LeaseSettings(flush_s=0.01, retry_s=0.01, durable_wait_s=0.2))

    async def scenario() -> None:
        lease = await leases.admit(T, 100)
        assert lease is not None
        ledger.fail = 10**6  # every renewal from now on fails
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(leases.finish(lease, 100, row("a", 10)), 1.0)
        assert 0.15 <= asyncio.get_running_loop().time() - t0 < 1.0
        assert ledger.rows == []  # not committed: the row is still in the retried batch
        ledger.fail = 0
        await asyncio.sleep(0.1)
        assert [r.request_id for r in ledger.rows] == ["a"]  # the retry committed it, once
        await leases.close(1.0)

    asyncio.run(scenario())


def test_without_durable_end_a_request_end_waits_for_nothing() -> None:
    ledger = FakeLeaseLedger(100_000)
    leases = Leases(ledger, "public", LeaseSettings(flush_s=0.01, durable_end=False))

    async def scenario() -> None:
        lease = await leases.admit(T, 100)
        assert lease is not None
        assert leases.finish(lease, 100, row("a", 10)).done() and ledger.rows == []
        await leases.close(1.0)
        assert [r.request_id for r in ledger.rows] == ["a"]

    asyncio.run(scenario())


def test_a_lease_taken_again_after_its_return_never_reuses_a_hold_id() -> None:
    """The second request doesn't fit what is left; a reused hold id would have found the first lease's
    hold (EXISTS) and admitted it on credit that is gone."""
    ledger = FakeLeaseLedger(501)
    leases = Leases(ledger, "public", FAST)

    async def scenario() -> None:
        lease = await leases.admit(T, 500)
        assert lease is not None
        leases.finish(lease, 500, row("a", 100))
        await asyncio.sleep(FAST.idle_s * 3)  # returned
        assert ledger.account().held == 0
        assert await leases.admit(T, 500) is None  # 401 left: a direct hold says 402
        hold_ids = [c.hold_id for c in ledger.calls if c.hold_id]
        assert len(hold_ids) == len(set(hold_ids))
        assert sum(1 for c in ledger.calls if c.settle is None) == 2  # one round trip for the refused request

    asyncio.run(scenario())
    ledger.check(501)


def test_a_lease_keeps_the_size_of_the_last_wave_so_the_next_one_needs_no_round_trip() -> None:
    ledger = FakeLeaseLedger(100_000)
    leases = Leases(ledger, "public", FAST)

    async def wave(tag: str) -> int:
        calls = len(ledger.calls)
        running = [await leases.admit(T, 100) for _ in range(32)]
        assert all(lease is not None for lease in running)
        for i, lease in enumerate(running):
            assert lease is not None
            leases.finish(lease, 100, row(f"{tag}{i}", 10))
        return len(ledger.calls) - calls

    async def scenario() -> None:
        assert await wave("a") >= 2  # the first wave grows the lease as it comes
        await asyncio.sleep(FAST.flush_s * 5)  # its batch settles; the lease stays as large as the wave
        assert await wave("b") == 0
        await asyncio.sleep(FAST.idle_s * 3)

    asyncio.run(scenario())
    assert ledger.account().held == 0 and len(ledger.rows) == 64
    ledger.check(100_000)

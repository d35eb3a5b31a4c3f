"""The money rules: burn order, expiry, holds, idempotency, rounding, and invariants under random ops."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import pytest

from orch.ledger import (
    MAX_HOLD_TIMEOUT_S,
    MAX_MICRO_CREDITS,
    MICRO,
    Code,
    CreateTenant,
    ExpireHolds,
    GrantCredits,
    Hold,
    Ledger,
    Op,
    Price,
    Release,
    Result,
    Settle,
    add_months,
    cost,
    grant_expiry,
    max_cost,
)

T0 = datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)
US = timedelta(microseconds=1)


class FakeClock:
    """A settable clock for the ledger: time moves only when a test says so."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now


def new_ledger(*grants: int, clock: FakeClock | None = None) -> tuple[Ledger, FakeClock]:
    clock = clock or FakeClock()
    ledger = Ledger(clock=clock)
    assert ledger.apply(CreateTenant("t-op", "acme", "Acme")).code is Code.OK
    for i, amount in enumerate(grants):
        assert ledger.apply(GrantCredits(f"grant-{i}", "acme", amount)).code is Code.OK
        clock.advance(days=1)
    return ledger, clock


def spent_by_grant(ledger: Ledger) -> dict[str, int]:
    return {g.grant_id: g.spent for g in ledger.account("acme").grants}


# ---- expiry ----


def test_grant_expires_exactly_twelve_calendar_months_after_grant() -> None:
    ledger, clock = new_ledger(MICRO)
    expires_at = ledger.account("acme").grants[0].expires_at
    assert expires_at == T0.replace(year=2026)
    assert ledger.account("acme", expires_at - US).balance == MICRO
    assert ledger.account("acme", expires_at).balance == 0
    assert ledger.account("acme", expires_at).grants[0].expired


def test_hold_succeeds_one_microsecond_before_expiry_and_fails_at_it() -> None:
    ledger, clock = new_ledger(MICRO)
    expires_at = grant_expiry(T0)
    assert ledger.apply(Hold("h1", "acme", 10, 60), expires_at - US).code is Code.OK
    refused = ledger.apply(Hold("h2", "acme", 10, 60), expires_at)
    assert refused.code is Code.INSUFFICIENT_CREDITS and refused.available == 0


def test_grant_expiry_clamps_feb_29_to_feb_28() -> None:
    assert grant_expiry(datetime(2024, 2, 29, 23, 59, tzinfo=UTC)) == datetime(2025, 2, 28, 23, 59, tzinfo=UTC)


def test_grant_expiry_keeps_day_of_month_and_time() -> None:
    assert grant_expiry(datetime(2025, 1, 31, 7, tzinfo=UTC)) == datetime(2026, 1, 31, 7, tzinfo=UTC)
    assert add_months(datetime(2025, 1, 31, tzinfo=UTC), 1) == datetime(2025, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2025, 11, 30, tzinfo=UTC), 3) == datetime(2026, 2, 28, tzinfo=UTC)


def test_expired_grant_forfeits_its_rest_but_a_hold_pinned_before_expiry_still_settles() -> None:
    ledger, clock = new_ledger(1000)
    clock.now = grant_expiry(T0) - timedelta(seconds=1)
    assert ledger.apply(Hold("h", "acme", 600, timeout_s=60)).code is Code.OK
    clock.advance(seconds=2)  # the grant has expired; the hold has not
    assert ledger.account("acme").balance == 0
    assert ledger.apply(Settle("s", "h", 500)).code is Code.OK
    assert spent_by_grant(ledger) == {"grant-0": 500}
    ledger.check_invariants()


# ---- burn order ----


def test_burn_order_is_earliest_expiry_first() -> None:
    ledger, clock = new_ledger(100, 100)  # grant-0 expires a day before grant-1
    assert ledger.apply(Hold("h", "acme", 30, 60)).code is Code.OK
    assert ledger.apply(Settle("s", "h", 30)).code is Code.OK
    assert spent_by_grant(ledger) == {"grant-0": 30, "grant-1": 0}


def test_hold_spanning_grants_debits_the_earliest_first_and_releases_the_rest() -> None:
    ledger, clock = new_ledger(100, 100)
    assert ledger.apply(Hold("h", "acme", 150, 60)).code is Code.OK
    grants = ledger.account("acme").grants
    assert [g.reserved for g in grants] == [100, 50]
    settled = ledger.apply(Settle("s", "h", 120))
    assert (settled.micro_credits, settled.released) == (120, 30)
    assert spent_by_grant(ledger) == {"grant-0": 100, "grant-1": 20}
    assert ledger.account("acme").balance == 80


def test_grants_sort_by_expiry_not_by_arrival() -> None:
    clock = FakeClock()
    ledger = Ledger(clock=clock)
    ledger.apply(CreateTenant("t", "acme", "Acme"))
    ledger.apply(GrantCredits("late", "acme", 100), T0 + timedelta(days=10))
    ledger.apply(GrantCredits("early", "acme", 100), T0)  # applied second, expires first
    ledger.apply(Hold("h", "acme", 10, 60), T0 + timedelta(days=11))
    ledger.apply(Settle("s", "h", 10), T0 + timedelta(days=11))
    assert spent_by_grant(ledger) == {"early": 10, "late": 0}


# ---- hold / settle / release ----


def test_hold_fails_when_balance_short() -> None:
    ledger, clock = new_ledger(100)
    refused = ledger.apply(Hold("h", "acme", 101, 60))
    assert refused.code is Code.INSUFFICIENT_CREDITS
    assert (refused.micro_credits, refused.available) == (101, 100)
    assert ledger.account("acme").held == 0
    # A refusal changed nothing and is not remembered: the same op_id may succeed after a grant.
    ledger.apply(GrantCredits("more", "acme", 1))
    assert ledger.apply(Hold("h", "acme", 101, 60)).code is Code.OK


def test_hold_reserves_and_settle_debits_actual_and_releases_the_rest() -> None:
    ledger, clock = new_ledger(1000)
    held = ledger.apply(Hold("h", "acme", 400, timeout_s=30))
    assert held.code is Code.OK and held.expires_at == clock.now + timedelta(seconds=30)
    account = ledger.account("acme")
    assert (account.balance, account.held, [h.hold_id for h in account.holds]) == (600, 400, ["h"])
    settled = ledger.apply(Settle("s", "h", 250))
    assert (settled.code, settled.tenant_id, settled.micro_credits, settled.released) == (Code.OK, "acme", 250, 150)
    account = ledger.account("acme")
    assert (account.balance, account.held, account.spent, account.holds) == (750, 0, 250, ())


def test_release_frees_the_whole_hold() -> None:
    ledger, clock = new_ledger(1000)
    ledger.apply(Hold("h", "acme", 400, 30))
    released = ledger.apply(Release("r", "h"))
    assert (released.code, released.released) == (Code.OK, 400)
    assert ledger.account("acme").balance == 1000


def test_settle_of_more_than_held_is_refused() -> None:
    ledger, clock = new_ledger(1000)
    ledger.apply(Hold("h", "acme", 400, 30))
    assert ledger.apply(Settle("s", "h", 401)).code is Code.SETTLE_EXCEEDS_HOLD
    assert ledger.apply(Settle("s", "h", 400)).code is Code.OK


def test_an_ended_hold_cannot_end_again() -> None:
    ledger, clock = new_ledger(1000)
    ledger.apply(Hold("h1", "acme", 10, 30))
    ledger.apply(Settle("s1", "h1", 5))
    assert ledger.apply(Settle("s2", "h1", 5)).code is Code.HOLD_SETTLED
    assert ledger.apply(Release("r1", "h1")).code is Code.HOLD_SETTLED
    ledger.apply(Hold("h2", "acme", 10, 30))
    ledger.apply(Release("r2", "h2"))
    assert ledger.apply(Settle("s3", "h2", 1)).code is Code.HOLD_RELEASED
    assert ledger.apply(Settle("s4", "nope", 1)).code is Code.HOLD_NOT_FOUND
    assert ledger.account("acme").spent == 5


def test_expire_holds_releases_a_timed_out_hold_and_a_release_after_it_is_refused() -> None:
    ledger, clock = new_ledger(1000)
    ledger.apply(Hold("h", "acme", 300, timeout_s=10))
    assert ledger.next_hold_expiry() == clock.now + timedelta(seconds=10)
    clock.advance(seconds=10)
    expired = ledger.apply(ExpireHolds("x1"))
    assert (expired.code, expired.hold_ids, expired.released) == (Code.OK, ("h",), 300)
    assert ledger.account("acme").balance == 1000 and ledger.next_hold_expiry() is None
    assert ledger.apply(Release("r", "h")).code is Code.HOLD_EXPIRED


def test_a_settle_after_the_hold_expired_charges_what_the_balance_still_has() -> None:
    ledger, clock = new_ledger(1000)
    ledger.apply(Hold("h", "acme", 300, timeout_s=10))
    clock.advance(seconds=10)
    assert ledger.apply(ExpireHolds("x1")).hold_ids == ("h",)
    assert ledger.apply(Hold("again", "acme", 900, 60)).code is Code.OK  # the freed credit is held again
    late = ledger.apply(Settle("s", "h", 250))
    # Charged anyway, capped by the balance (100 left): never a negative balance, never free tokens.
    assert (late.code, late.late, late.micro_credits, late.released) == (Code.OK, True, 100, 0)
    account = ledger.account("acme")
    assert (account.balance, account.held, account.spent) == (0, 900, 100)
    ledger.check_invariants()
    assert ledger.apply(Settle("s", "h", 250)) == late._replace(code=Code.EXISTS)
    assert ledger.apply(Settle("s2", "h", 1)).code is Code.HOLD_SETTLED
    assert ledger.apply(Settle("s3", "again", 901)).code is Code.SETTLE_EXCEEDS_HOLD


def test_a_settle_of_an_overdue_hold_not_yet_expired_debits_its_reservation_in_full() -> None:
    ledger, clock = new_ledger(1000)
    ledger.apply(Hold("h", "acme", 300, timeout_s=10))
    clock.advance(seconds=10)
    late = ledger.apply(Settle("s", "h", 250))
    assert (late.code, late.late, late.micro_credits, late.released) == (Code.OK, True, 250, 50)
    assert ledger.apply(ExpireHolds("x1")).hold_ids == ()
    assert ledger.account("acme").balance == 750
    ledger.check_invariants()


def test_a_late_settle_at_zero_balance_charges_zero_and_is_still_recorded() -> None:
    ledger, clock = new_ledger(300)
    ledger.apply(Hold("h", "acme", 300, timeout_s=10))
    clock.advance(seconds=10)
    ledger.apply(ExpireHolds("x1"))
    ledger.apply(Hold("h2", "acme", 300, 60))
    late = ledger.apply(Settle("s", "h", 300))
    assert (late.code, late.late, late.micro_credits) == (Code.OK, True, 0)
    ledger.check_invariants()


def test_expire_holds_leaves_live_and_ended_holds_alone() -> None:
    ledger, clock = new_ledger(1000)
    ledger.apply(Hold("short", "acme", 1, timeout_s=5))
    ledger.apply(Hold("settled", "acme", 1, timeout_s=5))
    ledger.apply(Hold("long", "acme", 1, timeout_s=50))
    ledger.apply(Settle("s", "settled", 1))
    clock.advance(seconds=5)
    assert ledger.apply(ExpireHolds("x")).hold_ids == ("short",)
    assert [h.hold_id for h in ledger.account("acme").holds] == ["long"]


def test_zero_hold_is_allowed_even_at_zero_balance() -> None:
    ledger, clock = new_ledger()
    assert ledger.apply(Hold("h", "acme", 0, 30)).code is Code.OK
    assert ledger.apply(Settle("s", "h", 0)).code is Code.OK


@pytest.mark.parametrize(
    "op, code",
    [
        (GrantCredits("g", "acme", 0), Code.INVALID_AMOUNT),
        (GrantCredits("g", "acme", 1.5), Code.INVALID_AMOUNT),  # type: ignore[arg-type]
        (GrantCredits("g", "nobody", 5), Code.TENANT_NOT_FOUND),
        (Hold("h", "acme", -1, 30), Code.INVALID_AMOUNT),
        (Hold("h", "acme", True, 30), Code.INVALID_AMOUNT),
        (Hold("h", "acme", 1, 0), Code.INVALID_TIMEOUT),
        (Hold("h", "acme", 1, MAX_HOLD_TIMEOUT_S + 1), Code.INVALID_TIMEOUT),
        (Hold("h", "acme", MAX_MICRO_CREDITS + 1, 30), Code.INVALID_AMOUNT),
        (GrantCredits("g", "acme", MAX_MICRO_CREDITS + 1), Code.INVALID_AMOUNT),
        (Hold("h", "nobody", 1, 30), Code.TENANT_NOT_FOUND),
        (CreateTenant("c", "acme", "Again"), Code.TENANT_EXISTS),
    ],
)
def test_invalid_ops_are_refused_without_changing_state(op: object, code: Code) -> None:
    ledger, clock = new_ledger(100)
    before = ledger.account("acme")
    assert ledger.apply(op).code is code  # type: ignore[arg-type]
    assert ledger.account("acme") == before


def test_an_op_the_ledger_does_not_define_is_a_type_error() -> None:
    class Refund(NamedTuple):
        op_id: str
        tenant_id: str
        micro_credits: int

    ledger, clock = new_ledger(100)
    with pytest.raises(TypeError):
        ledger.apply(Refund("r", "acme", 100))  # type: ignore[arg-type]
    assert ledger.account("acme").balance == 100


def test_naive_time_is_rejected() -> None:
    ledger, clock = new_ledger(100)
    with pytest.raises(ValueError):
        ledger.apply(Hold("h", "acme", 1, 30), datetime(2025, 1, 1))


def test_there_is_no_refund_op() -> None:
    import orch.ledger as ledger_module

    assert not [name for name in dir(ledger_module) if "refund" in name.lower()]


# ---- idempotency ----


def test_same_op_id_same_content_returns_the_first_result() -> None:
    ledger, clock = new_ledger()
    first = ledger.apply(GrantCredits("pay-1", "acme", 5 * MICRO))
    clock.advance(hours=1)
    again = ledger.apply(GrantCredits("pay-1", "acme", 5 * MICRO))
    assert again.code is Code.EXISTS and again._replace(code=Code.OK) == first
    assert ledger.account("acme").balance == 5 * MICRO  # granted once
    held = ledger.apply(Hold("h", "acme", 7, 30))
    assert ledger.apply(Hold("h", "acme", 7, 30)) == held._replace(code=Code.EXISTS)
    settled = ledger.apply(Settle("s", "h", 3))
    assert ledger.apply(Settle("s", "h", 3)) == settled._replace(code=Code.EXISTS)
    assert ledger.account("acme").spent == 3


def test_same_op_id_different_content_is_refused() -> None:
    ledger, clock = new_ledger()
    ledger.apply(GrantCredits("pay-1", "acme", 5 * MICRO))
    assert ledger.apply(GrantCredits("pay-1", "acme", 6 * MICRO)).code is Code.EXISTS_DIFFERENT
    # Same field values, another op type: still different content.
    assert ledger.apply(Settle("pay-1", "acme", 5 * MICRO)).code is Code.EXISTS_DIFFERENT
    assert ledger.apply(Hold("pay-1", "acme", 1, 30)).code is Code.EXISTS_DIFFERENT
    assert ledger.account("acme").balance == 5 * MICRO


def test_idempotency_window_forgets_ended_holds_but_never_grants() -> None:
    clock = FakeClock()
    ledger = Ledger(clock=clock, idempotency_window=timedelta(hours=1))
    ledger.apply(CreateTenant("t", "acme", "Acme"))
    ledger.apply(GrantCredits("pay-1", "acme", 100))
    ledger.apply(Hold("h", "acme", 10, 30))
    ledger.apply(Settle("s", "h", 10))
    clock.advance(hours=2)
    ledger.apply(ExpireHolds("x"))
    assert ledger.apply(Settle("s", "h", 10)).code is Code.HOLD_NOT_FOUND  # forgotten, and not re-applied
    assert ledger.apply(GrantCredits("pay-1", "acme", 100)).code is Code.EXISTS
    assert ledger.account("acme").balance == 90
    ledger.check_invariants()


def internal_sizes(ledger: Ledger) -> dict[str, int]:
    """The ledger's per-op memory: what must stay bounded under steady traffic."""
    return {
        "done": len(ledger._done),
        "holds": len(ledger._holds),
        "forgettable": len(ledger._forgettable),
        "expiry_heap": len(ledger._expiry_heap),
    }


def test_memory_stays_flat_under_steady_traffic_with_no_hold_ever_expiring() -> None:
    clock = FakeClock()
    ledger = Ledger(clock=clock, idempotency_window=timedelta(minutes=10))
    ledger.apply(CreateTenant("t", "acme", "Acme"))
    ledger.apply(GrantCredits("g", "acme", 10**15))
    per_window = 10 * 60 * 10  # 10 requests a second, 10 minutes retained
    sizes = []
    for i in range(100_000):
        clock.advance(milliseconds=100)
        assert ledger.apply(Hold(f"h{i}", "acme", 1000, 3600)).code is Code.OK
        assert ledger.apply(Settle(f"s{i}", f"h{i}", 500)).code is Code.OK
        if i % 10_000 == 9_999:
            sizes.append(internal_sizes(ledger))
    every = 1024  # orch.ledger forgets every 1024 OK ops: what may sit past the window meanwhile
    for size in sizes[1:]:  # after warm-up every map holds about one window of requests, never more
        assert size["done"] <= 2 * per_window + 2 + every, sizes
        assert size["holds"] <= per_window + every // 2, sizes
        assert size["forgettable"] <= 2 * per_window + every, sizes
        assert size["expiry_heap"] <= 1024 + every // 2, sizes  # compacted: only open holds must stay in it
    for name in ("done", "holds", "forgettable"):  # flat: from 20k to 100k requests, within one pass
        seen = [size[name] for size in sizes[1:]]
        assert max(seen) - min(seen) <= every, sizes
    assert ledger.account("acme").spent == 100_000 * 500
    ledger.check_invariants()


def test_forgetting_replays_to_the_same_state_and_retries_inside_the_window_are_idempotent() -> None:
    clock = FakeClock()
    window = timedelta(minutes=10)
    ledger = Ledger(clock=clock, idempotency_window=window)
    log: list[tuple[Op, Result]] = []

    def apply(op: Op) -> Result:
        result = ledger.apply(op)
        if result.code is Code.OK:
            log.append((op, result))
        return result

    apply(CreateTenant("t", "acme", "Acme"))
    apply(GrantCredits("g", "acme", 10**9))
    for i in range(3000):
        clock.advance(seconds=1)
        apply(Hold(f"h{i}", "acme", 1000, 60))
        apply(Settle(f"s{i}", f"h{i}", 300) if i % 3 else Release(f"r{i}", f"h{i}"))
        if i % 500 == 0:  # a refusal now and then: it changes nothing, forgetting included
            assert apply(Hold(f"big{i}", "acme", 10**10, 60)).code is Code.INSUFFICIENT_CREDITS
    rebuilt = Ledger(clock=clock, idempotency_window=window)
    assert rebuilt.replay(log) == len(log)
    assert internal_sizes(rebuilt) == internal_sizes(ledger)
    assert rebuilt.account("acme") == ledger.account("acme")
    rebuilt.check_invariants()
    # A retry inside the window returns the first result; past it the hold is gone, never charged twice.
    assert ledger.apply(Settle("s2998", "h2998", 300)).code is Code.EXISTS
    assert ledger.apply(Hold("h2998", "acme", 1000, 60)).code is Code.EXISTS
    assert ledger.apply(Settle("s1", "h1", 300)).code is Code.HOLD_NOT_FOUND
    assert ledger.account("acme").spent == rebuilt.account("acme").spent


# ---- pricing ----


def test_cost_rounds_up_to_the_micro_credit() -> None:
    price = Price(input_per_m=150_000, output_per_m=600_000)  # 0.15 µc and 0.6 µc per token
    assert cost(price, 1, 0) == 1  # 0.15 → 1
    assert cost(price, 0, 1) == 1  # 0.6 → 1
    assert cost(price, 1, 1) == 1  # 0.75 → 1: rounded once on the total, not per part
    assert cost(price, 10, 0) == 2  # 1.5 → 2
    assert cost(price, 1_000_000, 1_000_000) == 750_000  # exact: no rounding
    assert cost(price, 0, 0) == 0


def test_cost_is_integer_and_never_below_the_exact_amount() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        price = Price(rng.randrange(0, 10**8), rng.randrange(0, 10**8))
        p, c = rng.randrange(0, 10**6), rng.randrange(0, 10**6)
        exact_times_m = price.input_per_m * p + price.output_per_m * c
        charged = cost(price, p, c)
        assert type(charged) is int
        assert charged * 1_000_000 - 1_000_000 < exact_times_m <= charged * 1_000_000


def test_max_cost_covers_every_possible_completion() -> None:
    price = Price(333_333, 777_777)
    hold = max_cost(price, 123, 50)
    assert all(cost(price, 123, c) <= hold for c in range(51))
    assert cost(price, 123, 50) == hold


def test_price_and_token_counts_must_be_integers() -> None:
    with pytest.raises(ValueError):
        Price(0.5, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Price(1, -1)
    with pytest.raises(ValueError):
        cost(Price(1, 1), 1.0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cost(Price(1, 1), 1, -1)


# ---- invariants under random ops ----


def test_random_ops_never_overspend_and_keep_every_invariant() -> None:
    rng = random.Random(20251126)
    clock = FakeClock()
    ledger = Ledger(clock=clock, idempotency_window=timedelta(hours=6))
    tenants = ["a", "b", "c"]
    log: list[tuple[Op, Result]] = []
    for t in tenants:
        create = CreateTenant(f"create-{t}", t, t.upper())
        log.append((create, ledger.apply(create)))
    holds: list[str] = []
    codes: dict[Code, int] = {}
    for i in range(3000):
        clock.advance(seconds=rng.choice([0, 0, 1, 1, 5, 30, 600, 86_400 * 40]) * rng.random())
        roll, tenant = rng.random(), rng.choice(tenants)
        if roll < 0.05:
            op: object = GrantCredits(f"g{i}", tenant, rng.randrange(1, 5000))
        elif roll < 0.45:
            op = Hold(f"h{i}", tenant, rng.randrange(0, 3000), rng.choice([5, 60, 3600]))
        elif roll < 0.75 and holds:
            op = Settle(f"s{i}", rng.choice(holds[-8:]), rng.randrange(0, 3000))
        elif roll < 0.85 and holds:
            op = Release(f"r{i}", rng.choice(holds[-8:]))
        elif roll < 0.9:
            op = ExpireHolds(f"x{i}")
        elif holds:  # a retry of a recent hold's op id, mostly with other content
            op = Hold(rng.choice(holds[-8:]), tenant, rng.randrange(0, 3000), 60)
        else:
            continue
        result: Result = ledger.apply(op)  # type: ignore[arg-type]
        codes[result.code] = codes.get(result.code, 0) + 1
        if result.code is Code.OK:
            log.append((op, result))  # type: ignore[arg-type]
        if isinstance(op, Hold) and result.code is Code.OK:
            holds.append(op.op_id)
        ledger.check_invariants()
        for t in tenants:
            account = ledger.account(t)
            assert account.balance >= 0 and all(g.remaining >= 0 for g in account.grants)
    # The walk really exercised refusals and every kind of success.
    for code in (Code.OK, Code.INSUFFICIENT_CREDITS, Code.SETTLE_EXCEEDS_HOLD, Code.EXISTS_DIFFERENT):
        assert codes.get(code, 0) > 10, codes
    assert sum(r.late for _, r in log) > 10  # late settles too, capped or not
    # Late settles, forgetting and reused op ids all replay to the same state.
    rebuilt = Ledger(clock=clock, idempotency_window=timedelta(hours=6))
    assert rebuilt.replay(log) == len(log)
    assert [rebuilt.account(t) for t in tenants] == [ledger.account(t) for t in tenants]
    assert internal_sizes(rebuilt) == internal_sizes(ledger)


def test_replay_of_the_ok_results_rebuilds_the_same_state() -> None:
    rng = random.Random(3)
    clock = FakeClock()
    ledger = Ledger(clock=clock)
    log: list[tuple[Op, Result]] = []
    ops: list[Op] = [CreateTenant("c", "acme", "Acme"), GrantCredits("g", "acme", 10**6)]
    for i in range(500):
        ops += [Hold(f"h{i}", "acme", rng.randrange(1, 5000), 60), Settle(f"s{i}", f"h{i}", rng.randrange(0, 5000))]
        if i % 50 == 0:
            ops.append(ExpireHolds(f"x{i}"))
    for op in ops:
        clock.advance(seconds=rng.random())
        result = ledger.apply(op)
        if result.code is Code.OK:
            log.append((op, result))
    rebuilt = Ledger(clock=clock)
    assert rebuilt.replay(log) == len(log)
    assert rebuilt.account("acme") == ledger.account("acme")
    rebuilt.check_invariants()


def test_replay_detects_a_log_that_disagrees_with_the_rules() -> None:
    clock = FakeClock()
    ledger = Ledger(clock=clock)
    ops: list[Op] = [CreateTenant("c", "acme", "Acme"), GrantCredits("g", "acme", 100), Hold("h", "acme", 10, 30)]
    log = [(op, ledger.apply(op)) for op in ops]
    log[-1] = (log[-1][0], log[-1][1]._replace(expires_at=clock.now))  # a record the rules would not write
    with pytest.raises(AssertionError, match="replay diverged"):
        Ledger(clock=clock).replay(log)

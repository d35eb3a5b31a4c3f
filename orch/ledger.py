"""Prepaid-credit ledger: the money rules as a deterministic state machine, no I/O.

Amounts are integer micro-credits (``MICRO`` per credit). Every mutation is an op with an ``op_id``;
``Ledger.apply(op)`` returns a ``Result`` whose ``code`` says what happened. Only ``Code.OK`` changes
state; those (op, result) pairs are what the store persists and what ``Ledger.replay`` re-applies.
There is no refund op.

>>> from datetime import datetime, timezone
>>> t0 = datetime(2025, 1, 31, tzinfo=timezone.utc)
>>> ledger = Ledger(clock=lambda: t0)
>>> ledger.apply(CreateTenant("op-1", "acme", "Acme")).code
<Code.OK: 'ok'>
>>> ledger.apply(GrantCredits("op-2", "acme", 5 * MICRO)).expires_at
datetime.datetime(2026, 1, 31, 0, 0, tzinfo=datetime.timezone.utc)
>>> ledger.apply(Hold("hold-1", "acme", 2 * MICRO, timeout_s=600)).code
<Code.OK: 'ok'>
>>> ledger.apply(Settle("settle-1", "hold-1", 1_500_000)).released
500000
>>> ledger.account("acme").balance
3500000
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from orch.ledger_ops import (
    MAX_HOLD_TIMEOUT_S,
    MAX_MICRO_CREDITS,
    MICRO,
    Account,
    Code,
    CreateTenant,
    ExpireHolds,
    GrantBalance,
    GrantCredits,
    Hold,
    Op,
    OpenHold,
    Record,
    Release,
    Result,
    Settle,
    add_months,
    grant_expiry,
    utc_now,
)
from orch.ledger_state import (
    EXPIRED,
    NO_ALLOCATION,
    OPEN,
    RELEASED,
    SETTLED,
    GrantState,
    HoldState,
    TenantState,
    free_credit,
)
from orch.pricing import TOKENS_PER_PRICE_UNIT, Price, cost, max_cost

LEASE_HOLD_PREFIX = "lease-"  # the hold ids of credit leases (orch.lease) start with it

__all__ = [  # the records (orch.ledger_ops) and pricing names are re-exported: callers import them from here
    "MAX_HOLD_TIMEOUT_S", "MAX_MICRO_CREDITS", "MICRO", "TOKENS_PER_PRICE_UNIT", "Account", "Code", "CreateTenant",
    "ExpireHolds", "GrantBalance", "GrantCredits", "Hold", "Ledger", "Op", "OpenHold", "Price", "Record", "Release",
    "Result", "Settle", "add_months", "cost", "grant_expiry", "max_cost", "utc_now",
]  # fmt: skip


_OK = Code.OK  # enum attribute lookups cost ~100 ns on 3.11; the hot path pays them per op
_ENDED_CODE = {SETTLED: Code.HOLD_SETTLED, RELEASED: Code.HOLD_RELEASED, EXPIRED: Code.HOLD_EXPIRED}
_HOUSEKEEPING_EVERY = 1024  # OK ops between two forgetting passes (a counter, so replay repeats them)
_HEAP_SLACK = 1024  # the expiry heap is compacted when ended entries outnumber open ones by this much


class Ledger:
    """In-memory state machine over ops. Not thread-safe: one caller serialises ``apply``.

    Op ids of holds and of the ops that ended them are remembered for ``idempotency_window`` after the
    hold ended; every 1024th OK op forgets what fell out of the window by its own instant, so memory
    stays bounded by the traffic of one window, and replay (the same OK ops at the same instants)
    forgets exactly the same. Tenant and grant op ids are remembered forever: a grant can never apply twice.
    Forgetting never charges twice: a Settle or Release of a forgotten hold is HOLD_NOT_FOUND, and a
    Hold retried after its id was forgotten holds again, which times out back into the balance. What
    the window bounds is how late a settle may still charge an expired hold (then HOLD_NOT_FOUND, an
    under-charge) and how long a retry gets EXISTS; the default day covers LedgerClient's 60 s retries
    and settles retried by a gateway for hours (orch.metering: 12 h), at about 1.3 KB per request kept
    for that day: lower it for sustained rates of hundreds of requests a second.

    The process that hosts a busy Ledger should raise the GC's young-generation threshold (e.g.
    ``gc.set_threshold(50_000, 20, 100)``) and ``gc.freeze()`` after replay: with CPython's defaults
    the collector rescans the ledger's many live objects so often that throughput halves
    (benchmarks/bench_ledger.py measures both).
    """

    def __init__(
        self, clock: Callable[[], datetime] = utc_now, idempotency_window: timedelta = timedelta(days=1)
    ) -> None:
        self.clock = clock
        self.idempotency_window = idempotency_window
        self._tenants: dict[str, TenantState] = {}
        self._holds: dict[str, HoldState] = {}
        self._done: dict[str, tuple[Op, Result]] = {}  # op_id → first (op, OK result)
        self._expiry_heap: list[tuple[datetime, str]] = []  # (expires_at, hold_id), ended ones popped lazily
        self._forgettable: deque[tuple[datetime, str]] = deque()  # (ended_at, op_id) in end order
        self._timeouts: dict[int, timedelta] = {}
        self._open = 0  # open holds, to size the expiry heap against
        self._ok_ops = 0  # OK ops applied (replayed ones included): paces the housekeeping
        self._debited = 0  # Σ settled debits, all time
        self._forgotten_debits = 0  # Σ debits of settled holds no longer in _holds
        self._handlers = self._make_handlers()

    def _make_handlers(self) -> dict[type, Callable[..., Result]]:
        return {
            CreateTenant: self._create_tenant,
            GrantCredits: self._grant,
            Hold: self._hold,
            Settle: self._settle,
            Release: self._release,
            ExpireHolds: self._expire_holds,
            Record: self._record,
        }

    # A snapshot (orch.snapshot) pickles the whole state but the clock and the handlers (bound methods).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["clock"], state["_handlers"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.clock = utc_now
        self._handlers = self._make_handlers()

    # ---- mutations ----

    def apply(self, op: Op, now: datetime | None = None) -> Result:
        """Applies ``op`` at ``now`` (default: the clock). Idempotent by ``op.op_id``."""
        prior = self._done.get(op.op_id)
        if prior is not None:
            if type(prior[0]) is type(op) and prior[0] == op:
                return prior[1]._replace(code=Code.EXISTS)
            return Result(Code.EXISTS_DIFFERENT, op.op_id, prior[1].at, prior[1].tenant_id)
        if now is None:
            now = self.clock()
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware (UTC)")
        handler = self._handlers.get(type(op))
        if handler is None:
            raise TypeError(f"not a ledger op: {op!r}")
        result: Result = handler(op, now)
        if result.code is _OK:
            self._done[op.op_id] = (op, result)
            self._ok_ops += 1
            if not self._ok_ops % _HOUSEKEEPING_EVERY:
                self._housekeeping(now)
        return result

    def result_of(self, op_id: str) -> Result | None:
        """The first result of an op applied before (code EXISTS), None if none is remembered."""
        prior = self._done.get(op_id)
        return None if prior is None else prior[1]._replace(code=Code.EXISTS)

    def replay(self, records: Iterable[tuple[Op, Result]]) -> int:
        """Re-applies persisted (op, OK result) pairs at their recorded instants; returns the count.
        Raises if any op now gives another result: the log and these rules disagree."""
        n = 0
        for op, recorded in records:
            again = self.apply(op, recorded.at)
            if again != recorded:
                raise AssertionError(f"replay diverged at {op!r}: recorded {recorded!r}, got {again!r}")
            n += 1
        return n

    def _create_tenant(self, op: CreateTenant, now: datetime) -> Result:
        if op.tenant_id in self._tenants:
            return Result(Code.TENANT_EXISTS, op.op_id, now, op.tenant_id)
        self._tenants[op.tenant_id] = TenantState(op.tenant_id, op.name)
        return Result(_OK, op.op_id, now, op.tenant_id)

    def _grant(self, op: GrantCredits, now: datetime) -> Result:
        tenant = self._tenants.get(op.tenant_id)
        if tenant is None:
            return Result(Code.TENANT_NOT_FOUND, op.op_id, now, op.tenant_id)
        if type(op.micro_credits) is not int or not 0 < op.micro_credits <= MAX_MICRO_CREDITS:
            return Result(Code.INVALID_AMOUNT, op.op_id, now, op.tenant_id)
        g = GrantState(op.op_id, op.micro_credits, now)
        for grants in (tenant.grants, tenant.burnable):
            # Stable: equal expiries keep grant order. Lists are short (one entry per purchase).
            i = len(grants)
            while i and grants[i - 1].expires_at > g.expires_at:
                i -= 1
            grants.insert(i, g)
        return Result(_OK, op.op_id, now, op.tenant_id, op.micro_credits, expires_at=g.expires_at)

    def _hold(self, op: Hold, now: datetime) -> Result:
        tenant = self._tenants.get(op.tenant_id)
        if tenant is None:
            return Result(Code.TENANT_NOT_FOUND, op.op_id, now, op.tenant_id)
        amount = op.micro_credits
        if type(amount) is not int or not 0 <= amount <= MAX_MICRO_CREDITS:
            return Result(Code.INVALID_AMOUNT, op.op_id, now, op.tenant_id)
        timeout = self._timeouts.get(op.timeout_s)
        if timeout is None:
            if type(op.timeout_s) is not int or not 0 < op.timeout_s <= MAX_HOLD_TIMEOUT_S:
                return Result(Code.INVALID_TIMEOUT, op.op_id, now, op.tenant_id)
            timeout = self._timeouts[op.timeout_s] = timedelta(seconds=op.timeout_s)
        burnable = tenant.burnable
        # Drop grants no hold can take from again and no open hold is pinned to; spent and expired
        # grants sort first, so the front is where they pile up. (Should `now` step back, a dropped grant
        # stays dropped: conservative, and replay repeats it exactly.)
        while (
            burnable
            and burnable[0].reserved == 0
            and (burnable[0].spent == burnable[0].micro_credits or burnable[0].expires_at <= now)
        ):
            del burnable[0]
        allocation, need = free_credit(burnable, amount, now)
        if need:
            return Result(Code.INSUFFICIENT_CREDITS, op.op_id, now, op.tenant_id, amount, available=amount - need)
        for g, take in allocation:
            g.reserved += take
            assert g.spent + g.reserved <= g.micro_credits
        expires_at = now + timeout
        hold = HoldState(op.op_id, tenant, amount, now, expires_at, allocation)
        self._holds[op.op_id] = tenant.open_holds[op.op_id] = hold
        self._open += 1
        heapq.heappush(self._expiry_heap, (expires_at, op.op_id))
        return Result(_OK, op.op_id, now, op.tenant_id, amount, expires_at=expires_at)

    def _open_hold(self, op_id: str, hold_id: str, now: datetime) -> HoldState | Result:
        hold = self._holds.get(hold_id)
        if hold is None:
            return Result(Code.HOLD_NOT_FOUND, op_id, now)
        if hold.state != OPEN:
            return Result(_ENDED_CODE[hold.state], op_id, now, hold.tenant.tenant_id)
        return hold

    def _end(self, hold: HoldState, state: int, debit: int, now: datetime) -> int:
        """Ends an open hold: debits ``debit`` from its allocation in order, frees the rest."""
        rest = debit
        for g, take in hold.allocation:
            d = take if take < rest else rest
            g.reserved -= take
            g.spent += d
            rest -= d
            assert g.reserved >= 0 and g.spent + g.reserved <= g.micro_credits
        assert rest == 0
        hold.state = state
        hold.debited = debit
        hold.allocation = NO_ALLOCATION  # only an open hold needs it; an ended one is kept for idempotency
        self._open -= 1
        tenant = hold.tenant
        del tenant.open_holds[hold.hold_id]
        tenant.spent += debit
        self._debited += debit
        self._forgettable.append((now, hold.hold_id))
        return hold.micro_credits - debit

    def _settle(self, op: Settle, now: datetime) -> Result:
        hold = self._holds.get(op.hold_id)
        if hold is None:
            return Result(Code.HOLD_NOT_FOUND, op.op_id, now)
        tenant_id = hold.tenant.tenant_id
        if hold.state != OPEN and hold.state != EXPIRED:
            return Result(_ENDED_CODE[hold.state], op.op_id, now, tenant_id)
        amount = op.micro_credits
        if type(amount) is not int or amount < 0:
            return Result(Code.INVALID_AMOUNT, op.op_id, now, tenant_id)
        if amount > hold.micro_credits:
            return Result(Code.SETTLE_EXCEEDS_HOLD, op.op_id, now, tenant_id, amount)
        self._forgettable.append((now, op.op_id))
        if hold.state == OPEN:
            released = self._end(hold, SETTLED, amount, now)
            if now < hold.expires_at:
                return Result(_OK, op.op_id, now, tenant_id, amount, released)
            return Result(_OK, op.op_id, now, tenant_id, amount, released, late=True)
        return Result(_OK, op.op_id, now, tenant_id, self._settle_expired(hold, amount, now), late=True)

    def _settle_expired(self, hold: HoldState, amount: int, now: datetime) -> int:
        """Debits up to ``amount`` from the live balance, burn order, for a hold whose credit went back:
        the request ran past its hold. Returns the debit (less than ``amount`` when the balance is)."""
        allocation, rest = free_credit(hold.tenant.burnable, amount, now)
        for g, take in allocation:
            g.spent += take
        debit = amount - rest
        hold.state, hold.debited = SETTLED, debit  # ends it again: its hold id stays queued from the expiry
        hold.tenant.spent += debit
        self._debited += debit
        return debit

    def _release(self, op: Release, now: datetime) -> Result:
        hold = self._open_hold(op.op_id, op.hold_id, now)
        if isinstance(hold, Result):
            return hold
        released = self._end(hold, RELEASED, 0, now)
        self._forgettable.append((now, op.op_id))
        return Result(_OK, op.op_id, now, hold.tenant.tenant_id, released=released)

    def _expire_holds(self, op: ExpireHolds, now: datetime) -> Result:
        """Ends timed-out holds, then forgets op ids older than the idempotency window. Always OK
        (even when it ended nothing) so that replay re-runs the forgetting at the same instants."""
        heap, ended, released = self._expiry_heap, [], 0
        while heap and heap[0][0] <= now:
            _, hold_id = heapq.heappop(heap)
            hold = self._holds.get(hold_id)
            # expires_at: the entry may be a forgotten hold's whose id a newer, later hold reuses
            if hold is not None and hold.state == OPEN and hold.expires_at <= now:
                released += self._end(hold, EXPIRED, 0, now)
                ended.append(hold_id)
        self._forget(now)
        self._forgettable.append((now, op.op_id))
        return Result(_OK, op.op_id, now, released=released, hold_ids=tuple(ended))

    def _record(self, op: Record, now: datetime) -> Result:
        if op.tenant_id not in self._tenants:
            return Result(Code.TENANT_NOT_FOUND, op.op_id, now, op.tenant_id)
        self._forgettable.append((now, op.op_id))
        return Result(_OK, op.op_id, now, op.tenant_id)

    def _housekeeping(self, now: datetime) -> None:
        """Bounds memory under steady traffic: forgets what fell out of the window, and drops the expiry
        heap's entries of ended holds once they outnumber the open ones (pop order is by value, so the
        heap's layout never shows in a result)."""
        self._forget(now)
        heap, holds = self._expiry_heap, self._holds
        if len(heap) > 2 * self._open + _HEAP_SLACK:
            heap[:] = [e for e in heap if (h := holds.get(e[1])) is not None and h.state == OPEN]
            heapq.heapify(heap)

    def _forget(self, now: datetime) -> None:
        """Forgets the op ids (and ended holds) that ended ``idempotency_window`` or more before ``now``."""
        forgettable, horizon, holds = self._forgettable, now - self.idempotency_window, self._holds
        while forgettable and forgettable[0][0] <= horizon:
            op_id = forgettable.popleft()[1]
            self._done.pop(op_id, None)
            hold = holds.get(op_id)
            if hold is not None and hold.state != OPEN:
                del holds[op_id]
                self._forgotten_debits += hold.debited

    # ---- reads ----

    def next_hold_expiry(self) -> datetime | None:
        """When the earliest open hold times out (when to send ``ExpireHolds``), or None."""
        heap = self._expiry_heap
        while heap and (h := self._holds.get(heap[0][1])) is not None and h.state != OPEN:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def has_tenant(self, tenant_id: str) -> bool:
        return tenant_id in self._tenants

    def tenant_ids(self) -> list[str]:
        return list(self._tenants)

    def open_holds(self) -> tuple[int, int, int]:
        """(open holds, of which credit leases, micro-credits they reserve): O(open holds)."""
        holds = [h for t in self._tenants.values() for h in t.open_holds.values()]
        leases = sum(1 for h in holds if h.hold_id.startswith(LEASE_HOLD_PREFIX))
        return len(holds), leases, sum(h.micro_credits for h in holds)

    def account(self, tenant_id: str, now: datetime | None = None) -> Account:
        """The tenant's balance, open holds and grants at ``now``. Raises KeyError for an unknown tenant."""
        tenant = self._tenants[tenant_id]
        now = self.clock() if now is None else now
        grants = []
        for g in tenant.grants:
            expired = g.expires_at <= now
            remaining = 0 if expired else g.micro_credits - g.spent - g.reserved
            grants.append(
                GrantBalance(
                    g.grant_id, g.micro_credits, g.spent, g.reserved, remaining, g.granted_at, g.expires_at, expired
                )
            )
        holds = tuple(
            OpenHold(h.hold_id, h.micro_credits, h.created_at, h.expires_at) for h in tenant.open_holds.values()
        )
        return Account(
            tenant_id,
            tenant.name,
            balance=sum(g.remaining for g in grants),
            held=sum(h.micro_credits for h in holds),
            spent=tenant.spent,
            grants=tuple(grants),
            holds=holds,
        )

    def check_invariants(self, now: datetime | None = None) -> None:
        """Raises AssertionError (even under ``python -O``) if any money invariant is broken. O(state)."""
        now = self.clock() if now is None else now
        reserved_by_grant: dict[int, int] = {}
        settled = self._forgotten_debits
        for hold in self._holds.values():
            settled += hold.debited
            _check(hold.debited == 0 or hold.state == SETTLED, f"hold {hold.hold_id} debited unsettled")
            if hold.state == OPEN:
                _check(sum(t for _, t in hold.allocation) == hold.micro_credits, f"hold {hold.hold_id} allocation")
                _check(hold.tenant.open_holds.get(hold.hold_id) is hold, f"hold {hold.hold_id} not listed open")
                for g, take in hold.allocation:
                    _check(take > 0, f"hold {hold.hold_id} allocates {take}")
                    reserved_by_grant[id(g)] = reserved_by_grant.get(id(g), 0) + take
        spent_total = 0
        for tenant in self._tenants.values():
            balance = 0
            for g in tenant.grants:
                _check(0 <= g.spent and 0 <= g.reserved, f"grant {g.grant_id} negative")
                _check(g.spent + g.reserved <= g.micro_credits, f"grant {g.grant_id} over-committed")
                _check(g.reserved == reserved_by_grant.get(id(g), 0), f"grant {g.grant_id} reserved mismatch")
                if g.expires_at > now:
                    balance += g.micro_credits - g.spent - g.reserved
                spent_total += g.spent
            _check(balance >= 0, f"tenant {tenant.tenant_id} balance {balance}")
            _check(balance == self.account(tenant.tenant_id, now).balance, "account balance mismatch")
            _check(all(g in tenant.grants for g in tenant.burnable), "burnable grant not in grants")
        _check(
            spent_total == self._debited == settled,
            f"Σ grant debits {spent_total}, ledger {self._debited}, settled holds {settled}",
        )


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)

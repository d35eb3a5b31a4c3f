"""Credit leases: admission against a gateway replica's local share of a tenant's balance, and settles
in batches off the request path.

A replica holds, per active tenant, a *lease*: one hold in the tenant's ledger, committed before any
request uses it. A request is admitted when its worst-case cost fits the lease's free part, with no
await; when it ends, its exact cost and usage row join the lease's next batch. Within
:attr:`LeaseSettings.flush_s` of a request's end (or at ``flush_rows`` rows) the batch goes to the
ledger as one *renewal*, applied by :func:`orch.renewal.apply_renewal` in one ledger transaction: a Settle of the
current lease hold for the batch's cost, with the batch's usage rows, then a Hold of the next lease
hold. The next hold is sized from the tenant's recent demand (reservations asked for over
``horizon_s``) on top of the requests still running, bounded by the balance; a lease whose free part
runs low is topped up the same way. A lease idle for ``idle_s`` is returned (a last Settle, no new
hold). A replica that dies stops renewing: its lease hold times out in the ledger (``ttl_s``) and the
credit is back in the balance. A replica admits against a lease only until ``ttl_s - margin_s`` after
the renewal that made it was sent, so it never spends a hold the ledger may already have expired.

Invariants (:meth:`Lease.check`): running reservations + costs not yet settled <= the lease hold, and
the hold <= the balance (the ledger's rule for every hold). A request's cost never exceeds its
reservation, so a Settle never exceeds its hold: no overspend. With ``durable_end`` (the default) a
request's last bytes leave only once its usage row is committed, so a crash loses only the usage of the
requests then running (an under-charge, never an overspend); without it, also that of at most the last
``flush_s`` of finished ones.

:class:`Leases` is pure asyncio over :class:`LeaseLedger` (``actors.ledger.LedgerClient``);
``tests/unit/test_lease.py`` runs it against the real in-memory :class:`orch.ledger.Ledger`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from orch.ledger import LEASE_HOLD_PREFIX, Settle
from orch.renewal import Renewal, Renewed
from orch.store import UsageRow
from orch.usage_log import fit, to_arrow

log = logging.getLogger("ray.serve")


class LeaseLedger(Protocol):
    """What leases need of the ledger (``actors.ledger.LedgerClient``)."""

    async def renew(self, tenant_id: str, renewal: Renewal) -> Renewed: ...


@dataclass(frozen=True)
class LeaseSettings:
    ttl_s: int = 30  # the lease hold's timeout: how long a dead replica's lease keeps credit from the balance
    flush_s: float = 0.05  # a finished request's usage reaches the ledger within this (plus a commit)
    flush_rows: int = 256  # or as soon as this many rows wait
    idle_s: float = 2.0  # a lease unused this long is returned
    horizon_s: float = 2.0  # a lease covers the reservations asked for over about this long
    min_requests: int = 4  # and at least this many more of the last request's size
    peak_window_s: float = 30.0  # and at least the most reserved at once within this long
    retry_s: float = 0.5  # after a failed renewal
    # A finished request's last bytes wait until the renewal carrying its usage row committed (at most
    # durable_wait_s): a replica killed after a client got a whole answer has charged for it. Its batch goes
    # at once or right after the renewal out. False: they go at once, rows go every flush_s, and a crash
    # loses the usage of the last flush_s of finished requests.
    durable_end: bool = True
    durable_wait_s: float = 2.0
    top_up_every_s: float = 0.5  # a lease running low is topped up at most this often

    @property
    def margin_s(self) -> float:
        """Admit no more this long before the hold may expire."""
        return self.ttl_s / 4

    @property
    def renew_every_s(self) -> float:
        """A lease in use is renewed at least this often (twice before admission would stop)."""
        return self.ttl_s / 3


@dataclass(eq=False)
class Lease:
    """A replica's lease on one tenant's credit. All amounts in micro-credits."""

    tenant_id: str
    hold_id: str | None = None  # the lease hold in the ledger; None: no credit here
    held: int = 0  # what the lease may cover: the hold, or while a renewal is out, what it will surely get
    valid_until: float = 0.0  # monotonic; admit only before
    in_flight: int = 0  # Σ reservations of the requests running on it
    unflushed: int = 0  # Σ costs of finished requests not yet in a renewal
    rows: list[UsageRow] = field(default_factory=list)
    waiting: list[asyncio.Future[None]] = field(default_factory=list)  # requests whose rows are in ``rows``
    sending: list[asyncio.Future[None]] = field(default_factory=list)  # and those whose rows are in ``out``
    flushing: int = 0  # Σ costs in the renewal now out
    first_row_at: float = 0.0
    renewed_at: float = 0.0
    last_used: float = 0.0
    demand: float = 0.0  # reservations asked for, decayed over the horizon
    demand_at: float = 0.0
    last_need: int = 0
    peak: int = 0  # the most reserved at once (running + asked) within the last ``peak_window_s``
    peak_at: float = 0.0
    short: bool = False  # its last renewal got less than it asked for: the balance is the limit
    out: Renewal | None = None  # a renewal sent and not answered: retried as it is
    out_at: float = 0.0  # when it was first sent: its hold expires no earlier than ttl_s after
    renewing: asyncio.Task[None] | None = None
    failed_at: float = 0.0

    @property
    def free(self) -> int:
        return self.held - self.in_flight - self.unflushed - self.flushing

    def check(self) -> None:
        """Running reservations and unsettled costs fit the lease."""
        assert min(self.in_flight, self.unflushed, self.flushing) >= 0, self
        assert self.in_flight + self.unflushed + self.flushing <= self.held or self.hold_id is None, self


class Leases:
    """A replica's leases, one per active tenant, and the task that flushes, renews and returns them.

    >>> leases = Leases(ledger_client, "public")  # doctest: +SKIP
    >>> lease = await leases.admit(tenant_id, worst_case)  # None: fall back to a direct hold  # doctest: +SKIP
    >>> leases.finish(lease, worst_case, usage_row)  # its cost_micro is what it is charged  # doctest: +SKIP
    """

    def __init__(
        self,
        ledger: LeaseLedger,
        tap: str,
        settings: LeaseSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._prefix = f"{LEASE_HOLD_PREFIX}{tap}-{uuid.uuid4().hex[:12]}"  # this replica's: hold ids never collide
        self.settings = settings or LeaseSettings()
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._seq = itertools.count(1)
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    # ---- the request path ----

    def try_admit(self, tenant_id: str, need: int) -> Lease | None:
        """Reserves ``need`` on the tenant's lease if its free part covers it; never awaits."""
        now = self._clock()
        lease = self._leases.get(tenant_id)
        if lease is None:
            lease = self._leases[tenant_id] = Lease(tenant_id, demand_at=now)
            self._start_loop()
        self._ask(lease, need, now)
        if self._closed or lease.hold_id is None or now >= lease.valid_until or lease.free < need:
            return None
        lease.in_flight += need
        lease.last_used = now
        return lease

    async def admit(self, tenant_id: str, need: int) -> Lease | None:
        """:meth:`try_admit`, else after a top-up sized for this request (one round trip; a renewal
        already out is waited for first). None: the lease can't cover it (fall back to a direct hold)."""
        lease = self.try_admit(tenant_id, need)
        if lease is not None or self._closed:
            return lease
        lease = self._leases[tenant_id]
        for _ in range(2):
            sized_for_me = lease.renewing is None
            task = self._renew(lease, need) if sized_for_me else lease.renewing
            assert task is not None
            try:
                await asyncio.shield(task)
            except Exception:  # noqa: BLE001  # logged by the renewal; the direct hold reports the ledger's state
                return None
            now = self._clock()
            if lease.hold_id is not None and now < lease.valid_until and lease.free >= need:
                lease.in_flight += need
                lease.last_used = now
                return lease
            if sized_for_me:
                break
        return None

    def free(self, tenant_id: str) -> int:
        """What the tenant's lease here could still admit (0 without one)."""
        lease = self._leases.get(tenant_id)
        return max(0, lease.free) if lease is not None and lease.hold_id is not None else 0

    def finish(self, lease: Lease, reserved: int, row: UsageRow) -> asyncio.Future[None]:
        """A request admitted on ``lease`` ended: its reservation is freed, its usage row (its cost,
        ``row.cost_micro`` <= ``reserved``) joins the next batch. The future is done once that batch is
        committed (``durable_end``; at most ``durable_wait_s``), else at once: the request's last bytes wait
        for it. The batch goes at once, or, while a renewal is out, right after it: a row waits at most two
        ledger round trips."""
        charge = row.cost_micro
        if charge > reserved:
            raise ValueError(f"cost {charge} over its reservation {reserved}")
        now = self._clock()
        lease.in_flight -= reserved
        durable = asyncio.get_running_loop().create_future()
        if lease.hold_id is None:  # the lease was lost (its hold expired, the balance short): can't charge
            log.error("request %s ended on a lost lease: %d micro-credits uncharged", row.request_id, charge)
            durable.set_result(None)
            return durable
        if not lease.rows:
            lease.first_row_at = now
        lease.unflushed += charge
        lease.rows.append(row)
        lease.last_used = now
        if self.settings.durable_end:
            lease.waiting.append(durable)
            durable.get_loop().call_later(self.settings.durable_wait_s, _done, [durable])  # a slow ledger
        else:
            durable.set_result(None)
        # Durable: the batch goes now, or as soon as the renewal out returns (a group commit per lease).
        if (self.settings.durable_end or len(lease.rows) >= self.settings.flush_rows) and lease.renewing is None:
            self._renew(lease)
        return durable

    def _ask(self, lease: Lease, need: int, now: float) -> None:
        decay = math.exp(-(now - lease.demand_at) / self.settings.horizon_s)
        lease.demand = lease.demand * decay + need
        lease.demand_at = now
        lease.last_need = need
        asked = lease.in_flight + need
        if asked >= lease.peak or now - lease.peak_at > self.settings.peak_window_s:
            lease.peak, lease.peak_at = asked, now
        lease.last_used = now  # asked for: not idle, even before it holds anything

    # ---- flushing, renewing, returning ----

    async def flush(self, tenant_id: str) -> None:
        """Settles what the tenant's lease has waiting now (before an account read, so a tenant reads its
        own usage at once on a one-replica tap)."""
        lease = self._leases.get(tenant_id)
        if lease is None:
            return
        if lease.renewing is not None:
            await asyncio.shield(lease.renewing)
        if lease.rows and not self._closed:
            await asyncio.shield(self._renew(lease))

    def _start_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        s = self.settings
        while self._leases and not self._closed:
            await asyncio.sleep(s.flush_s)
            now = self._clock()
            for lease in list(self._leases.values()):
                if lease.renewing is not None or (lease.out is not None and now - lease.failed_at < s.retry_s):
                    continue
                idle = lease.in_flight == 0 and not lease.rows and now - lease.last_used >= s.idle_s
                if idle and lease.hold_id is None and lease.out is None:
                    del self._leases[lease.tenant_id]  # nothing held, nothing owed
                elif (
                    idle
                    or lease.out is not None
                    or (lease.rows and (now - lease.first_row_at >= s.flush_s or len(lease.rows) >= s.flush_rows))
                    or (lease.hold_id is not None and now - lease.renewed_at >= s.renew_every_s)
                    or (
                        lease.hold_id is not None
                        and not lease.short
                        and now - lease.renewed_at >= s.top_up_every_s
                        and lease.free < self._want(lease, 0, now) // 4
                    )
                ):
                    self._renew(lease, give_back=idle)

    def _want(self, lease: Lease, need: int, now: float) -> int:
        """What the next lease hold should be: the running reservations and as many more as the tenant's
        recent demand, at least ``min_requests`` requests of the last one's size, and at least its recent
        peak (waves of requests, e.g. clients in lock step, then find the lease as large as the last wave)."""
        decay = math.exp(-(now - lease.demand_at) / self.settings.horizon_s)
        least = max(need, lease.last_need) * self.settings.min_requests
        return max(lease.in_flight + max(least, math.ceil(lease.demand * decay)), lease.peak + need)

    def _renew(self, lease: Lease, need: int = 0, *, give_back: bool = False) -> asyncio.Task[None]:
        task = lease.renewing = asyncio.ensure_future(self._renew_now(lease, need, give_back))
        task.add_done_callback(_seen)  # a failure is logged and retried; nobody need await it
        return task

    def _next(self, lease: Lease, need: int, give_back: bool, now: float) -> Renewal:
        """The renewal that settles the lease's waiting batch and opens its next hold (none: ``give_back``)."""
        settle = None
        if lease.hold_id is not None:
            charge = min(lease.unflushed, lease.held)  # less only on a lease short since its hold expired
            settle = Settle("settle-" + lease.hold_id, lease.hold_id, charge)
            # As Arrow here, on every gateway replica, so the ledger's one writer only inserts it.
            rows, lease.rows = fit(to_arrow(lease.rows), charge), []
            lease.sending, lease.waiting = lease.waiting, []
            lease.flushing, lease.unflushed = lease.unflushed, 0
        else:
            rows = ()
        ttl = self.settings.ttl_s
        if give_back and lease.in_flight == 0:
            lease.held = lease.flushing
            return Renewal(lease.tenant_id, settle, rows, None, (), ttl)
        # The settle frees ``keep`` and nothing runs in between, so the next hold can always be that big.
        keep = lease.held - lease.flushing if lease.hold_id is not None else 0
        want = self._want(lease, need, now)
        least = max(min(want, keep), lease.in_flight)  # shrinking: to ``want``, which covers what runs
        amounts = sorted({a for a in (want, lease.in_flight + need, keep) if a >= least}, reverse=True)
        lease.held = least + lease.flushing  # until the answer: admit only against what the lease surely gets
        hold_id = f"{self._prefix}-{next(self._seq)}"  # never reused: a retry's EXISTS is this renewal's own
        return Renewal(lease.tenant_id, settle, rows, hold_id, tuple(amounts), ttl)

    async def _renew_now(self, lease: Lease, need: int, give_back: bool) -> None:
        try:
            now = self._clock()
            if lease.out is None:
                lease.out, lease.out_at = self._next(lease, need, give_back, now), now
            renewal = lease.out
            answer = await self._ledger.renew(lease.tenant_id, renewal)
            lease.out = None
            lease.flushing = 0
            _done(lease.sending)  # their rows are committed
            lease.sending = []
            hold = answer.hold
            if hold is not None and hold.ok:
                lease.hold_id = renewal.hold_id
                lease.held = hold.micro_credits
                lease.short = hold.micro_credits < renewal.amounts[0]
                lease.valid_until = lease.out_at + self.settings.ttl_s - self.settings.margin_s
                lease.renewed_at = lease.out_at
            else:
                lease.hold_id, lease.held, lease.valid_until = None, 0, 0.0
            if lease.in_flight + lease.unflushed > lease.held:  # the old hold had expired and the balance is short
                log.error("lease of %s covers %d of %d running and unsettled: the rest goes uncharged",
                          lease.tenant_id, lease.held, lease.in_flight + lease.unflushed)  # fmt: skip
                if lease.hold_id is None:
                    lease.unflushed, lease.rows = 0, []
                    _done(lease.waiting)  # nothing more will be charged for them
                    lease.waiting = []
        except Exception as exc:
            lease.failed_at = self._clock()
            log.warning("lease renewal of %s failed (%s); retrying", lease.tenant_id, type(exc).__name__)
            raise
        finally:
            lease.renewing = None
        if self.settings.durable_end and lease.waiting and lease.hold_id is not None and not self._closed:
            self._renew(lease)  # the rows of requests that ended while this one was out

    async def close(self, timeout_s: float) -> int:
        """Stops admitting, settles every lease's batch and returns its hold; waits up to ``timeout_s``.
        Returns how many leases were left unsettled (their holds expire; their batches are lost)."""
        self._closed = True
        deadline = self._clock() + timeout_s
        left = 0
        for lease in list(self._leases.values()):
            while lease.hold_id is not None or lease.out is not None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                try:
                    if lease.renewing is not None:
                        await asyncio.wait_for(asyncio.shield(lease.renewing), remaining)
                    else:
                        await asyncio.wait_for(asyncio.shield(self._renew(lease, give_back=True)), remaining)
                except Exception:  # noqa: BLE001  # retried until the deadline
                    await asyncio.sleep(min(self.settings.retry_s, max(0.0, deadline - self._clock())))
            if lease.hold_id is not None or lease.out is not None:
                left += 1
        if left:
            log.error("%d leases not returned at shutdown: their holds expire in %d s", left, self.settings.ttl_s)
        return left


def _done(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def _seen(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()

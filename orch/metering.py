"""Metering a request: admitting it against its worst-case cost (:class:`Admission`: on the replica's
credit lease, else a hold of its own, else 402), and settling it with the engine's exact counts
(:class:`Settler`: into the lease's next batch, or one Settle with its usage row in the tenant's ledger,
retried with the same op id until it commits, and drained when a gateway stops).

Pure asyncio over small ledger seams (:class:`SettleLedger`, ``orch.lease.LeaseLedger``; the gateway
passes its ``LedgerClient``), so the money path is tested without Ray (``tests/unit/test_metering.py``).
A retry can never charge twice: the ledger answers a repeated op id with the first result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from orch.billing import Principal
from orch.engine import Delta
from orch.errors import Forbidden, InsufficientCredits
from orch.lease import Lease, Leases
from orch.ledger import Code, Hold, Op, Price, Release, Result, Settle, cost
from orch.store import UsageRow

log = logging.getLogger("ray.serve")

# A settle is retried this long (a late one still charges the balance); within the ledger's idempotency window.
SETTLE_RETRY_S = 12 * 3600.0
SETTLE_BACKOFF_MAX_S = 30.0


class SettleLedger(Protocol):
    """What settling needs of the ledger (``actors.ledger.LedgerClient``)."""

    async def apply(self, tenant_id: str, op: Op, usage: UsageRow | None = None) -> Result: ...

    async def tenant_call(self, tenant_id: str, method: str, *args: Any) -> Any: ...


@dataclass
class Meter:
    """One admitted request: its hold, timings and the last counts the engine reported."""

    principal: Principal
    model: str
    price: Price
    request_id: str
    hold_id: str | None  # a hold of its own; None: on a lease, or contract billing (nothing held)
    held: int = 0  # micro-credits its hold or its lease reserved
    lease: Lease | None = None  # admitted on a credit lease (orch.lease): settled in the lease's next batch
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.monotonic)
    ttft_ms: int | None = None
    last: Delta | None = None
    settled: asyncio.Future[None] | None = None
    end_user: str | None = None  # the request's ``user``
    http_request_id: str | None = None  # its X-Request-Id
    release: Callable[[], None] | None = None  # gives its engine place back (orch.admission) when it ends
    headers: dict[str, str] = field(default_factory=dict)  # more response headers (x-ratelimit-*)

    def first_token(self) -> None:
        self.ttft_ms = round((time.monotonic() - self.t0) * 1000)

    def overhead_ms(self) -> float:
        """Time this request spent outside the engine so far: since the gateway took it, less the engine's
        own time up to its last delta (auth, the hold, the hops to the replica and back). Sent to the
        client as the ``x-orch-overhead-ms`` header.

        >>> meter = Meter(None, "m", None, "r", None, t0=time.monotonic() - 0.050)  # type: ignore[arg-type]
        >>> meter.last = Delta("Hi", 3, 1, engine_ms=30.0)
        >>> 19.0 < meter.overhead_ms() < 40.0
        True
        """
        engine = self.last.engine_ms if self.last is not None else 0.0
        return max(0.0, (time.monotonic() - self.t0) * 1000 - engine)


class Settler:
    """Settles meters and releases abandoned holds in tasks of their own (a client that goes away
    cancels its response, never its settle), retrying each with the same op id; :meth:`drain` waits
    for the ones still pending when the replica stops. A meter admitted on a lease is handed to
    ``leases`` instead, at once: its cost and row go out in the lease's next batch.

    >>> settler = Settler(ledger_client, "public")  # doctest: +SKIP
    >>> await settler.settle(meter, "ok")  # doctest: +SKIP
    """

    def __init__(
        self,
        ledger: SettleLedger,
        tap: str,
        *,
        retry_s: float = SETTLE_RETRY_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        leases: Leases | None = None,
        observe: Callable[[Meter, UsageRow], None] | None = None,
    ) -> None:
        self._ledger = ledger
        self._observe = observe  # sees each settled request's row (the tap's post_call hooks)
        self._leases = leases
        self._tap = tap
        self._retry_s = retry_s
        self._sleep = sleep
        self._clock = clock
        self._pending: set[asyncio.Task[Any]] = set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def settle(self, meter: Meter, status: str) -> asyncio.Future[None]:
        """Charges the tokens the engine reported and writes the usage row. Idempotent per request."""
        if meter.settled is None:
            release, meter.release = meter.release, None
            if release is not None:  # its place in the engine goes to the next request waiting
                try:
                    release()
                except Exception:  # never in the way of the charge
                    log.exception("releasing %s's admission place failed", meter.request_id)
            charge, row = self._usage(meter, status)
            if meter.lease is not None and self._leases is not None:
                # Done once the lease's batch with this row committed (LeaseSettings.durable_end).
                meter.settled = self._leases.finish(meter.lease, meter.held, row)
            else:
                meter.settled = self._track(self._settle_now(meter, charge, row))
            if self._observe is not None:
                try:
                    self._observe(meter, row)
                except Exception:  # never in the way of the charge
                    log.exception("observing %s's settle failed", meter.request_id)
        return meter.settled

    def release(self, tenant_id: str, hold_id: str) -> None:
        """Releases a hold whose request never ran (its client left while the hold committed)."""
        self._track(self._commit(tenant_id, Release("release-" + hold_id, hold_id), None, hold_id))

    def _track(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def drain(self, timeout_s: float) -> int:
        """Waits up to ``timeout_s`` for pending settles and releases; returns how many did not finish
        (each logged: its usage is lost and its hold expires)."""
        pending = set(self._pending)
        if not pending:
            return 0
        log.info("draining %d pending settles", len(pending))
        _, left = await asyncio.wait(pending, timeout=timeout_s)
        for task in left:
            task.cancel()
        if left:
            log.error("%d settles did not commit before shutdown; their holds will expire", len(left))
        return len(left)

    def _usage(self, meter: Meter, status: str) -> tuple[int, UsageRow]:
        """What the request costs (at most what it reserved) and its usage row."""
        last = meter.last
        prompt_tokens = last.prompt_tokens if last else 0
        completion_tokens = last.completion_tokens if last else 0
        billed = meter.hold_id is not None or meter.lease is not None
        charge = cost(meter.price, prompt_tokens, completion_tokens) if billed else 0
        if charge > meter.held and billed:  # the bound failed: charge what was held, and say so
            log.error("request %s cost %d over its hold of %d; charging the hold", meter.request_id, charge, meter.held)
            charge = meter.held
        row = UsageRow(
            meter.request_id,
            meter.started_at,
            meter.principal.tenant_id,
            meter.principal.key_id,
            self._tap,
            meter.model,
            prompt_tokens,
            completion_tokens,
            charge,
            meter.ttft_ms,
            round((time.monotonic() - meter.t0) * 1000),
            status,  # type: ignore[arg-type]
            last.finish_reason if last else None,
            meter.end_user,
            meter.http_request_id,
        )
        return charge, row

    async def _settle_now(self, meter: Meter, charge: int, row: UsageRow) -> None:
        tenant = meter.principal.tenant_id
        op = Settle("settle-" + meter.request_id, meter.hold_id, charge) if meter.hold_id else None
        await self._commit(tenant, op, row, meter.request_id)

    async def _commit(self, tenant: str, op: Op | None, row: UsageRow | None, what: str) -> None:
        """Applies ``op`` (or records ``row`` alone) until the ledger answers, backing off; the op id
        makes every retry the same op."""
        deadline = self._clock() + self._retry_s
        delay = 0.5
        name = type(op).__name__ if op is not None else "Record"
        while True:
            try:
                if op is None:
                    await self._ledger.tenant_call(tenant, "record", row)
                    return
                result = await self._ledger.apply(tenant, op, row)
                break
            except Exception as exc:  # LedgerUnavailable or a Ray failure: the op id makes a retry safe
                if self._clock() + delay > deadline:
                    log.error("%s of %s failed for good (%s)", name, what, type(exc).__name__)
                    return
                log.warning("%s of %s failed (%s); retrying in %.1f s", name, what, type(exc).__name__, delay)
                await self._sleep(delay)
                delay = min(delay * 2, SETTLE_BACKOFF_MAX_S)
        if result.ok and result.late and isinstance(op, Settle):  # the hold timed out first: charged from the balance
            log.warning("%s of %s came after its hold expired: %d of %d micro-credits charged",
                        name, what, result.micro_credits, op.micro_credits)  # fmt: skip
        elif not result.ok:
            log.error("%s of %s refused: %s", name, what, result.code.value)


class Admission:
    """Admits a credits-billed request against its worst-case cost ``amount``: on the tenant's lease
    here (``leases``; no ledger round trip unless it must grow), else by a hold of its own committed in
    the ledger (``hold_timeout_s``), else 402 (:class:`InsufficientCredits`) saying what is free.

    >>> admission = Admission(ledger_client, settler, leases, hold_timeout_s=3600)  # doctest: +SKIP
    >>> meter = await admission.admit(principal, "m", price, "cmpl-1", 53, why="31 prompt tokens")  # doctest: +SKIP
    """

    def __init__(self, ledger: SettleLedger, settler: Settler, leases: Leases | None, *, hold_timeout_s: int) -> None:
        self._ledger = ledger
        self._settler = settler
        self._leases = leases
        self._hold_timeout_s = hold_timeout_s

    async def admit(self, principal: Principal, model: str, price: Price, request_id: str, amount: int,
                    *, why: str) -> Meter:  # fmt: skip
        """The request's meter once ``amount`` is reserved; ``why`` explains the amount in a 402."""
        tenant = principal.tenant_id
        lease_free = 0
        if self._leases is not None:
            lease = await self._leases.admit(tenant, amount)  # no await unless the lease must grow first
            if lease is not None:
                return Meter(principal, model, price, request_id, None, amount, lease=lease)
            lease_free = self._leases.free(tenant)
        hold_id = "hold-" + request_id
        pending = asyncio.ensure_future(self._ledger.apply(tenant, Hold(hold_id, tenant, amount, self._hold_timeout_s)))
        try:
            result: Result = await asyncio.shield(pending)
        except asyncio.CancelledError:  # the client left; the hold may still commit: release it then
            pending.add_done_callback(lambda done: self._release_if_held(done, tenant, hold_id))
            raise
        if result.code is Code.INSUFFICIENT_CREDITS:
            raise InsufficientCredits(
                f"Insufficient credits: this request may cost up to {amount} micro-credits ({why}); "
                f"{result.available + lease_free} micro-credits are free. Add credits, or lower max_tokens.",
                code="insufficient_credits",
                hold=amount,
                balance=result.available + lease_free,
            )
        if not result.ok:
            raise Forbidden(f"This key's tenant cannot be billed ({result.code.value}).", code=result.code.value)
        return Meter(principal, model, price, request_id, hold_id, amount)

    def _release_if_held(self, done: asyncio.Future[Result], tenant: str, hold_id: str) -> None:
        if done.cancelled() or done.exception() is not None or done.result().code is not Code.OK:
            return
        self._settler.release(tenant, hold_id)

"""Admission to one model replica's engine: at most ``max_running`` requests run; the rest wait in a
bounded queue, ordered by priority class (``interactive`` before ``batch``), then by weighted fair share
across tenants (start-time fair queueing), not by arrival; past the bound, or when the wait it
predicts from the measured drain rate is too long, a 429 that says when to come back.

With fair share, the last ``reserve`` places of the batch are never filled from the queue: they are kept
for a request whose tenant runs nothing, which then starts at the engine's next step instead of waiting for
one of a flood's requests to end (on a small batch a place frees only every few steps).

A queued request holds no credits (the front holds after admission) and a client that leaves while
queued leaves the queue. When the engine has room and nobody waits, :meth:`AdmissionQueue.enter`
returns at once: a counter, no await, no lock.

>>> import asyncio
>>> async def demo():
...     queue = AdmissionQueue(AdmissionSettings(max_running=1))
...     await queue.enter("a")       # runs at once
...     later = asyncio.ensure_future(queue.enter("b"))
...     await asyncio.sleep(0)
...     waiting = queue.waiting
...     queue.leave("a")             # a's request ended: b's starts
...     await later
...     return waiting, queue.running
>>> asyncio.run(demo())
(1, 1)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from orch.errors import InvalidRequest, RateLimited

if TYPE_CHECKING:
    from orch.config import ModelConfig, TapConfig

Priority = Literal["interactive", "batch"]
_RANK = {"interactive": 0, "batch": 1}


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    max_running: int  # requests in the engine at once: its batch (vLLM max_num_seqs)
    max_queue: int = 256  # requests waiting; past it, 429
    max_wait_s: float = 60.0  # a request whose predicted wait is longer gets 429 at once
    fair_share: bool = True  # False: first come, first served within a priority class
    weights: dict[str, float] = field(default_factory=dict)  # tenant id -> weight (default 1)
    reserve: int = 0  # places of max_running kept for a tenant with nothing running (fair share only)

    def __post_init__(self) -> None:
        if not 0 <= self.reserve < self.max_running:
            raise ValueError(f"reserve must be in [0, max_running): {self.reserve} of {self.max_running}")


@dataclass(slots=True)
class _Waiter:
    tenant: str
    future: asyncio.Future[None]
    gone: bool = False  # the client left while queued: skipped when reached


class DrainRate:
    """Requests finished per second while the engine was saturated: the gaps between completions within
    saturated stretches, over a sliding window of the last ``window``. A gap while the gate was not
    saturated (:meth:`pause`: an idle minute between two bursts) is no drain time. Forgotten when stale
    (an idle hour must not predict a long wait)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: int = 32, stale_s: float = 10.0) -> None:
        self._clock = clock
        self._gaps: deque[float] = deque(maxlen=window)
        self._last: float | None = None  # the last completion of the current saturated stretch
        self._seen = -math.inf  # the last completion, any stretch
        self._stale_s = stale_s

    def tick(self) -> None:
        """A request finished while the gate was saturated."""
        now = self._clock()
        if now - self._seen > self._stale_s:
            self._gaps.clear()
        elif self._last is not None:
            self._gaps.append(now - self._last)
        self._last = self._seen = now

    def pause(self) -> None:
        """A request finished and nothing waits: the saturated stretch ended."""
        self._last = None

    def per_second(self) -> float | None:
        """None until a gap within a stretch was seen. The time since the last completion counts while
        the stretch lasts (a stalled engine drains slower)."""
        now = self._clock()
        if not self._gaps or now - self._seen > self._stale_s:
            return None
        span = sum(self._gaps) + (now - self._last if self._last is not None else 0.0)
        return len(self._gaps) / span if span > 0 else None


class AdmissionQueue:
    """The admission gate of one engine; ``enter`` before the hold, ``leave`` when the request ended."""

    def __init__(self, settings: AdmissionSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.running = 0
        self._fill = settings.max_running - (settings.reserve if settings.fair_share else 0)  # from the queue
        self._running_by: dict[str, int] = {}  # tenant -> requests running
        self._heap: list[tuple[int, float, int, _Waiter]] = []
        self._finish: dict[tuple[int, str], float] = {}  # (class, tenant) -> finish tag of its last queued request
        self._virtual = [0.0, 0.0]  # per class: start tag of the request admitted last
        self._seq = itertools.count()
        self._queued: dict[str, int] = {}  # tenant -> requests waiting
        self._by_rank = [0, 0]  # requests waiting per class
        self._gone = 0  # heap entries of clients that left (dropped when reached, or on compaction)
        self.drain = DrainRate(clock)

    @property
    def waiting(self) -> int:
        return self._by_rank[0] + self._by_rank[1]

    def queued(self) -> dict[str, int]:
        """Requests waiting, per tenant."""
        return {t: n for t, n in self._queued.items() if n}

    async def enter(self, tenant: str, priority: Priority = "interactive", weight: float | None = None) -> None:
        """Returns when the request may run; 429 (:class:`RateLimited`) when it cannot wait. ``weight``:
        the tenant's fair-share weight from the admin API, else the settings', else 1."""
        if self.running < self._fill and not self.waiting:
            self._start(tenant)
            return
        rank = _RANK[priority]
        if self.running < self.settings.max_running and self._may_take_reserve(tenant, rank):
            self._start(tenant)
            return
        self._check_room(rank, tenant)
        seq = next(self._seq)
        if self.settings.fair_share:
            start = max(self._virtual[rank], self._finish.get((rank, tenant), 0.0))
            self._finish[(rank, tenant)] = start + 1.0 / (weight or self.settings.weights.get(tenant, 1.0))
        else:
            start = float(seq)
        waiter = _Waiter(tenant, asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, (rank, start, seq, waiter))
        self._queued[tenant] = self._queued.get(tenant, 0) + 1
        self._by_rank[rank] += 1
        try:
            await waiter.future  # or RateLimited: pushed out of a full queue for a lighter tenant's request
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.leave(tenant)  # admitted as it was cancelled: give the place on
            elif not waiter.gone:
                self._forget(waiter, rank)
            raise

    def _start(self, tenant: str) -> None:
        self.running += 1
        self._running_by[tenant] = self._running_by.get(tenant, 0) + 1

    def _may_take_reserve(self, tenant: str, rank: int) -> bool:
        """A reserved place: for a tenant with nothing running or waiting, when no higher class waits."""
        return (
            self._fill < self.settings.max_running
            and not self._running_by.get(tenant)
            and not self._queued.get(tenant)
            and not any(self._by_rank[:rank])
        )

    def leave(self, tenant: str) -> None:
        """A request of ``tenant`` that entered ended (however): the next one waiting starts."""
        if self.running >= self._fill or self.waiting:
            self.drain.tick()  # the drain rate is measured while the engine is full
        else:
            self.drain.pause()
        self.running -= 1
        if (left := self._running_by[tenant] - 1) > 0:
            self._running_by[tenant] = left
        else:
            del self._running_by[tenant]
        while self._heap and self.running < self._fill:
            rank, start, _, waiter = heapq.heappop(self._heap)
            if waiter.gone:
                self._gone -= 1
                continue
            if waiter.future.done():  # cancelled, its task not yet told: it is gone now
                self._forget(waiter, rank)
                self._gone -= 1
                continue
            self._queued[waiter.tenant] -= 1
            self._by_rank[rank] -= 1
            if self.settings.fair_share:
                self._virtual[rank] = max(self._virtual[rank], start)
                self._prune(waiter.tenant, rank)
            self._start(waiter.tenant)
            waiter.future.set_result(None)

    def _forget(self, waiter: _Waiter, rank: int) -> None:
        """A client left while queued: its place is skipped when reached; many such places are dropped."""
        waiter.gone = True
        self._gone += 1
        self._queued[waiter.tenant] -= 1
        self._by_rank[rank] -= 1
        if self._gone > 64 and self._gone * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[3].gone]
            heapq.heapify(self._heap)
            self._gone = 0

    def _prune(self, tenant: str, rank: int) -> None:
        """A tenant with nothing queued whose tag the clock passed needs no tag (keeps the map small)."""
        if not self._queued.get(tenant) and self._finish.get((rank, tenant), 0.0) <= self._virtual[rank]:
            self._finish.pop((rank, tenant), None)
            self._queued.pop(tenant, None)

    def predicted_wait_s(self, ahead: int) -> float | None:
        rate = self.drain.per_second()
        return None if rate is None else ahead / rate

    def _check_room(self, rank: int, tenant: str) -> None:
        """Only requests that would start before this one count: a batch backlog never refuses interactive.
        A full queue makes room by refusing the newest request of the tenant with the most waiting, when
        that tenant has more waiting than this one's: the flood gets the 429s, not the light tenant."""
        ahead = sum(self._by_rank[: rank + 1])
        if ahead >= self.settings.max_queue and self._evict_for(tenant, rank):
            ahead -= 1
        wait = self.predicted_wait_s(ahead + 1)
        if ahead < self.settings.max_queue and (wait is None or wait <= self.settings.max_wait_s):
            return
        raise self._refusal("the queue is full" if ahead >= self.settings.max_queue else None, wait)

    def _refusal(self, why: str | None, wait: float | None) -> RateLimited:
        retry = max(1, min(600, math.ceil(wait if wait is not None else self.settings.max_wait_s)))
        return RateLimited(
            f"This model is saturated ({self.running} running, {self.waiting} waiting: "
            f"{why or f'the wait would be ~{retry} s'}). Retry after {retry} s.",
            code="model_overloaded",
            retry_after_s=retry,
        )

    def _evict_for(self, tenant: str, rank: int) -> bool:
        """Refuses the newest waiting request of the heaviest other tenant (of this class or a lower one)."""
        if not self.settings.fair_share:
            return False
        heaviest = max(self.queued().items(), key=lambda item: item[1], default=(tenant, 0))
        if heaviest[0] == tenant or heaviest[1] <= self._queued.get(tenant, 0) + 1:
            return False
        entries = [e for e in self._heap if e[3].tenant == heaviest[0] and e[0] >= rank and not e[3].gone]
        if not entries:
            return False
        victim_rank, _, _, victim = max(entries, key=lambda e: e[2])  # the newest
        self._forget(victim, victim_rank)
        wait = self.predicted_wait_s(self.waiting)
        victim.future.set_exception(self._refusal("the queue is full and this tenant has the most waiting", wait))
        return True


def admission_settings(tap: TapConfig, model: ModelConfig) -> AdmissionSettings:
    """The gate's settings from the tap's ``admission`` config: ``max_running`` defaults to the engine's
    batch (``max_num_seqs``), so requests past it wait here, in order, instead of in vLLM's FIFO.

    >>> from orch.config import TapConfig
    >>> tap = TapConfig.model_validate({"models": [{"name": "m"}], "admission": {"max_running": 4}})
    >>> admission_settings(tap, tap.models[0]).max_running
    4
    """
    a = tap.admission
    running = a.max_running or model.engine.max_num_seqs
    if not tap.colocated:  # each of the gateway's replicas gates its share of the model's replicas' batches
        running = math.ceil(running * model.autoscaling.max_replicas / tap.gateway.num_replicas)
    reserve = min(running // 64 if a.reserve is None else a.reserve, running - 1)
    return AdmissionSettings(running, a.max_queue, a.max_wait_s, a.fair_share, dict(a.weights), reserve)


def request_priority(header: str | None, floor: str | None = None) -> Priority:
    """The ``X-Priority`` header: ``interactive`` (the default) or ``batch``; it may lower the class of
    the key (``floor``, set at key creation or on its tenant), never raise it.

    >>> request_priority("Batch"), request_priority(None, "batch"), request_priority("interactive", "batch")
    ('batch', 'batch', 'batch')
    """
    value = (header or "interactive").strip().lower()
    if value not in _RANK:
        raise InvalidRequest(
            f"Invalid X-Priority header {header!r}: expected 'interactive' or 'batch'.", code="invalid_priority"
        )
    if floor is not None and _RANK.get(floor, 0) > _RANK[value]:
        return floor  # type: ignore[return-value]
    return value  # type: ignore[return-value]

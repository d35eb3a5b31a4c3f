"""The admission queue's order and limits, on one event loop with a fake clock (no engine, no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from orch.admission import AdmissionQueue, AdmissionSettings
from orch.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _queue_up(queue: AdmissionQueue, order: list[str], requests: list[tuple[str, str]]) -> list[asyncio.Task]:
    async def one(tenant: str, priority: str, label: str) -> None:
        await queue.enter(tenant, priority)  # type: ignore[arg-type]
        order.append(label)

    tasks = []
    for i, (tenant, priority) in enumerate(requests):
        tasks.append(asyncio.ensure_future(one(tenant, priority, f"{tenant}{i}")))
        await asyncio.sleep(0)  # arrival order is the list's
    return tasks


async def _drain(queue: AdmissionQueue, tasks: list[asyncio.Task], order: list[str], first: str) -> None:
    """With one place: ends the running request (``first``'s), then each admitted one in turn."""
    for i in range(len(tasks)):
        queue.leave(first if i == 0 else order[i - 1].rstrip("0123456789"))
        await asyncio.sleep(0)


def test_a_light_tenant_is_not_queued_behind_a_flood() -> None:
    async def run(fair: bool) -> list[str]:
        queue = AdmissionQueue(AdmissionSettings(max_running=1, fair_share=fair))
        await queue.enter("a")  # the engine is full
        order: list[str] = []
        tasks = await _queue_up(queue, order, [("a", "interactive")] * 6 + [("b", "interactive")])
        await _drain(queue, tasks, order, "a")
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run(fair=True))[:2] == ["a0", "b6"]  # b's first request goes after a's first, not its sixth
    assert asyncio.run(run(fair=False))[-1] == "b6"  # first come, first served


def test_weights_share_admissions_in_proportion() -> None:
    async def run() -> list[str]:
        queue = AdmissionQueue(AdmissionSettings(max_running=1, weights={"a": 2.0}))
        await queue.enter("x")
        order: list[str] = []
        tasks = await _queue_up(queue, order, [("a", "interactive")] * 8 + [("b", "interactive")] * 8)
        await _drain(queue, tasks, order, "x")
        await asyncio.gather(*tasks)
        return order

    first_nine = [label[0] for label in asyncio.run(run())[:9]]
    assert first_nine.count("a") == 6 and first_nine.count("b") == 3


def test_interactive_requests_start_before_queued_batch_ones() -> None:
    async def run() -> list[str]:
        queue = AdmissionQueue(AdmissionSettings(max_running=1))
        await queue.enter("x")
        order: list[str] = []
        tasks = await _queue_up(queue, order, [("a", "batch")] * 3 + [("b", "interactive")] * 2)
        await _drain(queue, tasks, order, "x")
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == ["b3", "b4", "a0", "a1", "a2"]


def test_a_client_that_leaves_while_queued_leaves_the_queue() -> None:
    async def run() -> tuple[int, int, list[str]]:
        queue = AdmissionQueue(AdmissionSettings(max_running=1))
        await queue.enter("x")
        order: list[str] = []
        tasks = await _queue_up(queue, order, [("a", "interactive"), ("b", "interactive")])
        tasks[0].cancel()
        await asyncio.sleep(0)
        waiting = queue.waiting
        queue.leave("x")  # x ended: b starts, a's place is skipped
        await tasks[1]
        return waiting, queue.running, order

    assert asyncio.run(run()) == (1, 1, ["b1"])


def test_past_the_bound_or_the_wait_limit_a_429_says_when_to_come_back() -> None:
    async def run() -> tuple[RateLimited, RateLimited]:
        clock = Clock()
        queue = AdmissionQueue(AdmissionSettings(max_running=1, max_queue=2, max_wait_s=5.0), clock)
        await queue.enter("x")
        tasks = await _queue_up(queue, [], [("a", "interactive")] * 2)
        with pytest.raises(RateLimited) as full:
            await queue.enter("a")
        for tenant in ("x", "a"):  # two requests ended 1 s apart: 1 request/s drains
            clock.now += 1.0
            queue.leave(tenant)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        slow = AdmissionQueue(AdmissionSettings(max_running=1, max_wait_s=2.0), clock)
        slow.drain = queue.drain
        await slow.enter("x")
        tasks = await _queue_up(slow, [], [("a", "interactive")] * 2)  # 3 ahead would wait ~3 s at 1/s
        with pytest.raises(RateLimited) as long:
            await slow.enter("b")
        for task in tasks:
            task.cancel()
        return full.value, long.value

    full, long = asyncio.run(run())
    assert full.status == 429 and full.retry_after_s is not None and full.headers()["retry-after"]
    assert long.retry_after_s == 3 and "wait would be" in long.message


def test_a_waiter_cancelled_just_before_its_turn_neither_runs_nor_leaks_a_place() -> None:
    """cancel() marks the future at once, the task hears of it a loop turn later: a leave() in between
    must skip it, and the counts stay right (found in review: running stuck at 1, waiting -1)."""

    async def run() -> tuple[int, int, list[str]]:
        queue = AdmissionQueue(AdmissionSettings(max_running=1))
        await queue.enter("x")
        order: list[str] = []
        tasks = await _queue_up(queue, order, [("a", "interactive"), ("b", "interactive")])
        tasks[0].cancel()
        queue.leave("x")  # before a's task ran its handler
        await asyncio.sleep(0)
        await tasks[1]
        queue.leave("b")  # b ended
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        return queue.running, queue.waiting, order

    assert asyncio.run(run()) == (0, 0, ["b1"])


def test_a_batch_backlog_never_refuses_interactive_requests() -> None:
    async def run() -> RateLimited | None:
        queue = AdmissionQueue(AdmissionSettings(max_running=1, max_queue=2))
        await queue.enter("x")
        tasks = await _queue_up(queue, [], [("a", "batch")] * 2)  # the queue is full of batch
        try:
            interactive = asyncio.ensure_future(queue.enter("b"))
            await asyncio.sleep(0)
            assert not interactive.done()  # queued, not refused
            with pytest.raises(RateLimited) as err:
                await queue.enter("c", "batch")
            return err.value
        finally:
            for task in [*tasks, interactive]:
                task.cancel()

    assert asyncio.run(run()) is not None


def test_the_drain_rate_forgets_an_idle_spell() -> None:
    from orch.admission import DrainRate

    clock = Clock()
    rate = DrainRate(clock, stale_s=10.0)
    for _ in range(4):
        clock.now += 0.5
        rate.tick()
    assert rate.per_second() == pytest.approx(2.0)
    clock.now += 3600  # an idle hour: no prediction rather than a wrong one
    assert rate.per_second() is None
    rate.tick()
    assert rate.per_second() is None  # one fresh completion is not a rate yet


def test_the_drain_rate_skips_the_lull_between_two_bursts() -> None:
    from orch.admission import DrainRate

    clock = Clock()
    rate = DrainRate(clock, stale_s=10.0)
    for _ in range(5):  # a burst drains at 4 per second
        clock.now += 0.25
        rate.tick()
    rate.pause()  # the queue emptied
    clock.now += 8.0  # a lull, shorter than stale
    rate.tick()  # the next burst's first completion
    assert rate.per_second() == pytest.approx(4.0)  # not 5 completions over 9 s
    clock.now += 2.0  # then the engine stalls for 2 s, still saturated: the estimate drops
    assert rate.per_second() == pytest.approx(4 / 3.0)


def test_a_full_queue_refuses_the_flood_not_the_light_tenant() -> None:
    async def run() -> tuple[list[str], list[object]]:
        queue = AdmissionQueue(AdmissionSettings(max_running=1, max_queue=3))
        await queue.enter("x")
        order: list[str] = []
        flood = await _queue_up(queue, order, [("a", "interactive")] * 3)  # the queue is full of a's
        light = await _queue_up(queue, order, [("b", "interactive")])
        outcome = await asyncio.gather(flood[-1], return_exceptions=True)  # a's newest was pushed out
        await _drain(queue, [*flood[:2], *light], order, "x")
        await asyncio.gather(*flood[:2], *light)
        return order, outcome

    order, outcome = asyncio.run(run())
    assert isinstance(outcome[0], RateLimited) and outcome[0].retry_after_s
    assert sorted(order) == ["a0", "a1", "b0"] and order.index("b0") <= 1


def test_a_reserved_place_starts_a_tenant_with_nothing_running_at_once() -> None:
    async def run() -> tuple[bool, bool, bool, list[str]]:
        queue = AdmissionQueue(AdmissionSettings(max_running=3, reserve=1))
        await queue.enter("a")
        await queue.enter("a")  # the places the queue fills are full
        order: list[str] = []
        flood = await _queue_up(queue, order, [("a", "interactive")] * 2)
        light = asyncio.ensure_future(queue.enter("b"))  # b runs nothing: the reserved place
        await asyncio.sleep(0)
        b_started = light.done()
        second = asyncio.ensure_future(queue.enter("b"))  # b runs one now: it queues, by its fair share
        batch = asyncio.ensure_future(queue.enter("c", "batch"))  # interactive ones wait: no reserve for batch
        await asyncio.sleep(0)
        queued = not second.done() and not batch.done()
        queue.leave("a")  # 2 run (a, b): the queue fills no place, the reserve stays free
        await asyncio.sleep(0)
        reserve_kept = queue.running == 2 and not second.done() and not order
        queue.leave("b")  # b's first ended: a place to fill, by the tags (a's first, then b's second)
        await asyncio.sleep(0)
        for task in [*flood, second, batch]:
            task.cancel()
        await asyncio.gather(*flood, second, batch, return_exceptions=True)
        return b_started, queued, reserve_kept, order

    assert asyncio.run(run()) == (True, True, True, ["a0"])


def test_without_fair_share_no_place_is_reserved() -> None:
    async def run() -> tuple[int, bool]:
        queue = AdmissionQueue(AdmissionSettings(max_running=2, reserve=1, fair_share=False))
        await queue.enter("a")
        await queue.enter("a")  # both places: first come, first served
        light = asyncio.ensure_future(queue.enter("b"))
        await asyncio.sleep(0)
        light.cancel()
        return queue.running, light.done() and not light.cancelled()

    assert asyncio.run(run()) == (2, False)


def test_the_reserve_must_leave_a_place_to_fill() -> None:
    with pytest.raises(ValueError, match="reserve"):
        AdmissionSettings(max_running=1, reserve=1)


def test_a_request_pushed_out_then_cancelled_gives_back_no_place() -> None:
    """Found with the reserve: a waiter refused for a lighter tenant (its future holds the 429) and cancelled
    before its task ran took the "admitted as it was cancelled" branch and freed a place it never had."""

    async def run() -> tuple[int, int]:
        queue = AdmissionQueue(AdmissionSettings(max_running=1, max_queue=2))
        await queue.enter("x")
        flood = await _queue_up(queue, [], [("a", "interactive")] * 2)
        light = asyncio.ensure_future(queue.enter("b"))  # pushes a's newest out
        await asyncio.sleep(0)
        flood[1].cancel()  # before its task heard of the 429
        await asyncio.sleep(0)
        running = queue.running
        for task in [flood[0], light]:
            task.cancel()
        await asyncio.gather(*flood, light, return_exceptions=True)
        return running, queue.waiting

    assert asyncio.run(run()) == (1, 0)

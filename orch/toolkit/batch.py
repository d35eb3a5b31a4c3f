"""The batch runner: many prompts through a tap, a concurrency limit, a progress bar, a credit cap it never
exceeds, results to Parquet, resumable after a crash without paying twice for finished items.

- **The cap is held up front.** Before an item is sent, its worst case (the model's prices from its
  model card, the prompt's UTF-8 bytes as a bound on its tokens plus the chat template's, and
  ``max_tokens``) is reserved against the cap; an item whose worst case does not fit waits for the
  items in flight, and when nothing is in flight and it still does not fit, the run stops. A finished
  item counts its real cost (its usage at the model's prices: the ledger's own arithmetic), so what it
  spends is at most the cap, across every run of the same output.
- **The journal** (``OUT.journal``, JSON lines, flushed and fsynced) says which items were sent with
  what reserve, and which finished with what answer and cost. A rerun skips the finished ones and counts
  the reserve of those sent but never finished (a crash may have let the tap charge part of them)
  against the cap. The Parquet file is written from the journal at the end of every run.

>>> from orch import AsyncClient  # doctest: +SKIP
>>> report = run_batch(AsyncClient(BASE, KEY), "smollm2-135m-instruct", ["Hi", "Name a colour."],
...                    "answers.parquet", credit_cap=50_000, max_tokens=16)  # doctest: +SKIP
>>> report.done, report.stopped  # doctest: +SKIP
(2, None)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from orch.pricing import Price, cost

TEMPLATE_TOKENS = 64  # a chat template's own tokens (its default system prompt included), a generous bound
MESSAGE_TOKENS = 16  # per message: role markers and separators
RETRIES_429 = 8

RESULTS = pa.schema([
    ("id", pa.string()), ("answer", pa.string()), ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("cost_micro", pa.int64()),
    ("request_id", pa.string()),
])  # fmt: skip


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    body: dict[str, Any]  # the chat request, less the model
    digest: str


@dataclass(frozen=True, slots=True)
class BatchReport:
    done: int  # items with a result in the output, every run counted
    ran: int  # items this run finished
    resumed: int  # items an earlier run had finished
    left: int  # items without a result
    spent_micro: int  # what this run's finished items cost (the ledger's debits for them)
    committed_micro: int  # what counts against the cap, every run counted
    stopped: str | None  # why it stopped early: "credit cap", "insufficient credits"; None: it ran out of items
    failed: int  # items that failed this run (in the journal with their error; a rerun tries them again)
    out: Path


def items_of(prompts: Iterable[str | dict[str, Any]], max_tokens: int, request: dict[str, Any]) -> list[Item]:
    """Each prompt as an :class:`Item`: a string is one user message; a dict has ``messages`` (or
    ``prompt``), and may have an ``id`` (else its position) and other chat request fields."""
    items, seen = [], set()
    for i, p in enumerate(prompts):
        spec = {"prompt": p} if isinstance(p, str) else dict(p)
        item_id = str(spec.pop("id", i))
        if item_id in seen:
            raise ValueError(f"two items have the id {item_id!r}")
        seen.add(item_id)
        text, messages = spec.pop("prompt", None), spec.pop("messages", None)
        if messages is None:
            if text is None:
                raise ValueError(f"item {item_id}: give a prompt or messages")
            messages = [{"role": "user", "content": text}]
        body = {"max_tokens": max_tokens} | request | spec | {"messages": messages}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        items.append(Item(item_id, body, digest))
    return items


def worst_case(price: Price, body: dict[str, Any]) -> int:
    """An item's most possible cost: every byte of its messages a token, the template's own, all of
    ``max_tokens`` (n times)."""
    text = sum(len(json.dumps(m.get("content"), ensure_ascii=False).encode()) for m in body["messages"])
    prompt = text + TEMPLATE_TOKENS + MESSAGE_TOKENS * len(body["messages"])
    return cost(price, prompt, int(body["max_tokens"]) * int(body.get("n", 1)))


class Journal:
    """``OUT.journal``: one JSON line per event, on disk before the run goes on. Replaying it gives the
    finished items and what counts against the cap: their costs, the reserves of this run's requests in
    flight, and the reserves of requests that may have cost something without finishing (``orphaned``:
    sent by a run that crashed, or failed on the tap's side)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        self.open: dict[str, int] = {}  # item -> the reserve of its request in flight
        self.orphaned = 0
        self.spent = 0  # the finished items' costs
        self.reserved = 0  # the reserves of the requests in ``open``
        self.digests: dict[str, str] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a crash cut short
                self._apply(event)
            self.orphaned += self.reserved  # in flight when the last run died
            self.open.clear()
            self.reserved = 0
        self._file = path.open("a")

    def _apply(self, event: dict[str, Any]) -> None:
        item, kind = event["id"], event["event"]
        self.digests.setdefault(item, event["digest"])
        if kind == "sent":
            self.orphaned += self._close(item)
            self.open[item] = event["reserve"]
            self.reserved += event["reserve"]
        elif kind == "done":
            self.done[item] = event
            self.spent += event["cost_micro"]
            self._close(item)
        elif kind == "refused":  # the tap refused it before it held anything (a 4xx): it cost nothing
            self._close(item)
        else:  # failed on the tap's side: it may have cost up to its reserve
            self.orphaned += self._close(item)

    def _close(self, item: str) -> int:
        """The item's request in flight ended (or never was): its reserve, no longer reserved."""
        reserve = self.open.pop(item, 0)
        self.reserved -= reserve
        return reserve

    def write(self, **event: Any) -> None:
        self._apply(event)
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def committed(self) -> int:
        """What counts against the cap: O(1), asked before every send."""
        return self.spent + self.orphaned + self.reserved

    def close(self) -> None:
        self._file.close()


class BatchRunner:
    def __init__(self, client: Any, model: str, items: list[Item], out: Path, *, credit_cap: int | None,
                 concurrency: int, progress: bool) -> None:  # fmt: skip
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.client, self.model, self.items, self.out = client, model, items, out
        self.cap, self.concurrency, self.progress = credit_cap, concurrency, progress
        self.journal = Journal(out.with_name(out.name + ".journal"))
        changed = [i.id for i in items if self.journal.digests.get(i.id, i.digest) != i.digest]
        if changed:
            raise ValueError(f"items {changed[:5]} differ from what {self.journal.path} ran: use another output path")
        self.price: Price | None = None
        self.active = 0  # requests in flight
        self.spent = self.ran = self.failed = 0
        self.stopped: str | None = None
        self._room = asyncio.Condition()

    async def _prices(self) -> Price | None:
        card = await self.client.models.retrieve(self.model)
        pricing = getattr(card, "pricing", None) or (card.model_extra or {}).get("pricing")
        if pricing is None:
            if self.cap is not None:
                raise ValueError(f"{self.model}'s model card has no pricing: a credit cap needs a llama-orch tap")
            return None
        return Price(int(pricing["input_per_m"]), int(pricing["output_per_m"]))

    async def _reserve(self, item: Item, amount: int) -> bool:
        """Waits until ``amount`` fits under the cap, then journals the item as sent with it; False when it
        never will fit (nothing left in flight to give some back)."""
        async with self._room:
            while self.cap is not None and self.journal.committed() + amount > self.cap:
                if self.active == 0:
                    return False
                await self._room.wait()
            self.journal.write(id=item.id, digest=item.digest, event="sent", reserve=amount)
            self.active += 1
            return True

    async def _one(self, item: Item, bar: tqdm) -> None:
        try:
            for attempt in range(RETRIES_429 + 1):
                try:
                    reply = await self.client.chat.completions.create(model=self.model, **item.body)
                    break
                except openai.RateLimitError as exc:
                    if attempt == RETRIES_429:
                        raise
                    await asyncio.sleep(min(60.0, float(getattr(exc, "retry_after", None) or 2**attempt)))
            usage = reply.usage
            charged = cost(self.price, usage.prompt_tokens, usage.completion_tokens) if self.price else 0
            self.journal.write(
                id=item.id, digest=item.digest, event="done", answer=reply.choices[0].message.content or "",
                finish_reason=reply.choices[0].finish_reason, prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens, cost_micro=charged, request_id=reply.id,
            )  # fmt: skip
            self.spent += charged
            self.ran += 1
            bar.update(1)
        except openai.APIStatusError as exc:
            if exc.status_code == 402:
                self.stopped = "insufficient credits"
            self.failed += 1
            event = "refused" if 400 <= exc.status_code < 500 else "failed"  # a 4xx held nothing
            self.journal.write(id=item.id, digest=item.digest, event=event, error=f"{exc.status_code}: {exc.message}")
        except openai.APIError as exc:
            self.failed += 1
            self.journal.write(id=item.id, digest=item.digest, event="failed", error=str(exc))
        finally:
            async with self._room:
                self.active -= 1
                self._room.notify_all()

    async def run(self) -> BatchReport:
        self.price = await self._prices()
        todo = [i for i in self.items if i.id not in self.journal.done]
        resumed = len(self.items) - len(todo)
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        with tqdm(total=len(self.items), initial=resumed, disable=not self.progress, unit="item") as bar:
            for item in todo:
                await slots.acquire()
                reserve = worst_case(self.price, item.body) if self.price else 0
                if self.stopped or not await self._reserve(item, reserve):
                    slots.release()
                    self.stopped = self.stopped or "credit cap"
                    break
                task = asyncio.ensure_future(self._one(item, bar))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: slots.release())
            await asyncio.gather(*tasks)
        self.journal.close()
        self._write_results()
        done = sum(1 for i in self.items if i.id in self.journal.done)
        return BatchReport(done, self.ran, resumed, len(self.items) - done, self.spent, self.journal.committed(),
                           self.stopped, self.failed, self.out)  # fmt: skip

    def _write_results(self) -> None:
        rows = [self.journal.done[i.id] for i in self.items if i.id in self.journal.done]
        table = pa.Table.from_pylist([{f: r.get(f) for f in RESULTS.names} for r in rows], schema=RESULTS)
        partial = self.out.with_name(self.out.name + ".partial")
        pq.write_table(table, partial)
        partial.replace(self.out)


async def arun_batch(
    client: Any,
    model: str,
    prompts: Iterable[str | dict[str, Any]],
    out: str | Path,
    *,
    credit_cap: int | None = None,
    concurrency: int = 4,
    max_tokens: int = 256,
    progress: bool = True,
    **request: Any,
) -> BatchReport:
    """Runs the batch (see the module's text) with an async client (:class:`orch.AsyncClient` or
    ``openai.AsyncOpenAI``); ``credit_cap`` in micro-credits; ``request``: more chat request fields
    (``temperature``, ...). From a running loop (a notebook's); elsewhere :func:`run_batch`."""
    items = items_of(prompts, max_tokens, request)
    runner = BatchRunner(client, model, items, Path(out), credit_cap=credit_cap, concurrency=concurrency,
                         progress=progress)  # fmt: skip
    return await runner.run()


def run_batch(client: Any, model: str, prompts: Iterable[str | dict[str, Any]], out: str | Path,
              **options: Any) -> BatchReport:  # fmt: skip
    """:func:`arun_batch` on a loop of its own; ``options`` are its keyword arguments."""
    return asyncio.run(arun_batch(client, model, prompts, out, **options))

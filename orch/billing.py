"""Billing on the request path, pure: who is calling (bearer key → principal, cached), and what a
request may cost at most (the hold) before its prompt is tokenised.

The gateway holds the worst case before a request reaches an engine (DESIGN invariant 3) without
tokenising the prompt itself: :func:`prompt_token_bound` bounds the prompt's tokens by its UTF-8
bytes (a byte-level BPE or byte-fallback token covers at least one byte) plus the chat template's
per-message tokens, measured on the model's own tokenizer (:class:`PromptLimits`). The settle then
charges the engine's exact counts.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from orch.errors import Forbidden, InvalidRequest, Unauthorized
from orch.keys import ADMIN_KEY_ID, InvalidKey, is_admin_key, parse_key, verify
from orch.ledger import Price, cost
from orch.ratelimit import Policy

KEY_CACHE_TTL_S = 5.0  # a revoked key stops working within this many seconds


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """What bounds a prompt's tokens on one model, measured on its tokenizer at engine start."""

    max_model_len: int
    per_message_tokens: int  # template tokens around one chat message (default system prompt included)
    per_prompt_tokens: int  # tokens a plain completion prompt gets besides its text (BOS and the like)
    max_token_bytes: int = 0  # UTF-8 bytes of the vocabulary's longest token; 0: not measured
    tools_tokens: int = 0  # what the template adds for a list of tools (instructions), one small tool included
    per_tool_tokens: int = 0  # what it adds around each further tool


def prompt_token_bound(limits: PromptLimits, *, messages: Sequence[str] | None = None,
                       prompt: str | list[int] | None = None) -> int:  # fmt: skip
    """An upper bound of the prompt's tokens, at most ``max_model_len``, from its UTF-8 bytes alone.

    Refuses (400) what cannot be tokenised or cannot fit, before any tokeniser runs: a lone surrogate,
    and a text so long that even the vocabulary's longest tokens would need more than ``max_model_len``.

    >>> prompt_token_bound(PromptLimits(2048, 30, 2), messages=["Hi", "héllo"])
    68
    >>> prompt_token_bound(PromptLimits(2048, 30, 2), prompt=[1, 2, 3])
    3
    >>> prompt_token_bound(PromptLimits(4, 30, 2, max_token_bytes=2), prompt="0123456789")
    Traceback (most recent call last):
    ...
    orch.errors.InvalidRequest: This model's maximum context length is 4 tokens; your prompt has at least 5.
    """
    param = "messages" if messages is not None else "prompt"
    try:
        if messages is not None:
            size = sum(len(m.encode("utf-8")) for m in messages)
            bound = size + limits.per_message_tokens * len(messages)
        elif isinstance(prompt, list):
            size = bound = len(prompt)
        else:
            size = len((prompt or "").encode("utf-8"))
            bound = size + limits.per_prompt_tokens
    except UnicodeEncodeError:
        raise InvalidRequest(
            "The prompt is not valid Unicode (it contains a lone surrogate escape such as \\ud800).",
            param=param,
            code="invalid_unicode",
        ) from None
    per_token = 1 if isinstance(prompt, list) else limits.max_token_bytes
    least = -(-size // per_token) if per_token > 0 else 0  # tokens even the longest tokens would need
    if least > limits.max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {limits.max_model_len} tokens; your prompt has at least {least}.",
            param=param,
            code="context_length_exceeded",
        )
    return min(bound, limits.max_model_len)


def hold_amount(price: Price, limits: PromptLimits, prompt_bound: int, max_tokens: int | None, n: int = 1) -> int:
    """The most a request can cost: over every prompt length ``p ≤ prompt_bound``, ``p`` input tokens
    plus ``n × min(max_tokens, max_model_len − p)`` output tokens (``n`` choices). Cost is piecewise
    linear in ``p`` with one break at ``max_model_len − max_tokens``, so the maximum is at an end or at
    the break.

    >>> hold_amount(Price(1_000_000, 2_000_000), PromptLimits(100, 10, 2), 30, None)  # p=0: 100 out
    200
    >>> hold_amount(Price(1_000_000, 2_000_000), PromptLimits(100, 10, 2), 30, 16)  # p=30, 16 out
    62
    >>> hold_amount(Price(1_000_000, 2_000_000), PromptLimits(100, 10, 2), 30, 16, n=3)  # p=30, 3 × 16 out
    126
    """
    length = limits.max_model_len
    out_cap = length if max_tokens is None else min(max_tokens, length)
    top = min(prompt_bound, length)
    candidates = {0, top, max(0, min(top, length - out_cap))}
    return max(cost(price, p, n * min(out_cap, length - p)) for p in candidates)


# ---- who is calling ----


class KeyRecord(Protocol):
    """What the store keeps of an API key (``orch.store.ApiKeyRecord``)."""

    @property
    def key_id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def tap(self) -> str: ...
    @property
    def secret_hash(self) -> str: ...
    @property
    def revoked_at(self) -> object: ...
    @property
    def policy(self) -> Policy: ...


class Principal(NamedTuple):
    tenant_id: str
    key_id: str
    tap: str
    policy: Policy = Policy()  # priority, weight and rate limits of the key and its tenant

    @property
    def is_admin(self) -> bool:
        return self.key_id == ADMIN_KEY_ID  # never a tenant key's id (those are 16 characters)


ADMIN = Principal("", ADMIN_KEY_ID, "*")


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; 401 when there is none."""
    if not authorization:
        raise Unauthorized(
            "You didn't provide an API key. Provide it in the Authorization header as 'Bearer sk-orch-...'.",
            code="missing_api_key",
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("The Authorization header must be 'Bearer <API key>'.", code="invalid_api_key")
    return token.strip()


def _invalid_key() -> Unauthorized:
    # The message never echoes the key.
    return Unauthorized("Incorrect API key provided.", code="invalid_api_key")


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; :meth:`take` spends one if there is one.

    >>> bucket = TokenBucket(2, 0.0, now=0.0)
    >>> [bucket.take(0.0) for _ in range(3)]
    [True, True, False]
    """

    __slots__ = ("_burst", "_rate", "_tokens", "_at")

    def __init__(self, burst: float, rate_per_s: float, *, now: float) -> None:
        self._burst, self._rate = burst, rate_per_s
        self._tokens, self._at = burst, now

    def take(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@dataclass(frozen=True, slots=True)
class MissBudget:
    """How many unknown key ids a client may have looked up in the ledger: ``burst`` at once, then
    ``per_s``; past it an unknown key id is refused (401) without a lookup. ``total_*`` caps all clients."""

    burst: int = 20
    per_s: float = 2.0
    total_burst: int = 500
    total_per_s: float = 100.0
    clients: int = 10_000  # buckets kept (least recently seen dropped first)


class KeyCache:
    """Bearer key → :class:`Principal`, with lookups cached for ``ttl_s``. Revocation is seen within
    ``ttl_s``; concurrent lookups of one key id share a single fetch; a key used past half its ttl is
    fetched again in the background, so a busy key never waits for the ledger.

    Known keys (hits) and unknown key ids (misses) are kept apart, each a bounded LRU, so a flood of
    random key ids can never evict a good key. A lookup of a key id not known to exist spends the
    client's :class:`MissBudget`; once spent, such keys get 401 with no ledger call."""

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[KeyRecord | None]],
        admin_key: str,
        *,
        ttl_s: float = KEY_CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
        max_misses: int = 10_000,
        miss_budget: MissBudget = MissBudget(),
        pepper: bytes | None = None,
    ) -> None:
        self._fetch = fetch
        self._pepper = pepper  # orch.keys.load_or_create_pepper: stored hashes are HMACs with it
        self._admin_key = admin_key
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_entries = max_entries
        self._max_misses = max_misses
        self._budget = miss_budget
        self._hits: OrderedDict[str, tuple[float, KeyRecord]] = OrderedDict()
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._total = TokenBucket(miss_budget.total_burst, miss_budget.total_per_s, now=clock())
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self.lookups = 0  # ledger fetches made
        self.refused = 0  # unknown key ids refused without a fetch (budget spent)

    @property
    def pepper(self) -> bytes | None:
        """The pepper stored hashes are checked with (shard 0's): new keys are hashed with it too."""
        return self._pepper

    async def authenticate(self, token: str, tap: str, client: str | None = None) -> Principal:
        """The principal of ``token`` on ``tap``: 401 for an unknown, malformed or revoked key,
        403 for a valid key of another tap. The admin key (any secret) authenticates as :data:`ADMIN`;
        ``client`` (the caller's address) is charged for lookups of unknown key ids."""
        if is_admin_key(token, self._admin_key):  # first: an admin secret may have any shape
            return ADMIN
        try:
            key_id, _ = parse_key(token)
        except InvalidKey:
            raise _invalid_key() from None
        if key_id == ADMIN_KEY_ID:
            raise _invalid_key()
        record = await self._lookup(key_id, client or "")
        if record is None or record.revoked_at is not None or not verify(token, record.secret_hash, self._pepper):
            raise _invalid_key()
        if record.tap != tap:
            raise Forbidden(f"This API key is not valid for the '{tap}' tap.", code="wrong_tap")
        return Principal(record.tenant_id, record.key_id, record.tap, record.policy)

    async def _lookup(self, key_id: str, client: str) -> KeyRecord | None:
        now = self._clock()
        hit = self._hits.get(key_id)
        if hit is not None:
            age = now - hit[0]
            if age < self._ttl_s:
                self._hits.move_to_end(key_id)
                if age >= self._ttl_s / 2 and key_id not in self._inflight:
                    self._refresh_ahead(key_id)
                return hit[1]
        else:
            missed_at = self._misses.get(key_id)
            if missed_at is not None and now - missed_at < self._ttl_s:
                return None
            # A key id not known to exist costs a ledger lookup: only within the client's budget.
            if key_id not in self._inflight and not self._spend(client, now):
                self.refused += 1
                return None
        # One fetch per key id, in a task of its own: a caller that goes away cancels only its wait.
        task = self._inflight.get(key_id)
        if task is None:
            task = self._inflight[key_id] = asyncio.ensure_future(self._fetch_and_keep(key_id))
        return await asyncio.shield(task)

    def _refresh_ahead(self, key_id: str) -> None:
        """Past half its ttl, a key in use is fetched again in the background: a key in steady use never
        waits for a ledger call on its request path (a p99 spike every ttl), and its revocation is seen
        sooner, not later. A failed refresh leaves the entry to expire as usual."""
        task = self._inflight[key_id] = asyncio.ensure_future(self._fetch_and_keep(key_id))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _spend(self, client: str, now: float) -> bool:
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self._budget.burst, self._budget.per_s, now=now)
            if len(self._buckets) > self._budget.clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return bucket.take(now) and self._total.take(now)

    async def _fetch_and_keep(self, key_id: str) -> KeyRecord | None:
        fetched_at = self._clock()  # before the fetch: the entry can only expire early, never late
        self.lookups += 1
        try:
            record = await self._fetch(key_id)
        finally:
            self._inflight.pop(key_id, None)
        if record is None:
            self._hits.pop(key_id, None)
            _put(self._misses, key_id, fetched_at, self._max_misses)
        else:
            self._misses.pop(key_id, None)
            _put(self._hits, key_id, (fetched_at, record), self._max_entries)
        return record

    def forget_tap(self, tap: str) -> int:
        """Drops every cached key of ``tap`` (its keys were revoked); returns how many."""
        gone = [key_id for key_id, (_, record) in self._hits.items() if record.tap == tap]
        for key_id in gone:
            del self._hits[key_id]
        return len(gone)

    def forget_tenant(self, tenant_id: str) -> None:
        """Drops every cached key of the tenant (its policy changed)."""
        for key_id in [k for k, (_, record) in self._hits.items() if record.tenant_id == tenant_id]:
            del self._hits[key_id]

    def forget(self, key_id: str) -> None:
        """Drops a cached lookup (this replica revoked the key: no need to wait for the ttl)."""
        self._hits.pop(key_id, None)


def _put(lru: OrderedDict[str, Any], key: str, value: Any, limit: int) -> None:
    lru[key] = value
    lru.move_to_end(key)
    while len(lru) > limit:
        lru.popitem(last=False)

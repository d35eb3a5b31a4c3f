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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from orch.errors import Forbidden, InvalidRequest, Unauthorized
from orch.keys import ADMIN_KEY_ID, InvalidKey, is_admin_key, parse_key, verify
from orch.ledger import Price, cost

KEY_CACHE_TTL_S = 5.0  # a revoked key stops working within this many seconds


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """What bounds a prompt's tokens on one model, measured on its tokenizer at engine start."""

    max_model_len: int
    per_message_tokens: int  # template tokens around one chat message (default system prompt included)
    per_prompt_tokens: int  # tokens a plain completion prompt gets besides its text (BOS and the like)


def prompt_token_bound(limits: PromptLimits, *, messages: Sequence[str] | None = None,
                       prompt: str | list[int] | None = None) -> int:  # fmt: skip
    """An upper bound of the prompt's tokens, at most ``max_model_len`` (longer prompts are refused).

    >>> prompt_token_bound(PromptLimits(2048, 30, 2), messages=["Hi", "héllo"])
    68
    >>> prompt_token_bound(PromptLimits(2048, 30, 2), prompt=[1, 2, 3])
    3
    """
    try:
        if messages is not None:
            bound = sum(len(m.encode("utf-8")) for m in messages) + limits.per_message_tokens * len(messages)
        elif isinstance(prompt, list):
            bound = len(prompt)
        else:
            bound = len((prompt or "").encode("utf-8")) + limits.per_prompt_tokens
    except UnicodeEncodeError:
        raise InvalidRequest(
            "The prompt is not valid Unicode (it contains a lone surrogate escape such as \\ud800).",
            param="messages" if messages is not None else "prompt",
            code="invalid_unicode",
        ) from None
    return min(bound, limits.max_model_len)


def hold_amount(price: Price, limits: PromptLimits, prompt_bound: int, max_tokens: int | None) -> int:
    """The most a request can cost: over every prompt length ``p ≤ prompt_bound``, ``p`` input tokens
    plus ``min(max_tokens, max_model_len − p)`` output tokens. Cost is piecewise linear in ``p`` with
    one break at ``max_model_len − max_tokens``, so the maximum is at an end or at the break.

    >>> hold_amount(Price(1_000_000, 2_000_000), PromptLimits(100, 10, 2), 30, None)  # p=0: 100 out
    200
    >>> hold_amount(Price(1_000_000, 2_000_000), PromptLimits(100, 10, 2), 30, 16)  # p=30, 16 out
    62
    """
    length = limits.max_model_len
    out_cap = length if max_tokens is None else min(max_tokens, length)
    top = min(prompt_bound, length)
    candidates = {0, top, max(0, min(top, length - out_cap))}
    return max(cost(price, p, min(out_cap, length - p)) for p in candidates)


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


class Principal(NamedTuple):
    tenant_id: str
    key_id: str
    tap: str

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


class KeyCache:
    """Bearer key → :class:`Principal`, with lookups cached for ``ttl_s`` (misses too, so a flood of bad
    keys costs one store lookup per key id per ttl). Revocation is seen within ``ttl_s``; concurrent
    lookups of one key id share a single fetch."""

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[KeyRecord | None]],
        admin_key: str,
        *,
        ttl_s: float = KEY_CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self._fetch = fetch
        self._admin_key = admin_key
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, KeyRecord | None]] = {}
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}

    async def authenticate(self, token: str, tap: str) -> Principal:
        """The principal of ``token`` on ``tap``: 401 for an unknown, malformed or revoked key,
        403 for a valid key of another tap. The admin key authenticates as :data:`ADMIN`."""
        try:
            key_id, _ = parse_key(token)
        except InvalidKey:
            raise _invalid_key() from None
        if key_id == ADMIN_KEY_ID:
            if is_admin_key(token, self._admin_key):
                return ADMIN
            raise _invalid_key()
        record = await self._lookup(key_id)
        if record is None or record.revoked_at is not None or not verify(token, record.secret_hash):
            raise _invalid_key()
        if record.tap != tap:
            raise Forbidden(f"This API key is not valid for the '{tap}' tap.", code="wrong_tap")
        return Principal(record.tenant_id, record.key_id, record.tap)

    async def _lookup(self, key_id: str) -> KeyRecord | None:
        hit = self._entries.get(key_id)
        if hit is not None and self._clock() - hit[0] < self._ttl_s:
            return hit[1]
        # One fetch per key id, in a task of its own: a caller that goes away cancels only its wait.
        task = self._inflight.get(key_id)
        if task is None:
            task = self._inflight[key_id] = asyncio.ensure_future(self._fetch_and_keep(key_id))
        return await asyncio.shield(task)

    async def _fetch_and_keep(self, key_id: str) -> KeyRecord | None:
        fetched_at = self._clock()  # before the fetch: the entry can only expire early, never late
        try:
            record = await self._fetch(key_id)
        finally:
            self._inflight.pop(key_id, None)
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[key_id] = (fetched_at, record)
        return record

    def forget(self, key_id: str) -> None:
        """Drops a cached lookup (this replica revoked the key: no need to wait for the ttl)."""
        self._entries.pop(key_id, None)

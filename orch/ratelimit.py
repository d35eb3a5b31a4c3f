"""Requests and tokens per minute, per key and per tenant, counted in one place per tenant.

A tap's gateway replicas (or colocated model replicas) each see only part of a tenant's traffic, so a
count kept per replica lets N replicas admit N times the limit (LiteLLM #40291). Here the windows live
in the tenant's ledger shard (``actors/ledger.py``), one process for all of a tenant's keys: a request of
a limited key or tenant costs one actor call and the count is exact. Keys and tenants without limits
never call.

Each subject (``key:<id>``, ``tenant:<id>``) keeps a sliding 60-second log: a request is admitted only
when every subject it counts against has room for one more request and for its tokens; then all of them
count it. Tokens are taken at admission as the request's bound (prompt bound plus the completion it may
write, the same bound the credit hold uses) and corrected to the engine's count when it ends, as
OpenAI's token limits do.

>>> clock = [0.0]
>>> windows = RateWindows(clock=lambda: clock[0])
>>> limits = (Limit("key:k", rpm=2),)
>>> [windows.take(limits, 10, f"r{i}").ok for i in range(3)]
[True, True, False]
>>> windows.take(limits, 10, "r3").retry_after_s
60
>>> clock[0] = 60.0
>>> windows.take(limits, 10, "r4").ok
True
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Limit:
    """One subject's limits; None: not limited on that count."""

    subject: str  # "key:<key_id>" or "tenant:<tenant_id>"
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """What one key may do, with its tenant's settings (admin API) folded in: the priority class of its
    requests, the tenant's fair-share weight, and the key's and the tenant's rate limits.

    >>> Policy(key_rpm=10).limits("k1", "t-1")
    (Limit(subject='key:k1', rpm=10, tpm=None),)
    >>> Policy(priority="batch", weight=2.0).limited
    False
    """

    priority: str | None = None  # "interactive" | "batch": the key's, else the tenant's; None: interactive
    weight: float | None = None  # the tenant's fair-share weight; None: the tap config's, else 1
    key_rpm: int | None = None
    key_tpm: int | None = None
    tenant_rpm: int | None = None
    tenant_tpm: int | None = None

    @property
    def limited(self) -> bool:
        return any(x is not None for x in (self.key_rpm, self.key_tpm, self.tenant_rpm, self.tenant_tpm))

    def limits(self, key_id: str, tenant_id: str) -> tuple[Limit, ...]:
        out = []
        if self.key_rpm is not None or self.key_tpm is not None:
            out.append(Limit(f"key:{key_id}", self.key_rpm, self.key_tpm))
        if self.tenant_rpm is not None or self.tenant_tpm is not None:
            out.append(Limit(f"tenant:{tenant_id}", self.tenant_rpm, self.tenant_tpm))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a request may run, and what OpenAI's ``x-ratelimit-*`` headers say: the tightest subject's
    limit, what is left of it after this request, and when the window has room again."""

    ok: bool
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float = 0.0
    retry_after_s: int = 0  # whole seconds (Retry-After), when not ok
    why: str = ""  # when not ok: which limit, in OpenAI's words

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` as OpenAI sends them (``reset`` as a duration such as ``6s`` or ``1m0s``)."""
        out = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = duration(self.reset_requests_s)
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = duration(self.reset_tokens_s)
        return out


def duration(seconds: float) -> str:
    """OpenAI's reset durations.

    >>> duration(0.25), duration(6), duration(61.5)
    ('250ms', '6s', '1m1.5s')
    """
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


@dataclass(slots=True, eq=False)  # one request's place: compared by identity
class _Entry:
    at: float
    tokens: int


@dataclass(slots=True)
class _Window:
    entries: deque[_Entry] = field(default_factory=deque)
    tokens: int = 0  # sum over entries

    def prune(self, now: float) -> None:
        while self.entries and self.entries[0].at <= now - WINDOW_S:
            self.tokens -= self.entries.popleft().tokens

    def reset_requests(self, now: float, limit: int) -> float:
        """Seconds until the window holds fewer than ``limit`` requests."""
        over = len(self.entries) - limit
        return 0.0 if over < 0 else self.entries[over].at + WINDOW_S - now

    def reset_tokens(self, now: float, limit: int, wanted: int) -> float:
        """Seconds until ``wanted`` more tokens fit under ``limit``."""
        excess = self.tokens + wanted - limit
        if excess <= 0:
            return 0.0
        for entry in self.entries:
            excess -= entry.tokens
            if excess <= 0:
                return max(0.0, entry.at + WINDOW_S - now)
        return WINDOW_S


class RateWindows:
    """The sliding windows of every limited subject of one ledger shard."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_requests: int = 100_000) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._taken: OrderedDict[str, tuple[float, list[_Entry], list[_Window]]] = OrderedDict()  # request id ->
        self._max_requests = max_requests

    def take(self, limits: Iterable[Limit], tokens: int, request_id: str) -> Decision:
        """Counts the request against every subject when all have room; else a refusal that says when."""
        now = self._clock()
        limits = [lim for lim in limits if lim.rpm is not None or lim.tpm is not None]
        checked = []
        for lim in limits:
            window = self._windows.setdefault(lim.subject, _Window())
            window.prune(now)
            checked.append((lim, window))
        refusal = self._refusal(checked, tokens, now)
        if refusal is not None:
            return refusal
        entries = []
        for _, window in checked:
            entry = _Entry(now, tokens)
            window.entries.append(entry)
            window.tokens += tokens
            entries.append(entry)
        self._taken[request_id] = (now, entries, [w for _, w in checked])
        self._forget_old(now)
        return self._granted(checked, now)

    def adjust(self, request_id: str, tokens: int) -> None:
        """The request's tokens as counted when it ended (fewer than its bound, as a rule)."""
        taken = self._taken.pop(request_id, None)
        if taken is None:
            return
        for entry, window in zip(taken[1], taken[2], strict=True):
            if window.entries and entry.at >= window.entries[0].at:  # not pruned yet: pruning goes by time
                window.tokens += tokens - entry.tokens
            entry.tokens = tokens

    def _refusal(self, checked: list[tuple[Limit, _Window]], tokens: int, now: float) -> Decision | None:
        for lim, window in checked:
            if lim.rpm is not None and len(window.entries) + 1 > lim.rpm:
                wait = window.reset_requests(now, lim.rpm)
                used = len(window.entries)
                why = f"Rate limit reached for requests on {lim.subject}: limit {lim.rpm}/min, used {used}"
                return self._refused(checked, now, wait, why)
            if lim.tpm is not None and window.tokens + tokens > lim.tpm:
                if tokens > lim.tpm:
                    why = f"Request too large for {lim.subject}: {tokens} tokens asked, limit {lim.tpm}/min"
                    return self._refused(checked, now, WINDOW_S, why + "; lower max_tokens or the prompt")
                wait = window.reset_tokens(now, lim.tpm, tokens)
                why = (f"Rate limit reached for tokens on {lim.subject}: limit {lim.tpm}/min, used {window.tokens}, "
                       f"requested {tokens}")  # fmt: skip
                return self._refused(checked, now, wait, why)
        return None

    def _refused(self, checked: list[tuple[Limit, _Window]], now: float, wait: float, why: str) -> Decision:
        retry = max(1, math.ceil(wait))
        refused = self._granted(checked, now)
        return dataclasses.replace(refused, ok=False, retry_after_s=retry, why=f"{why}. Please try again in {retry}s.")

    @staticmethod
    def _granted(checked: list[tuple[Limit, _Window]], now: float) -> Decision:
        """The tightest subject's numbers (least left), for the headers; ``reset``: when its oldest counted
        request leaves the window."""
        req: tuple[int, int, float] | None = None
        tok: tuple[int, int, float] | None = None
        for lim, window in checked:
            if lim.rpm is not None:
                left = max(0, lim.rpm - len(window.entries))
                if req is None or left < req[1]:
                    req = (lim.rpm, left, window.entries[0].at + WINDOW_S - now if window.entries else 0.0)
            if lim.tpm is not None:
                left = max(0, lim.tpm - window.tokens)
                if tok is None or left < tok[1]:
                    tok = (lim.tpm, left, window.entries[0].at + WINDOW_S - now if window.entries else 0.0)
        return Decision(
            True,
            req[0] if req else None, req[1] if req else None, req[2] if req else 0.0,
            tok[0] if tok else None, tok[1] if tok else None, tok[2] if tok else 0.0,
        )  # fmt: skip

    def _forget_old(self, now: float) -> None:
        """Requests that left every window can't be adjusted any more; the map stays bounded."""
        while self._taken:
            request_id, (at, _, _) = next(iter(self._taken.items()))
            if at > now - WINDOW_S and len(self._taken) <= self._max_requests:
                break
            del self._taken[request_id]
        if len(self._windows) > self._max_requests:
            for subject in [s for s, w in self._windows.items() if not w.entries]:
                del self._windows[subject]

"""The ledger's mutable internal state: grants, holds and tenants as the :class:`orch.ledger.Ledger` keeps
them, and the earliest-expiry-first allocation of free credit. Only ``orch/ledger.py`` uses these."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from orch.ledger_ops import grant_expiry

# Kept mutable on purpose, and touched only by the Ledger: the hot path (hold + settle) must stay
# allocation-light to reach tens of thousands of pairs per second; what leaves the Ledger is immutable.


class GrantState:
    __slots__ = ("grant_id", "micro_credits", "granted_at", "expires_at", "spent", "reserved")

    def __init__(self, grant_id: str, micro_credits: int, granted_at: datetime) -> None:
        self.grant_id, self.micro_credits, self.granted_at = grant_id, micro_credits, granted_at
        self.expires_at = grant_expiry(granted_at)
        self.spent = 0
        self.reserved = 0


OPEN, SETTLED, RELEASED, EXPIRED = 0, 1, 2, 3


NO_ALLOCATION: tuple[tuple[GrantState, int], ...] = ()


class HoldState:
    __slots__ = ("hold_id", "tenant", "micro_credits", "created_at", "expires_at", "allocation", "state", "debited")

    def __init__(
        self,
        hold_id: str,
        tenant: TenantState,
        micro_credits: int,
        created_at: datetime,
        expires_at: datetime,
        allocation: list[tuple[GrantState, int]],
    ) -> None:
        self.hold_id, self.tenant, self.micro_credits = hold_id, tenant, micro_credits
        self.created_at, self.expires_at = created_at, expires_at
        self.allocation: Sequence[tuple[GrantState, int]] = allocation
        self.state = OPEN
        self.debited = 0


class TenantState:
    __slots__ = ("tenant_id", "name", "grants", "burnable", "open_holds", "spent")

    def __init__(self, tenant_id: str, name: str) -> None:
        self.tenant_id, self.name = tenant_id, name
        self.grants: list[GrantState] = []  # all, in burn order (expiry, then grant order)
        self.burnable: list[GrantState] = []  # the same minus grants that can never be held from again
        self.open_holds: dict[str, HoldState] = {}
        self.spent = 0


def free_credit(grants: Iterable[GrantState], amount: int, now: datetime) -> tuple[list[tuple[GrantState, int]], int]:
    """Up to ``amount`` of the free credit of live grants, earliest expiry first: ``(grant, take)`` pairs,
    and the part of ``amount`` they could not cover."""
    need = amount
    allocation: list[tuple[GrantState, int]] = []
    for g in grants:
        if need == 0:
            break
        if g.expires_at <= now:
            continue
        free = g.micro_credits - g.spent - g.reserved
        if free > 0:
            take = free if free < need else need
            allocation.append((g, take))
            need -= take
    return allocation, need

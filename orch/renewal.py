"""A credit lease's renewal (``orch.lease``), as the ledger applies it: one Settle of the lease hold with its
batch's usage rows and one Hold of the next lease hold, at one instant (no other op in between)."""

from __future__ import annotations

import logging
from typing import NamedTuple

from orch.ledger import Code, Hold, Ledger, Op, Result, Settle
from orch.usage_log import Usage, cost, fit

log = logging.getLogger(__name__)


class Renewal(NamedTuple):
    """Closes a lease hold with the cost of a batch (``settle`` with its ``usage`` rows, Σ cost equal to
    the settle) and opens the next one (``hold_id``) of the first of ``amounts`` the balance can take;
    when none fits, of all that is free (up to the largest; a lease whose old hold had expired may then
    cover less than what runs on it). ``hold_id`` None returns the lease."""

    tenant_id: str
    settle: Settle | None
    usage: Usage  # orch.usage_log.to_arrow's batch, as gateways send it (or the rows themselves)
    hold_id: str | None
    amounts: tuple[int, ...]  # largest first
    timeout_s: int


class Renewed(NamedTuple):
    settled: Result | None
    hold: Result | None  # OK (or EXISTS on a retry) with the hold's micro_credits and expires_at; else refused


Committed = list[tuple[Op, Result, Usage]]


def apply_renewal(ledger: Ledger, renewal: Renewal) -> tuple[Renewed, Committed]:
    """Applies ``renewal`` to ``ledger`` with no await in between (no other op runs between its Settle
    and its Hold, so the credit the Settle frees is there for the Hold). Returns the answer and what to
    commit: each OK op with the usage rows that belong in its transaction. A retried renewal (same op ids)
    gets the first results and commits nothing again."""
    if renewal.settle is not None and cost(renewal.usage) != renewal.settle.micro_credits:
        raise ValueError(f"usage rows of {renewal.settle.op_id} do not add up to its settle")
    done: Committed = []
    settled = None
    if renewal.settle is not None:
        settled = ledger.apply(renewal.settle)
        if settled.code is Code.OK:
            done.append((renewal.settle, settled, fit(renewal.usage, settled.micro_credits)))
        elif not settled.ok:
            log.error("lease settle %s refused (%s): its usage is lost", renewal.settle.op_id, settled.code.value)
    hold = None
    if renewal.hold_id is not None:
        hold = ledger.result_of(renewal.hold_id)
        amounts = [a for a in renewal.amounts if a > 0]
        if hold is None and amounts:
            for amount in amounts:
                op = Hold(renewal.hold_id, renewal.tenant_id, amount, renewal.timeout_s)
                hold = ledger.apply(op)
                if hold.code is Code.INSUFFICIENT_CREDITS and amount == amounts[-1]:
                    # None fits: as much of the largest as the balance has (bounded by the balance, a lease
                    # strands less than one request's worth), which covers what runs as far as it goes.
                    short = min(amounts[0], hold.available)
                    if short > 0:
                        op = op._replace(micro_credits=short)
                        hold = ledger.apply(op)
                if hold.code is not Code.INSUFFICIENT_CREDITS:
                    break
            if hold is not None and hold.code is Code.OK:
                done.append((op, hold, ()))
    return Renewed(settled, hold), done

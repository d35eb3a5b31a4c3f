"""``check_invariants(store)``: DESIGN.md's money invariants, asserted over a ledger shard's DuckDB file (after a
fault, a random run or a restart: the reliability suite runs it after each; the ledger service runs it on its
own file as ``check_invariants``). It reads the file only, so it checks what survived, not what a process
remembers. It replays the whole op log: O(history), for tests and operators, never the request path.

1. Replayed into a fresh :class:`orch.ledger.Ledger`, the op log gives every result it recorded, and the
   rebuilt ledger's own invariants hold (per tenant: balance = Σ live grants − Σ debits − Σ open holds ≥ 0).
2. Σ usage-row cost == Σ settled debits, in total and per tenant.
3. Every hold ends at most once (a late settle after its expiry excepted), and no op id is written twice.
4. No request has two usage rows (a double charge).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from orch.ledger import Ledger
from orch.store import Store


@dataclass(frozen=True)
class Figures:
    ops: int
    tenants: int
    granted: int
    debited: int
    held: int
    usage_rows: int
    double_charges: int  # request ids with more than one usage row
    violations: int  # always 0: any violation raises


def check_invariants(store: Store, now: datetime | None = None) -> Figures:
    """Asserts the invariants above over ``store``'s file (at ``now``: the clock the ledger runs on) and
    returns its figures. Raises AssertionError naming the first broken one."""
    ledger = Ledger() if now is None else Ledger(clock=lambda: now)
    ops = ledger.replay(store.load_ops())  # raises if a recorded result is not what the rules give now
    ledger.check_invariants()
    sql = store.cursor()
    try:
        one = lambda q: sql.execute(q).fetchall()  # noqa: E731
        audit = store.audit()
        assert audit.debited == audit.usage_cost, f"Σ debits {audit.debited} != Σ usage cost {audit.usage_cost}"
        by_tenant = one(
            "SELECT coalesce(d.tenant_id, u.tenant_id), coalesce(d.debited, 0), coalesce(u.cost, 0) FROM"
            " (SELECT tenant_id, sum(micro_credits) AS debited FROM debits GROUP BY ALL) d FULL JOIN"
            " (SELECT tenant_id, sum(cost_micro) AS cost FROM usage GROUP BY ALL) u ON d.tenant_id = u.tenant_id"
            " WHERE coalesce(d.debited, 0) != coalesce(u.cost, 0)"
        )
        assert not by_tenant, f"tenants whose usage cost is not their debits: {by_tenant[:5]}"
        twice = one(
            "SELECT hold_id, list_sort(list(state)) AS ends FROM hold_ends GROUP BY ALL"
            " HAVING count(*) > 1 AND ends != ['expired', 'settled_late']"
        )
        assert not twice, f"holds that ended more than once: {twice[:5]}"
        duplicate_ops = one("SELECT op_id, count(*) FROM ops GROUP BY ALL HAVING count(*) > 1 LIMIT 5")
        assert not duplicate_ops, f"op ids written twice: {duplicate_ops}"
        doubled = one("SELECT count(*) FROM (SELECT request_id FROM usage GROUP BY ALL HAVING count(*) > 1)")[0][0]
        assert doubled == 0, f"{doubled} requests with two usage rows"
    finally:
        sql.close()
    tenants = ledger.tenant_ids()
    accounts = [ledger.account(t) for t in tenants]
    return Figures(
        ops=ops,
        tenants=len(tenants),
        granted=audit.granted,
        debited=audit.debited,
        held=sum(a.held for a in accounts),
        usage_rows=audit.usage_rows,
        double_charges=doubled,
        violations=0,
    )

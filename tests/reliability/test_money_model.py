"""The randomised money model: seeded random walks against the real ledger service and its DuckDB file, each
answer and every account compared with :class:`Model`, a small reference written apart from ``orch.ledger``.
A walk mixes grants, holds, settles (with usage rows), releases, usage rows without money, retries with the
same op id (same and other content) and with a new one, hold expiries, clock jumps (past grant expiries too)
and restarts (from a snapshot and the ops after it, or from the whole log). After each restart and at the
end, :func:`check_invariants` over the file.

A failure names its seed and step; replay one walk with ``LLAMA_ORCH_SEED=<seed> pytest tests/reliability -k
money``. ``LLAMA_ORCH_MONEY_WALKS`` / ``LLAMA_ORCH_MONEY_STEPS`` make the run longer (CI keeps it ~15 s).
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from actors.ledger import LedgerService
from orch.invariants import check_invariants
from orch.ledger import (
    MAX_HOLD_TIMEOUT_S,
    Code,
    CreateTenant,
    ExpireHolds,
    GrantCredits,
    Hold,
    Op,
    Record,
    Release,
    Result,
    Settle,
    grant_expiry,
)
from orch.usage_log import UsageRow

T0 = datetime(2026, 1, 31, 12, tzinfo=UTC)
WINDOW = timedelta(days=1)  # the ledger's idempotency window: retries stay inside it
WALKS = int(os.environ.get("LLAMA_ORCH_MONEY_WALKS", "6"))
STEPS = int(os.environ.get("LLAMA_ORCH_MONEY_STEPS", "400"))
pytestmark = pytest.mark.reliability
SEEDS = [int(os.environ["LLAMA_ORCH_SEED"])] if "LLAMA_ORCH_SEED" in os.environ else list(range(1, WALKS + 1))


@dataclass
class Grant:
    amount: int
    expires: datetime
    spent: int = 0
    reserved: int = 0


@dataclass
class HoldRecord:
    tenant: str
    amount: int
    expires: datetime
    state: str = "open"  # open | settled | released | expired
    taken: list[tuple[Grant, int]] = field(default_factory=list)


class Model:
    """The money rules, plainly: grants burn earliest expiry first and expire after 12 months; a hold
    reserves from live grants; a settle debits what it says from its reservation (in reservation order)
    and frees the rest; a settle after the hold expired debits what the live balance still has; release
    and expiry free the whole reservation. An op id answers its first result again (EXISTS), or
    EXISTS_DIFFERENT for other content."""

    def __init__(self) -> None:
        self.grants: dict[str, list[Grant]] = {}
        self.holds: dict[str, HoldRecord] = {}
        self.spent: dict[str, int] = {}
        self.done: dict[str, tuple[Op, Code, int]] = {}

    def live(self, tenant: str, now: datetime) -> list[Grant]:
        return [g for g in self.grants[tenant] if g.expires > now]

    def balance(self, tenant: str, now: datetime) -> int:
        return sum(g.amount - g.spent - g.reserved for g in self.live(tenant, now))

    def held(self, tenant: str) -> int:
        return sum(h.amount for h in self.holds.values() if h.tenant == tenant and h.state == "open")

    def apply(self, op: Op, now: datetime) -> tuple[Code, int]:
        """(code, micro_credits of an OK result: granted, held or debited; else 0)."""
        if op.op_id in self.done:
            first, code, amount = self.done[op.op_id]
            return (Code.EXISTS, amount) if first == op else (Code.EXISTS_DIFFERENT, 0)
        code, amount = self._apply(op, now)
        if code is Code.OK:
            self.done[op.op_id] = (op, code, amount)
        return code, amount

    def _apply(self, op: Op, now: datetime) -> tuple[Code, int]:
        if isinstance(op, CreateTenant):
            if op.tenant_id in self.grants:
                return Code.TENANT_EXISTS, 0
            self.grants[op.tenant_id], self.spent[op.tenant_id] = [], 0
            return Code.OK, 0
        if isinstance(op, GrantCredits):
            grants = self.grants[op.tenant_id]
            grants.append(Grant(op.micro_credits, grant_expiry(now)))
            grants.sort(key=lambda g: g.expires)  # stable: equal expiries keep their order
            return Code.OK, op.micro_credits
        if isinstance(op, Hold):
            free = self.balance(op.tenant_id, now)
            if free < op.micro_credits:
                return Code.INSUFFICIENT_CREDITS, 0
            hold = HoldRecord(op.tenant_id, op.micro_credits, now + timedelta(seconds=op.timeout_s))
            need = op.micro_credits
            for g in self.live(op.tenant_id, now):
                take = min(need, g.amount - g.spent - g.reserved)
                if take > 0:
                    g.reserved += take
                    hold.taken.append((g, take))
                    need -= take
            self.holds[op.op_id] = hold
            return Code.OK, op.micro_credits
        if isinstance(op, Record):
            return (Code.OK, 0) if op.tenant_id in self.grants else (Code.TENANT_NOT_FOUND, 0)
        if isinstance(op, ExpireHolds):
            for hold in self.holds.values():
                if hold.state == "open" and hold.expires <= now:
                    self._end(hold, "expired", 0)
            return Code.OK, 0
        hold = self.holds.get(op.hold_id) if isinstance(op, Settle | Release) else None
        if hold is None:
            return Code.HOLD_NOT_FOUND, 0
        ended = {"settled": Code.HOLD_SETTLED, "released": Code.HOLD_RELEASED, "expired": Code.HOLD_EXPIRED}
        if isinstance(op, Release):
            if hold.state != "open":
                return ended[hold.state], 0
            self._end(hold, "released", 0)
            return Code.OK, 0
        assert isinstance(op, Settle)
        if hold.state in ("settled", "released"):
            return ended[hold.state], 0
        if op.micro_credits > hold.amount:
            return Code.SETTLE_EXCEEDS_HOLD, 0
        if hold.state == "open":
            self._end(hold, "settled", op.micro_credits)
            return Code.OK, op.micro_credits
        debit, need = 0, op.micro_credits  # expired: its credit went back; take what the balance has
        for g in self.live(hold.tenant, now):
            take = min(need, g.amount - g.spent - g.reserved)
            if take > 0:
                g.spent += take
                need -= take
                debit += take
        hold.state = "settled"
        self.spent[hold.tenant] += debit
        return Code.OK, debit

    def _end(self, hold: HoldRecord, state: str, debit: int) -> None:
        rest = debit
        for g, take in hold.taken:
            d = min(take, rest)
            g.reserved -= take
            g.spent += d
            rest -= d
        hold.state, hold.taken = state, []
        self.spent[hold.tenant] += debit


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def usage_for(op: Settle, tenant: str, now: datetime) -> UsageRow:
    return UsageRow(f"chatcmpl-{op.op_id}", now, tenant, "k", "public", "m", 3, 2, op.micro_credits, 5, 9, "ok", "stop")


def walk(seed: int, path: Path, steps: int) -> dict[str, int]:
    """One seeded walk; returns what it did (its figures)."""
    rng, clock, model = random.Random(seed), Clock(), Model()
    # Snapshots every few ops, or never: a restart loads the latest and replays the ops after it.
    every = [3, 40, 10**9]
    service = LedgerService(path, clock=clock, snapshot_every=rng.choice(every))
    tenants = ["t-a", "t-b", "t-c"]
    sent: list[tuple[Op, datetime]] = []  # OK or not: candidates for a retry inside the window
    holds: list[str] = []
    figures = {"ops": 0, "retries": 0, "restarts": 0, "jumps": 0, "late_settles": 0, "refusals": 0}

    def run(op: Op) -> Result:
        result: Result = asyncio.run(apply(op))
        return result

    async def apply(op: Op) -> Result:
        if isinstance(op, Settle) and (hold := model.holds.get(op.hold_id)) is not None:
            return await service.apply(op, usage_for(op, hold.tenant, clock.now))
        if isinstance(op, Record):  # a usage row without money (contract billing)
            row = UsageRow(op.op_id, clock.now, op.tenant_id, "k", "contract", "m", 3, 2, 0, 5, 9, "ok", "stop")
            return await service.record(row)
        return await service.apply(op)

    for t in tenants:
        op = CreateTenant(f"create-{t}", t, t)
        assert run(op).code is Code.OK and model.apply(op, clock.now)[0] is Code.OK
    for step in range(steps):
        where = f"seed {seed}, step {step} (replay: LLAMA_ORCH_SEED={seed})"
        roll, tenant = rng.random(), rng.choice(tenants)
        jump = rng.random()
        if jump < 0.01:
            clock.now += timedelta(days=rng.choice([200, 370]))  # grants near or past their 12 months
            figures["jumps"] += 1
            # Past the idempotency window: ended holds and old op ids may be forgotten (when is the
            # ledger's own business), so only the holds still open (never forgotten) stay in play.
            holds[:] = [h for h in holds if model.holds[h].state == "open"]
            sent.clear()
        elif jump < 0.3:
            clock.now += timedelta(seconds=rng.choice([0.001, 1, 30, 400]))
        if roll < 0.03:
            service.close()  # a restart: the next service replays the file
            service = LedgerService(path, clock=clock, snapshot_every=rng.choice(every))
            figures["restarts"] += 1
            check_invariants(service._store, clock.now)
            continue
        if roll < 0.12:
            op: Op = GrantCredits(f"g{step}", tenant, rng.randrange(1, 20_000))
        elif roll < 0.45:
            op = Hold(f"h{step}", tenant, rng.randrange(0, 8_000), rng.choice([1, 30, 600, MAX_HOLD_TIMEOUT_S]))
        elif roll < 0.68 and holds:
            op = Settle(f"s{step}", rng.choice(holds[-10:]), rng.randrange(0, 8_000))
        elif roll < 0.76 and holds:
            op = Release(f"r{step}", rng.choice(holds[-10:]))
        elif roll < 0.82:
            op = ExpireHolds(f"x{step}")
        elif roll < 0.86:
            op = Record(f"chatcmpl-rec{step}", tenant)
        elif roll < 0.92 and holds:  # a client's retry under a new id: the same hold settled again
            op = Settle(f"s{step}-again", rng.choice(holds[-10:]), rng.randrange(0, 8_000))
        else:
            recent = [(o, at) for o, at in sent if clock.now - at < WINDOW - timedelta(hours=1)]
            if not recent:
                continue
            op, _ = rng.choice(recent[-20:])
            if rng.random() < 0.3:  # same id, other content
                op = op._replace(micro_credits=op.micro_credits + 1) if hasattr(op, "micro_credits") else op
            figures["retries"] += 1
        want_code, want_amount = model.apply(op, clock.now)
        got = run(op)
        assert got.code is want_code, f"{where}: {op} gave {got.code}, the model {want_code}"
        if got.code in (Code.OK, Code.EXISTS) and not isinstance(op, Release | ExpireHolds | CreateTenant | Record):
            assert got.micro_credits == want_amount, f"{where}: {op} gave {got}, the model {want_amount}"
        figures["ops"] += 1
        figures["late_settles"] += got.code is Code.OK and got.late
        figures["refusals"] += got.code not in (Code.OK, Code.EXISTS)
        sent.append((op, clock.now))
        if isinstance(op, Hold) and got.code is Code.OK:
            holds.append(op.op_id)
        for t in tenants:
            account = service._ledger.account(t, clock.now)
            want = (model.balance(t, clock.now), model.held(t), model.spent[t])
            assert (account.balance, account.held, account.spent) == want, f"{where}: {t} {account} != {want}"
    found = check_invariants(service._store, clock.now)
    assert found.debited == sum(model.spent.values())
    service.close()
    return figures


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_walk_agrees_with_the_reference_model_across_restarts(seed: int, tmp_path: Path) -> None:
    figures = walk(seed, tmp_path / "ledger.duckdb", STEPS)
    # The walk really exercised what it is for.
    assert figures["restarts"] >= 3 and figures["retries"] >= 10 and figures["refusals"] >= 10, figures
    print(f"money model seed {seed}: {figures}")

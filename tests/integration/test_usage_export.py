"""Usage reports and the Parquet export on the session's real stack: the export round-trips (its rows
and sums equal the report's totals), the report's cost equals the ledger's debits for the tenant, and the
admin report across tenants holds the tenant's group with the same totals."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orch.store_schema import USAGE_EXPORT_ARROW
from tests.integration.conftest import MODEL, Stack, cli
from tests.integration.test_metrics import rows_of
from tests.integration.test_tap_billing import account, chat, new_tenant

pytestmark = pytest.mark.integration

N = 4


def orch(stack: Stack, *args: str) -> str:
    done = cli("--data-dir", str(stack.data_dir), *args, timeout=120)
    assert done.returncode == 0, (args, done.stderr[-2000:])
    return done.stdout.strip()


def test_the_export_round_trips_and_reports_equal_the_ledgers_debits(stack: Stack, tmp_path: Path) -> None:
    tenant, key = new_tenant(stack, 10**9)
    for i in range(N):
        assert chat(stack, key, messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=4).status_code == 200
    rows = rows_of(stack, tenant, N)
    report = json.loads(orch(stack, "usage", tenant, "--json"))
    totals = report["totals"]
    assert totals["requests"] == len(rows) == N, report
    spent = account(stack, tenant)["spent_micro_credits"]
    assert totals["cost_micro_credits"] == spent > 0  # Σ usage cost == Σ debits, for this tenant

    out = tmp_path / "usage.parquet"
    assert orch(stack, "usage", "export", str(out), "--tenant", tenant).startswith(f"wrote {out}")
    table = pq.read_table(out)
    assert table.schema.equals(USAGE_EXPORT_ARROW), table.schema
    assert table.num_rows == N and set(table.column("tenant_id").to_pylist()) == {tenant}
    assert set(table.column("model").to_pylist()) == {MODEL}
    for column, total in (("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens"),
                          ("cost_micro", "cost_micro_credits")):  # fmt: skip
        assert sum(table.column(column).to_pylist()) == totals[total], column
    assert sorted(table.column("request_id").to_pylist()) == sorted(r["request_id"] for r in rows)

    everyone = json.loads(orch(stack, "usage", "all", "--group-by", "tenant", "--json"))
    (mine,) = [g for g in everyone["data"] if g["key"] == tenant]
    assert (mine["requests"], mine["cost_micro"]) == (N, spent), mine
    assert everyone["totals"]["requests"] >= N and everyone["tenant_id"] is None

    whole = tmp_path / "all.parquet"
    orch(stack, "usage", "export", str(whole))
    assert pq.read_table(whole).num_rows == everyone["totals"]["requests"]  # nothing else ran meanwhile

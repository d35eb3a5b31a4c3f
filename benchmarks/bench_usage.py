"""The usage log in DuckDB: ingest rows per second, bytes per row on disk, and a tenant's monthly report
over a large history (issue 12's goals: >= 500k rows/s, <= 100 B/row, report <= 0.5 s at 10M rows).

1. *Ingest*: ``--ingest-rows`` realistic rows (random request ids and X-Request-Ids, 1000 tenants, keys,
   models), as gateways send them: batches of ``--lease-rows`` (a lease's flush) made Arrow by
   :func:`orch.usage_log.to_arrow` on the gateway replica. The goal's figure is the ledger writer's rate:
   :meth:`orch.store.Store.commit` of those batches in group commits of ``--batch`` rows (and with the
   metrics it keeps of them). Beside it: what one gateway replica spends making its batches (each replica
   does its own), the whole path in one thread from rows, and the baseline measured in the same run: the
   same rows as one ready Arrow table with the ids as text (the layout before schema v5), inserted raw.
2. *History*: ``--rows`` rows over three months, made by DuckDB itself, in a real store file; its size
   after a checkpoint over the row count is the bytes per row.
3. *Report*: one tenant's month by day (:meth:`orch.store.Store.usage`, what ``GET /v1/usage`` runs), and
   the admin's month across tenants, each the median of ``--repeat`` runs.

    .venv/bin/python -m benchmarks.bench_usage                  # 10M rows, ~3 min
    .venv/bin/python -m benchmarks.bench_usage --rows 1000000   # quicker

Prints a table; writes ``benchmarks/results/usage.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from orch.lease import LeaseSettings
from orch.metrics import UsageMetrics
from orch.store import Batch, Store, UsageRow
from orch.store_schema import USAGE_ARROW
from orch.usage_log import to_arrow

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 9, 1, tzinfo=UTC)
TENANTS = 1000
MODELS = ("smollm2-135m-instruct", "llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "bge-small-en")


def realistic_rows(n: int, seed: int = 7) -> list[UsageRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tenant = rng.randrange(TENANTS)
        prompt, completion = rng.randrange(5, 4000), rng.randrange(0, 1000)
        ttft = rng.randrange(10, 900)
        rows.append(UsageRow(
            f"chatcmpl-{uuid.UUID(int=rng.getrandbits(128)).hex}", T0 + timedelta(milliseconds=40 * i),
            f"t-{tenant:012x}", f"k{tenant:015x}", "public", MODELS[tenant % len(MODELS)], prompt, completion,
            prompt + 2 * completion, ttft, ttft + 20 * completion, "ok" if rng.random() < 0.98 else "aborted",
            "stop" if rng.random() < 0.7 else "length", None, str(uuid.UUID(int=rng.getrandbits(128))),
        ))  # fmt: skip
    return rows


def ingest(path: Path, rows: list[UsageRow], batch: int, lease_rows: int) -> dict[str, float]:
    """The ledger writer's rows/s (Store.commit, and with the metrics it keeps) of gateways' lease batches,
    what one gateway replica spends making such a batch, the whole path in one thread, and the baseline."""
    start = time.perf_counter()
    made = [to_arrow(rows[i : i + lease_rows]) for i in range(0, len(rows), lease_rows)]
    gateway = len(rows) / (time.perf_counter() - start)
    per_commit = max(1, batch // lease_rows)
    commits = [made[i : i + per_commit] for i in range(0, len(made), per_commit)]
    store = Store(path / "writer.duckdb")
    start = time.perf_counter()
    for batches in commits:
        store.commit(Batch(usage_batches=batches))
    writer = len(rows) / (time.perf_counter() - start)
    store.close()
    store, metrics = Store(path / "writer-metrics.duckdb"), UsageMetrics()
    start = time.perf_counter()
    for batches in commits:
        store.commit(Batch(usage_batches=batches))
        metrics.add_batch(pa.Table.from_batches(batches))
    with_metrics = len(rows) / (time.perf_counter() - start)
    assert store.audit().usage_rows == len(rows) and sum(metrics.requests.values()) == len(rows)
    store.close()
    store = Store(path / "one-thread.duckdb")
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        store.commit(Batch(usage=rows[i : i + batch]))
    one_thread = len(rows) / (time.perf_counter() - start)
    # The baseline: the same rows as one ready Arrow table, ids as text (the layout before schema v5),
    # inserted raw into a table of their own.
    columns = list(zip(*(r._replace(ts=r.ts.replace(tzinfo=None)) for r in rows), strict=True))
    table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, USAGE_ARROW, strict=True)],
                                 schema=USAGE_ARROW)  # fmt: skip
    con = store.cursor()
    con.execute("CREATE TABLE raw AS SELECT * FROM usage LIMIT 0")
    start = time.perf_counter()
    for i in range(0, table.num_rows, batch):
        con.execute("BEGIN TRANSACTION")
        con.from_arrow(table.slice(i, batch)).insert_into("raw")
        con.execute("COMMIT")
    raw = table.num_rows / (time.perf_counter() - start)
    con.close()
    store.close()
    return {"writer_rows_per_s": round(writer), "writer_with_metrics_rows_per_s": round(with_metrics),
            "gateway_conversion_rows_per_s": round(gateway), "one_thread_rows_per_s": round(one_thread),
            "baseline_raw_text_ids_rows_per_s": round(raw)}  # fmt: skip


def history(path: Path, n: int) -> tuple[Store, dict[str, float]]:
    """A store file of ``n`` rows over 91 days, made by DuckDB (Python would take minutes), checkpointed."""
    store = Store(path / "history.duckdb")
    con = store.cursor()
    span_us = 91 * 86_400 * 1_000_000
    start = time.perf_counter()
    con.execute(f"""
        INSERT INTO usage_log SELECT
            'chatcmpl', md5(i::VARCHAR)::UUID, NULL,
            TIMESTAMP '2026-09-01' + to_microseconds((i * {span_us // n})::BIGINT),
            't-' || lpad(printf('%x', hash(i) % {TENANTS}), 12, '0'),
            'k' || lpad(printf('%x', hash(i) % {TENANTS}), 15, '0'),
            'public', ['{"', '".join(MODELS)}'][(1 + hash(i) % {len(MODELS)})::BIGINT],
            (5 + hash(i * 3) % 4000)::INTEGER, (hash(i * 5) % 1000)::INTEGER, (hash(i * 7) % 100000)::BIGINT,
            (10 + hash(i * 11) % 900)::INTEGER, (100 + hash(i * 13) % 30000)::INTEGER,
            CASE WHEN hash(i * 17) % 50 = 0 THEN 'aborted' ELSE 'ok' END,
            CASE WHEN hash(i * 19) % 3 = 0 THEN 'length' ELSE 'stop' END, NULL, uuid(), NULL
        FROM range({n}) t(i)
    """)  # fmt: skip
    con.execute("CHECKPOINT")
    made = time.perf_counter() - start
    con.close()
    size = (path / "history.duckdb").stat().st_size
    return store, {"rows": n, "bytes_per_row": round(size / n, 1), "file_mb": round(size / 2**20, 1),
                   "made_in_s": round(made, 1)}  # fmt: skip


def reports(store: Store, repeat: int) -> dict[str, float]:
    tenant = store.cursor().execute("SELECT tenant_id FROM usage LIMIT 1").fetchall()[0][0]
    month = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
    timings: dict[str, list[float]] = {"tenant_month_by_day_s": [], "all_tenants_month_by_tenant_s": []}
    for _ in range(repeat):
        start = time.perf_counter()
        one = store.usage(tenant, since=month[0], until=month[1], group_by="day")
        timings["tenant_month_by_day_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        everyone = store.usage(None, since=month[0], until=month[1], group_by="tenant")
        timings["all_tenants_month_by_tenant_s"].append(time.perf_counter() - start)
    assert 0 < len(one.rows) <= 31 and len(everyone.rows) == TENANTS, (len(one.rows), len(everyone.rows))
    return {k: round(statistics.median(v), 4) for k, v in timings.items()} | {"tenant_requests": one.totals.requests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of history for the size and reports")
    parser.add_argument("--ingest-rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=10_000, help="rows per commit in the ingest run")
    parser.add_argument("--lease-rows", type=int, default=LeaseSettings.flush_rows, help="rows per gateway batch")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "usage.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        rows = realistic_rows(args.ingest_rows)
        results: dict[str, Any] = {"ingest": ingest(path, rows, args.batch, args.lease_rows)}
        results["ingest"] |= {"batch": args.batch, "lease_rows": args.lease_rows}
        store, results["history"] = history(path, args.rows)
        results["reports"] = reports(store, args.repeat)
        store.close()
    i, h, r = results["ingest"], results["history"], results["reports"]
    rows = [
        ("ingest rows/s (ledger writer: Store.commit)", f"{i['writer_rows_per_s']:,}", ">= 500,000"),
        ("  with its metrics", f"{i['writer_with_metrics_rows_per_s']:,}", ""),
        ("  a gateway making its batches", f"{i['gateway_conversion_rows_per_s']:,}", "(each replica)"),
        ("  all in one thread, from rows", f"{i['one_thread_rows_per_s']:,}", ""),
        ("  baseline: raw Arrow, ids as text", f"{i['baseline_raw_text_ids_rows_per_s']:,}", ""),
        (f"bytes per row on disk ({h['rows']:,} rows)", str(h["bytes_per_row"]), "<= 100"),
        ("a tenant's month by day (s)", str(r["tenant_month_by_day_s"]), "<= 0.5"),
        ("all tenants' month by tenant (s)", str(r["all_tenants_month_by_tenant_s"]), ""),
    ]
    for name, value, goal in rows:
        print(f"{name:<44} {value:>14}  {goal}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""orch/metrics.py: the counters from usage rows, their seed from a real store (DuckDB SQL must bucket
as Python does), the text format, and the Grafana board against what is exported."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from orch.metrics import Histogram, LedgerGauges, ReplicaReport, UsageMetrics, render
from orch.store import Batch, Store, UsageRow
from orch.usage_log import to_arrow

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def rows() -> list[UsageRow]:
    """Rows across two taps, two tenants, statuses, a row without a first token, one with one token."""
    made = []
    for i in range(40):
        made.append(
            UsageRow(
                f"r{i}",
                T0 + timedelta(seconds=i),
                f"t-{i % 2}",
                None,
                "public" if i % 3 else "private-acme",
                "m",
                10 + i,
                i % 7,
                100 * i,
                None if i % 11 == 0 else 5 * i,
                40 * i + 50,
                "ok" if i % 5 else "aborted",
                "stop",
            )  # fmt: skip
        )
    return made


def assert_same(got: UsageMetrics, want: UsageMetrics) -> None:
    """Equal counts, and histogram sums equal up to float rounding (sums added in another order)."""
    assert got.requests == want.requests and got.micro_credits == want.micro_credits
    assert got.prompt_tokens == want.prompt_tokens and got.completion_tokens == want.completion_tokens
    for name, by_where in want.histograms.items():
        assert set(got.histograms[name]) == set(by_where), name
        for where, h in by_where.items():
            mine = got.histograms[name][where]
            assert mine.counts == h.counts and abs(mine.sum - h.sum) < 1e-9, (name, where, mine, h)


def added(made: list[UsageRow]) -> UsageMetrics:
    metrics = UsageMetrics()
    for row in made:
        metrics.add(row)
    return metrics


def test_a_stores_seed_equals_the_rows_added_one_by_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "ledger.duckdb")
    store.commit(Batch(ops=[], usage=rows()))
    assert_same(store.usage_metrics(), added(rows()))
    store.close()


def test_a_gateways_arrow_batch_counts_as_its_rows_added_one_by_one() -> None:
    batched = UsageMetrics()
    batched.add_batch(to_arrow(rows()[:25]))
    batched.add_batch(pa.Table.from_batches([to_arrow(rows()[25:]), to_arrow([])]))  # as the ledger commits them
    assert_same(batched, added(rows()))


def test_shards_merge_into_one_count() -> None:
    odd, even = added(rows()[1::2]), added(rows()[::2])
    odd.merge(even)
    assert_same(odd, added(rows()))


def test_the_text_format_has_cumulative_buckets_and_escaped_labels() -> None:
    usage = UsageMetrics()
    for row in rows():
        usage.add(row._replace(model='we"ird\\model'))
    commits = Histogram((0.001, 0.01))
    commits.observe(0.0005)
    commits.observe(0.5)
    text = render(usage, [LedgerGauges(0, 3, 1, 700, commits)], [
        ReplicaReport("public", "model-m", "abc", "m", {"running": 2, "waiting": 1, "kv_cache_usage": 0.25}),
    ])  # fmt: skip
    assert 'model="we\\"ird\\\\model"' in text
    assert 'llama_orch_ledger_commit_seconds_bucket{shard="0",le="0.001"} 1.0' in text
    assert 'llama_orch_ledger_commit_seconds_bucket{shard="0",le="+Inf"} 2.0' in text
    assert 'llama_orch_ledger_commit_seconds_count{shard="0"} 2.0' in text
    assert 'llama_orch_engine_kv_cache_usage_ratio{app="public",model="m",replica="abc"} 0.25' in text
    assert 'llama_orch_open_holds{shard="0"} 3.0' in text
    counts = [
        float(v) for v in re.findall(r'llama_orch_time_to_first_token_seconds_bucket\{tap="public".*\} (\S+)', text)
    ]
    assert counts == sorted(counts) and counts[-1] == sum(
        1 for r in rows() if r.tap == "public" and r.ttft_ms is not None
    )


def test_the_grafana_board_asks_only_for_exported_metrics() -> None:
    board = json.loads((REPO / "configs" / "grafana-llama-orch.json").read_text())
    usage = UsageMetrics()
    for row in rows():
        usage.add(row)
    text = render(usage, [LedgerGauges(0, 0, 0, 0, Histogram((1.0,)))], [
        ReplicaReport("public", "model-m", "abc", "m", {"running": 0, "waiting": 0, "kv_cache_usage": 0.0},
                      {"m": {"running": 0, "waiting": 0, "queued": {"t-0": 1}}}),
    ])  # fmt: skip
    exported = set(re.findall(r"^(llama_orch_\w+?)(?:\{| )", text, re.M))
    asked = {name for p in board["panels"] for t in p["targets"] for name in re.findall(r"llama_orch_\w+", t["expr"])}
    assert asked and asked <= exported, asked - exported
    assert board["__inputs"][0]["pluginId"] == "prometheus"  # importable as is: Grafana asks for the data source


def test_the_usage_table_is_every_row_in_the_export_schema_and_reports_merge_across_shards(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from orch.store import merge_reports
    from orch.store_schema import USAGE_EXPORT_ARROW

    shards = [Store(tmp_path / f"ledger-{i}.duckdb") for i in range(2)]
    for i, store in enumerate(shards):
        store.commit(Batch(ops=[], usage=[r for r in rows() if int(r.tenant_id[-1]) == i]))
    table = shards[0].usage_table(None, since=T0 + timedelta(seconds=10))
    assert table.schema.equals(USAGE_EXPORT_ARROW)
    want = [r for r in rows() if r.tenant_id == "t-0" and r.ts >= T0 + timedelta(seconds=10)]
    assert table.column("request_id").to_pylist() == [r.request_id for r in want]
    assert table.column("ts").to_pylist() == [r.ts for r in want]  # UTC-aware, as written
    pq.write_table(table, tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").equals(table)

    merged = merge_reports([s.usage(None, group_by="tenant") for s in shards])
    assert [(g.key, g.requests) for g in merged.rows] == [("t-0", 20), ("t-1", 20)]  # type: ignore[union-attr]
    assert merged.totals.cost_micro == sum(r.cost_micro for r in rows())
    latest = merge_reports([s.usage(None) for s in shards], limit=5)
    assert [r.request_id for r in latest.rows] == [r.request_id for r in rows()[-5:]]  # type: ignore[union-attr]
    for store in shards:
        store.close()

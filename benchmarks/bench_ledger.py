"""Ledger throughput: hold+settle pairs per second, in memory and with durable group commits to DuckDB.

One "pair" is what a billed request costs the ledger: a Hold, a Settle, and the request's usage row
(committed with the settle). The durable runs commit every ``batch`` ops in one transaction, as the
ledger actor does under concurrency; ``batch=1`` is one transaction per op. Also times a restart
(load_ops + replay) of the largest file.

    python benchmarks/bench_ledger.py            # full run, ~2 min
    python benchmarks/bench_ledger.py --quick    # smoke run
Writes benchmarks/results/ledger.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from orch.ledger import MICRO, Code, CreateTenant, GrantCredits, Hold, Ledger, Price, Settle, cost, max_cost
from orch.store import Batch, Store, UsageRow

PRICE = Price(input_per_m=150_000, output_per_m=600_000)
TENANTS = [f"tenant-{i}" for i in range(16)]
GC_TUNED = (50_000, 20, 100)  # gc.set_threshold for the ledger's process


def seeded(ledger: Ledger, batch: Batch | None = None) -> None:
    for t in TENANTS:
        for op in (CreateTenant(f"create-{t}", t, t), GrantCredits(f"grant-{t}", t, 10**9 * MICRO)):
            result = ledger.apply(op)
            assert result.code is Code.OK
            if batch is not None:
                batch.ops.append((op, result))


def request_ids(n: int) -> list[tuple[str, str, str]]:
    return [(TENANTS[i % len(TENANTS)], f"hold-{i}", f"settle-{i}") for i in range(n)]


def bench_memory(pairs: int) -> dict[str, object]:
    ledger = Ledger()
    seeded(ledger)
    ids = request_ids(pairs)
    hold_amount, actual = max_cost(PRICE, 200, 256), cost(PRICE, 200, 100)
    start, cpu = time.perf_counter(), time.process_time()
    for tenant, hold_id, settle_id in ids:
        if ledger.apply(Hold(hold_id, tenant, hold_amount, 600)).code is not Code.OK:
            raise AssertionError("hold refused")
        if ledger.apply(Settle(settle_id, hold_id, actual)).code is not Code.OK:
            raise AssertionError("settle refused")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    ledger.check_invariants()
    return {"mode": "memory", "batch_ops": 0, "pipelined": False, **_rates(pairs, elapsed, cpu)}


def _rates(pairs: int, elapsed: float, cpu: float) -> dict[str, float]:
    return {"pairs": pairs, "seconds": elapsed, "pairs_per_s": pairs / elapsed, "pairs_per_cpu_s": pairs / cpu}


def bench_durable(pairs: int, batch_ops: int, path: Path, pipelined: bool = False) -> dict[str, object]:
    """Sequential: apply a batch, commit it, repeat. Pipelined: a writer thread commits batch N while
    this thread applies batch N+1 (DuckDB releases the GIL while it writes); callers of batch N would
    be acknowledged when its commit returns, so nothing is acknowledged before it is durable."""
    ledger, batch = Ledger(), Batch()
    store = Store(path)
    seeded(ledger, batch)
    store.commit(batch)
    ids = request_ids(pairs)
    hold_amount, actual = max_cost(PRICE, 200, 256), cost(PRICE, 200, 100)
    batch, commits = Batch(), 0
    pending: queue.Queue[Batch | None] = queue.Queue(maxsize=2)  # back-pressure: at most 2 batches ahead

    def writer() -> None:
        while (ready := pending.get()) is not None:
            store.commit(ready)

    thread = threading.Thread(target=writer, daemon=True)
    if pipelined:
        thread.start()
    flush = pending.put if pipelined else store.commit
    start, cpu = time.perf_counter(), time.process_time()
    for tenant, hold_id, settle_id in ids:
        op: Hold | Settle = Hold(hold_id, tenant, hold_amount, 600)
        result = ledger.apply(op)
        if result.code is not Code.OK:
            raise AssertionError("hold refused")
        batch.ops.append((op, result))
        if len(batch.ops) >= batch_ops:
            flush(batch)
            batch, commits = Batch(), commits + 1
        op = Settle(settle_id, hold_id, actual)
        result = ledger.apply(op)
        if result.code is not Code.OK:
            raise AssertionError("settle refused")
        batch.ops.append((op, result))
        batch.usage.append(
            UsageRow(settle_id, result.at, tenant, "key", "public", "smollm2", 200, 100, actual, 40, 900, "ok", "stop")
        )
        if len(batch.ops) >= batch_ops:
            flush(batch)
            batch, commits = Batch(), commits + 1
    flush(batch)
    commits += 1
    if pipelined:
        pending.put(None)
        thread.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    audit = store.audit()
    store.close()
    assert audit.debited == audit.usage_cost == pairs * actual
    return {
        "mode": "durable",
        "batch_ops": batch_ops,
        "pipelined": pipelined,
        **_rates(pairs, elapsed, cpu),
        "commits_per_s": commits / elapsed,
        "ms_per_commit": elapsed / commits * 1000,
    }


def bench_restart(path: Path) -> dict[str, float]:
    start = time.perf_counter()
    with Store(path, read_only=True) as store:
        ledger = Ledger()
        ops = ledger.replay(store.load_ops())
    elapsed = time.perf_counter() - start
    return {"ops": ops, "seconds": elapsed, "ops_per_s": ops / elapsed}


@contextlib.contextmanager
def gc_mode(mode: str) -> Iterator[None]:
    """'default': CPython's thresholds (700, 10, 10). 'tuned': what the ledger actor should run with;
    the ledger keeps many small objects alive (the idempotency window), and with the default
    thresholds young-generation collections rescan them often enough to halve throughput."""
    saved = gc.get_threshold()
    gc.collect()
    if mode == "tuned":
        gc.set_threshold(*GC_TUNED)
        gc.freeze()  # the actor does this after replay: the rebuilt state is never garbage
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ledger.json")
    args = parser.parse_args()
    scale = 0.05 if args.quick else 1.0
    # (gc, batch ops, pairs, pipelined); batch 0 = in memory. Pairs: ~2-5 s per run on 2 cores.
    plan = [("default", 0, 200_000, False), ("tuned", 0, 200_000, False)]
    plan += [("default", b, n, False) for b, n in ((1, 400), (64, 20_000), (512, 100_000), (4096, 200_000))]
    plan += [("tuned", b, n, p) for p in (False, True) for b, n in ((512, 100_000), (4096, 200_000))]
    load_before = os.getloadavg()[0]
    runs, restart = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        for mode, batch_ops, pairs, pipelined in plan:
            pairs = max(int(pairs * scale), 10)
            with gc_mode(mode):
                if batch_ops == 0:
                    run = bench_memory(pairs)
                else:
                    path = Path(tmp) / f"ledger-{mode}-{batch_ops}-{pipelined}.duckdb"
                    run = bench_durable(pairs, batch_ops, path, pipelined)
            runs.append({"gc": mode, **run})
        with gc_mode("tuned"):
            restart = bench_restart(path)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "duckdb": duckdb.__version__,
            "load_avg_1m_before": load_before,
            "load_avg_1m_after": os.getloadavg()[0],
        },
        "gc_tuned": GC_TUNED,
        "runs": runs,
        "restart": restart,
    }
    print(f"{'store':>8} {'ops/commit':>10} {'pipelined':>9} {'gc':>8} {'pairs':>8} {'pairs/s':>9} {'pairs/cpu-s':>11}"
          f" {'ms/commit':>9}")  # fmt: skip
    for r in runs:
        print(
            f"{('DuckDB' if r['mode'] == 'durable' else 'none'):>8} {r['batch_ops'] or '-':>10}"
            f" {('yes' if r['pipelined'] else 'no'):>9} {r['gc']:>8} {r['pairs']:>8} {r['pairs_per_s']:>9,.0f}"
            f" {r['pairs_per_cpu_s']:>11,.0f} {r.get('ms_per_commit', 0):>9.2f}"
        )
    print(f"restart: replayed {restart['ops']:,} ops in {restart['seconds']:.2f} s ({restart['ops_per_s']:,.0f}/s)")
    print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Ledger restart time as its history grows: from the whole op log, and from a snapshot (orch.snapshot) and the
ops after it (issue 14: restart time stays flat at 1M and 10M ops).

A history is ``n`` ops of hold+settle pairs over 1000 tenants at a steady ``--ops-per-day`` (so one day's
idempotency window holds the same traffic at every size: the state a snapshot keeps does not grow with
history, only the log does), committed to a real store file the way the ledger actor does. Then, per size:

- *full replay*: a ledger service opening the file with no snapshot (what every restart cost before);
- *snapshot*: the service writes one (timed), ``--tail`` more ops are committed after it, and a restart
  loads the snapshot and replays the tail. Beside the snapshot written on the loop, the ledger actor's way
  (``snapshot_aside``: a forked child pickles it) is timed: how long the loop pauses for the fork.

    .venv/bin/python -m benchmarks.bench_restart                        # 1M and 10M ops, ~6 min
    .venv/bin/python -m benchmarks.bench_restart --sizes 100000 1000000 # quicker

Prints a table; writes ``benchmarks/results/restart.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from actors.ledger import LedgerService
from orch import snapshot
from orch.ledger import MICRO, Code, CreateTenant, GrantCredits, Hold, Ledger, Settle
from orch.store import Batch, Store

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TENANTS = [f"t-{i:04d}" for i in range(1000)]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def write_ops(store: Store, ledger: Ledger, clock: Clock, n: int, ops_per_day: int, start: int) -> None:
    """``n`` more ops (hold+settle pairs, op ids numbered from ``start``), committed in batches of 20k."""
    step = timedelta(days=1) / ops_per_day
    rng = random.Random(start)
    batch = Batch()
    for i in range(start, start + n, 2):
        tenant = TENANTS[rng.randrange(len(TENANTS))]
        for op in (Hold(f"h{i}", tenant, 5_000, 600), Settle(f"s{i}", f"h{i}", rng.randrange(5_000))):
            clock.now += step
            result = ledger.apply(op)
            assert result.code is Code.OK, result
            batch.ops.append((op, result))
        if len(batch.ops) >= 20_000:
            store.commit(batch)
            batch = Batch()
    store.commit(batch)


def history(path: Path, n: int, ops_per_day: int) -> tuple[Ledger, Clock, float]:
    clock = Clock()
    ledger, store = Ledger(clock), Store(path)
    seed = Batch()
    for t in TENANTS:
        for op in (CreateTenant(f"c-{t}", t, t), GrantCredits(f"g-{t}", t, 10**6 * MICRO)):
            seed.ops.append((op, ledger.apply(op)))
    store.commit(seed)
    started = time.perf_counter()
    write_ops(store, ledger, clock, n - len(seed.ops), ops_per_day, 0)
    made = time.perf_counter() - started
    store.close()
    return ledger, clock, made


def open_service(path: Path, clock: Clock, snapshot_every: int) -> tuple[LedgerService, float]:
    gc.collect()
    started = time.perf_counter()
    service = LedgerService(path, clock=clock, snapshot_every=snapshot_every)
    return service, time.perf_counter() - started


def one_size(tmp: Path, n: int, ops_per_day: int, tail: int) -> dict[str, Any]:
    path = tmp / f"ledger-{n}.duckdb"
    ledger, clock, made = history(path, n, ops_per_day)
    service, full = open_service(path, clock, snapshot_every=10**12)  # no snapshot in the file: all of it
    want = [service._ledger.account(t) for t in TENANTS[:50]]
    assert want == [ledger.account(t) for t in TENANTS[:50]]
    snapshot_s = service.snapshot()  # on the loop: what a ledger pauses for, written inline
    started = time.perf_counter()
    collect = snapshot.dumps_aside(service._ledger)  # the ledger actor's way: the loop pauses for the fork
    aside_pause = time.perf_counter() - started
    assert len(collect()) > 0
    aside_total = time.perf_counter() - started
    service.close()
    store = Store(path)
    found = store.load_snapshot()
    assert found is not None
    state_mb = len(found[2]) / 2**20
    write_ops(store, ledger, clock, tail, ops_per_day, n)  # what the log holds past the snapshot
    store.close()
    service, from_snapshot = open_service(path, clock, snapshot_every=10**12)
    assert [service._ledger.account(t) for t in TENANTS[:50]] == [ledger.account(t) for t in TENANTS[:50]]
    service.close()
    return {"ops": n, "history_made_s": round(made, 1), "full_replay_s": round(full, 2),
            "snapshot_write_s": round(snapshot_s, 2), "snapshot_mb": round(state_mb, 1),
            "snapshot_aside_pause_ms": round(aside_pause * 1000, 1), "snapshot_aside_pickled_s": round(aside_total, 2),
            "tail_ops": tail, "restart_from_snapshot_s": round(from_snapshot, 2),
            "file_mb": round(path.stat().st_size / 2**20, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--ops-per-day", type=int, default=100_000, help="steady traffic: the window's state")
    parser.add_argument("--tail", type=int, default=LedgerService.SNAPSHOT_EVERY // 2,
                        help="ops committed after the snapshot (on average half of SNAPSHOT_EVERY)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "restart.json")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            results.append(one_size(Path(tmp), n, args.ops_per_day, args.tail))
            print(f"measured {n:,} ops", flush=True)
    print(f"{'ops in the log':>15} {'full replay s':>14} {'snapshot + tail s':>18} {'snapshot MB':>12} "
          f"{'snapshot on the loop s':>23} {'aside: loop paused ms':>22} {'file MB':>8}")  # fmt: skip
    for r in results:
        print(f"{r['ops']:>15,} {r['full_replay_s']:>14} {r['restart_from_snapshot_s']:>18} {r['snapshot_mb']:>12} "
              f"{r['snapshot_write_s']:>23} {r['snapshot_aside_pause_ms']:>22} {r['file_mb']:>8}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ops_per_day": args.ops_per_day, "sizes": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

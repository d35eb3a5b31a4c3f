"""Durable hold+settle pairs per second at 1, 2 and 4 ledger shards (issue 14's scale-out figure).

Each shard is the real ledger actor (``actors.ledger.ledger_actor``: its own process and DuckDB file) on a
local Ray cluster of this benchmark's own. ``--drivers`` Ray actors each run ``--concurrency`` clients that
loop for ``--seconds``: a Hold, then a Settle with its usage row, through a :class:`LedgerClient` that routes
each tenant to its shard, every answer durable (group commits). A pair is what one billed request without a
lease costs the ledger. The figure is all pairs over the run; the 1-shard run is the baseline of the same run.

On this 2-core machine the shards, the drivers and Ray share two cores, so the 4-shard figure shows the
ceiling of the machine, not of the design; on a larger head node each shard takes a core of its own.

    .venv/bin/python -m benchmarks.bench_shards                 # 1, 2, 4 shards, 20 s each
    .venv/bin/python -m benchmarks.bench_shards --seconds 5     # quicker

Prints a table; writes ``benchmarks/results/shards.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orch.ledger import MICRO, Code, GrantCredits, Hold, Settle
from orch.usage_log import UsageRow

REPO = Path(__file__).resolve().parents[1]


class Driver:
    """Load of its own: ``concurrency`` clients doing pairs for the tenants given."""

    def __init__(self, data_dir: str, shards: int) -> None:
        from actors.ledger_client import LedgerClient

        self.client = LedgerClient(Path(data_dir), shards)

    async def run(self, tenants: list[str], concurrency: int, seconds: float, name: str) -> int:
        deadline = time.monotonic() + seconds
        done = 0

        async def one(c: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < deadline:
                tenant, hold_id = tenants[(c + i) % len(tenants)], f"{name}-{c}-{i}"
                held = await self.client.apply(tenant, Hold(hold_id, tenant, 1_000, 600))
                assert held.code is Code.OK, held
                row = UsageRow(f"r-{hold_id}", datetime.now(UTC), tenant, "k", "public", "m", 10, 5, 700, 5, 9,
                               "ok", "stop")  # fmt: skip
                settled = await self.client.apply(tenant, Settle(f"s-{hold_id}", hold_id, 700), row)
                assert settled.code is Code.OK, settled
                done += 1
                i += 1

        await asyncio.gather(*(one(c) for c in range(concurrency)))
        return done


async def setup(data_dir: Path, shards: int, tenants: int) -> list[str]:
    from actors.ledger_client import LedgerClient

    client = LedgerClient(data_dir, shards)
    made = [await client.create_tenant(f"bench-{i}", f"bench-tenant-{i}") for i in range(tenants)]
    ids = [r.tenant_id for r in made]
    for t in ids:
        assert (await client.apply(t, GrantCredits(f"g-{t}", t, 10**6 * MICRO))).code is Code.OK
    return ids


def one_run(data_dir: Path, shards: int, args: argparse.Namespace) -> dict[str, Any]:
    import ray

    tenants = asyncio.run(setup(data_dir, shards, args.tenants))
    driver = ray.remote(num_cpus=0)(Driver)
    drivers = [driver.remote(str(data_dir), shards) for _ in range(args.drivers)]
    start = time.perf_counter()
    counts = ray.get([d.run.remote(tenants, args.concurrency, args.seconds, f"d{i}") for i, d in enumerate(drivers)])
    elapsed = time.perf_counter() - start
    for d in drivers:
        ray.kill(d)
    for shard in range(shards):
        ray.kill(ray.get_actor(f"tenant-ledger-{shard}", namespace="llama-orch"))
    pairs = sum(counts)
    return {"shards": shards, "pairs": pairs, "seconds": round(elapsed, 1), "pairs_per_s": round(pairs / elapsed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--drivers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64, help="clients per driver")
    parser.add_argument("--tenants", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "shards.json")
    args = parser.parse_args(argv)
    import ray

    os.environ.setdefault("RAY_ADDRESS", "local")  # a cluster of its own, stopped at the end
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for shards in args.shards:
                results.append(one_run(Path(tmp) / f"shards-{shards}", shards, args))
                print(f"{shards} shards: {results[-1]['pairs_per_s']:,} pairs/s", flush=True)
    finally:
        ray.shutdown()
    base = results[0]["pairs_per_s"]
    print(f"{'shards':>7} {'pairs/s':>10} {'vs first':>9}")
    for r in results:
        print(f"{r['shards']:>7} {r['pairs_per_s']:>10,} {r['pairs_per_s'] / base:>8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "runs": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A Ray Tune sweep over serving settings on the running stack: each trial deploys a private tap with its
settings, drives load through it, reports what it measured, and deletes the tap.

Settings (``--grid NAME=V1,V2``, any of): the engine's ``max_num_seqs`` and ``stream_interval`` (vLLM),
Serve's ``max_ongoing_requests`` and ``target_ongoing_requests``, and ``replicas`` (min = max). Each trial
reports: completion tokens per second, TTFT p50/p99 at the client (ms), micro-credits the ledger charged
per 1M tokens served (prompt and completion), and GPU-seconds per 1M completion tokens (the tap's GPUs
times the wall time: what the settings cost to run).

    .venv/bin/python -m benchmarks.tune_serving                          # the stack `up` started here
    .venv/bin/python -m benchmarks.tune_serving --grid max_num_seqs=4,16 --grid replicas=1,2

Trials run one at a time (``--concurrent``: more, where the cluster has the GPUs), each in a Tune trial
that reserves nothing itself (the tap's replicas reserve their GPU groups). Prints a table; writes
``benchmarks/results/tune_serving.json`` and Tune's own results under ``--storage``. The notebook
``benchmarks/experiments.ipynb`` runs :func:`sweep` and plots the trade-off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadSpec, run_load
from orch.config import data_dir as default_data_dir

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("max_num_seqs", "stream_interval", "max_ongoing_requests", "target_ongoing_requests", "replicas")
DEFAULTS = {"max_num_seqs": 16, "stream_interval": 1, "max_ongoing_requests": 256, "target_ongoing_requests": 16,
            "replicas": 1}  # fmt: skip
PRICE = {"input_per_m": 1_000_000, "output_per_m": 2_000_000}


def _cli(root: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "orch.control.cli", "--data-dir", root, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def tap_args(name: str, model: str, settings: dict[str, Any], engine: dict[str, Any]) -> list[str]:
    """``llama-orch tap create`` arguments for one trial's settings.

    >>> tap_args("tune-a", "default", DEFAULTS | {"stream_interval": 4}, {"enforce_eager": True})[-8:]
    ['--set', 'stream_interval=4', '--set', 'max_ongoing_requests=256', '--set', 'target_ongoing_requests=16', \
'--engine', 'enforce_eager=true']
    """
    replicas = str(settings["replicas"])
    args = ["tap", "create", name, "--model", model, "--gpus", "1", "--billing", "credits", "--min", replicas,
            "--max", replicas, "--set", f"price={json.dumps(PRICE)}",
            "--engine", f"max_num_seqs={settings['max_num_seqs']}",
            "--set", f"stream_interval={settings['stream_interval']}",
            "--set", f"max_ongoing_requests={settings['max_ongoing_requests']}",
            "--set", f"target_ongoing_requests={settings['target_ongoing_requests']}"]  # fmt: skip
    for key, value in engine.items():
        args += ["--engine", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


def run_trial(config: dict[str, Any]) -> None:
    """One trial (a Tune function trainable): the tap up, a tenant with credit, the load, the numbers."""
    from ray import tune

    from orch.sdk import AdminClient
    from orch.tapspec import TapSpec

    settings = {k: config[k] for k in SETTINGS}
    trial = tune.get_context().get_trial_id() or f"{time.time_ns()}"
    name = "tune-" + re.sub(r"[^a-z0-9]+", "-", trial.lower()).strip("-")[-24:]
    root = config["data_dir"]
    created = _cli(root, *tap_args(name, config["model"], settings, config["engine"]))
    if created.returncode != 0:
        raise RuntimeError(f"tap create {name} failed: {created.stderr[-2000:]}")
    try:
        with AdminClient(config["base_url"], config["admin_key"]) as admin:
            tenant = admin.create_tenant(name)["tenant_id"]
            admin.grant(tenant, 1_000_000_000, idempotency_key=f"{tenant}-tune")
            key = admin.create_key(tenant, tap=f"private-{name}")["key"]
            model = TapSpec(client=name, model=config["model"], gpus=1).model_name()
            spec = LoadSpec(base_url=f"{config['base_url']}/private/{name}/v1", model=model, api_key=key,
                            clients=config["clients"], requests_per_client=config["requests"],
                            max_tokens=config["max_tokens"], warmup_requests=2, warmup_max_tokens=4)  # fmt: skip
            summary = asyncio.run(run_load(spec)).summary()
            account, totals = _settled(admin, tenant), admin.usage(tenant)["totals"]
        tokens = totals["prompt_tokens"] + totals["completion_tokens"]
        metrics = {
            "throughput_tok_s": summary["throughput_tok_s"],
            "ttft_p50_ms": summary["ttft_ms"]["p50"],
            "ttft_p99_ms": summary["ttft_ms"]["p99"],
            "micro_credits_per_m_tokens": round(account["spent_micro_credits"] / tokens * 1e6) if tokens else None,
            "gpu_s_per_m_tokens": round(settings["replicas"] * summary["wall_s"] / summary["completion_tokens"] * 1e6)
            if summary["completion_tokens"]
            else None,
            "errors": summary["errors"],
            "requests": summary["requests"],
        }
    finally:
        _cli(root, "tap", "delete", name, timeout=600)
    tune.report(metrics)


def _settled(admin: Any, tenant: str, timeout_s: float = 60) -> dict[str, Any]:
    """The tenant's account once no hold is open (settles follow the responses)."""
    deadline = time.monotonic() + timeout_s
    while True:
        account: dict[str, Any] = admin.account(tenant)
        if account["held_micro_credits"] == 0 or time.monotonic() > deadline:
            return account
        time.sleep(0.2)


def sweep(
    grid: dict[str, list[Any]],
    *,
    data_dir: str | Path | None = None,
    model: str = "default",
    engine: dict[str, Any] | None = None,
    clients: int = 8,
    requests: int = 4,
    max_tokens: int = 32,
    concurrent: int = 1,
    storage: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Runs the grid (every combination of ``grid``'s values; unnamed settings at :data:`DEFAULTS`) as
    Tune trials on the stack that ``up`` started in ``data_dir``; returns a row per trial: its settings
    and its metrics. Connects to that stack's Ray cluster unless this process already is."""
    import ray
    from ray import tune

    from orch.control.cli_admin import admin_key
    from orch.control.cluster import connect, read_state, read_up

    unknown = set(grid) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; sweepable: {', '.join(SETTINGS)}")
    root = Path(data_dir) if data_dir is not None else default_data_dir(None)
    record = read_up(root)
    if record is None:
        raise RuntimeError(f"no stack is up with data dir {root}: run `llama-orch up` first")
    if not ray.is_initialized():
        state = read_state(root)
        connect(state.gcs_address if state else None, state)
    space: dict[str, Any] = {k: tune.grid_search(list(grid[k])) if k in grid else DEFAULTS[k] for k in SETTINGS}
    space |= {"data_dir": str(root), "base_url": record["base_url"], "admin_key": admin_key(root), "model": model,
              "engine": engine or {}, "clients": clients, "requests": requests, "max_tokens": max_tokens}  # fmt: skip
    storage_path = Path(storage) if storage is not None else Path(tempfile.mkdtemp(prefix="tune-serving-"))
    tuner = tune.Tuner(
        # The tap's replicas reserve the CPUs and GPUs; Tune refuses an empty request, so one byte of memory.
        tune.with_resources(run_trial, {"cpu": 0, "memory": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(storage_path=str(storage_path.resolve()), name="tune_serving", verbose=0),
    )
    results = tuner.fit()
    rows = []
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"trial {result.config and {k: result.config[k] for k in SETTINGS}} failed") from (
                result.error
            )
        rows.append({k: result.config[k] for k in SETTINGS} | {k: result.metrics[k] for k in METRICS})
    return rows


METRICS = ("throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms", "micro_credits_per_m_tokens", "gpu_s_per_m_tokens",
           "errors")  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    columns = [*SETTINGS, *METRICS]
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(str(row[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def _grid(values: list[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in values:
        name, _, raw = item.partition("=")
        grid[name] = [float(v) if "." in v else int(v) for v in raw.split(",")]
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                        help=f"a setting's values (repeatable); settings: {', '.join(SETTINGS)}")  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="the stack's data dir (default: ./.orch)")
    parser.add_argument("--model", default="default", help="what each trial's tap serves (HF id, folder, default)")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE", help="more engine settings")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrent", type=int, default=1, help="trials at once")
    parser.add_argument("--storage", default=None, help="Tune's results folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tune_serving.json")
    args = parser.parse_args(argv)
    grid = _grid(args.grid) if args.grid else {"max_num_seqs": [4, 16]}
    engine = dict(e.split("=", 1) for e in args.engine)
    rows = sweep(grid, data_dir=args.data_dir, model=args.model, engine=engine, clients=args.clients,
                 requests=args.requests, max_tokens=args.max_tokens, concurrent=args.concurrent,
                 storage=args.storage)  # fmt: skip
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"grid": grid, "trials": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

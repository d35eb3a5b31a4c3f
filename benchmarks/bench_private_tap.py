"""Private tap elasticity: scale-up time under load and scale-to-zero cold start, with warm requests
measured in the same run as the baseline.

    .venv/bin/python -m benchmarks.bench_private_tap                  # default model, ~10 min here
    .venv/bin/python -m benchmarks.bench_private_tap --model tiny     # tiny random Llama: engine start only

Starts its own stack (``llama-orch up --num-gpus 8`` on a copy of configs/local.yaml with a free port
and its own data dir), creates 1-GPU taps with ``tap create`` and measures:

- scale-up: 6 concurrent clients on a tap with min 1, max 3 and fast autoscaling knobs; seconds from
  the start of the load until a 2nd, then a 3rd replica is RUNNING;
- cold start: a tap with min 0 (scaled to zero); seconds until the first request is answered, against
  the same request once warm.

Prints a table and writes JSON (default ``benchmarks/results/private_tap.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.servers import free_port

REPO = Path(__file__).resolve().parent.parent
ENGINE = ["--engine=max_model_len=512", "--engine=max_num_seqs=8", "--engine=kv_cache_memory_bytes=67108864",
          "--engine=env={VLLM_HOST_IP: 127.0.0.1, VLLM_CPU_KVCACHE_SPACE: '1'}"]  # fmt: skip
FAST = ["--set=upscale_delay_s=0", "--set=downscale_delay_s=5", "--set=target_ongoing_requests=1",
        "--set=metrics_interval_s=0.5", "--set=look_back_period_s=2"]  # fmt: skip


def orch(data: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "orch.control.cli", "--data-dir", str(data), *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr[-2000:]}")
    return done


def replicas(data: Path, app: str) -> int:
    """RUNNING replicas of the app's model deployment, through this process's one driver (a CLI
    process per poll costs seconds of CPU on a small machine and skews what is measured)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    model = next(d for name, d in status.deployments.items() if name.startswith("model-"))
    return int(model.replica_states.get("RUNNING", 0))  # type: ignore[call-overload]  # str-valued enum keys


def connect(data: Path) -> None:
    import ray

    from orch.control.cluster import read_state, use_cluster

    state = read_state(data)
    assert state is not None
    use_cluster(state)
    ray.init(address=state.gcs_address, namespace="serve", log_to_driver=False, logging_level=30)


def create(data: Path, client: str, model: str, *extra: str) -> str:
    out = orch(data, "tap", "create", client, "--model", model, "--gpus", "1", *ENGINE, *extra).stdout
    return re.findall(r"^\s+(sk-orch-\S+)$", out, re.M)[0]


def ask(base: str, key: str, model: str, max_tokens: int = 8) -> float:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}
    t0 = time.monotonic()
    reply = httpx.post(base + "/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=900)
    reply.raise_for_status()
    return time.monotonic() - t0


def scale_up(data: Path, base: str, key: str, model: str, app: str) -> dict[str, Any]:
    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=900) as client:

            async def worker() -> None:
                body = {"model": model, "prompt": "a", "max_tokens": 128, "ignore_eos": True}
                while not stop.is_set():
                    await client.post(base + "/completions", json=body, headers={"Authorization": f"Bearer {key}"})

            await asyncio.gather(*(worker() for _ in range(6)))

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        t0, reached = time.monotonic(), dict[int, float]()
        while len(reached) < 2 and time.monotonic() - t0 < 900:
            n = await asyncio.to_thread(replicas, data, app)
            for target in (2, 3):
                if n >= target and target not in reached:
                    reached[target] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(1)
        stop.set()
        await task
        return {"to_2_replicas_s": reached.get(2), "to_3_replicas_s": reached.get(3)}

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("default", "tiny"), default="default", help="the taps' model")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/private_tap.json")
    args = parser.parse_args(argv)

    from orch.models import DEFAULT_MODEL_NAME, build_tiny_llama, materialise_default_model

    model_dir = materialise_default_model()
    source, name = str(model_dir), DEFAULT_MODEL_NAME
    if args.model == "tiny":
        tiny = build_tiny_llama(model_dir.parent.parent / "tiny-llama", data_dir=model_dir.parent.parent)
        source, name = str(tiny), "tiny-llama"
    data = Path(tempfile.mkdtemp(prefix="orch-bench-tap-"))
    config = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    config["http_options"]["port"] = port = free_port()
    config["applications"][0]["args"]["models"][0]["source"] = str(model_dir)
    (data / "config.yaml").write_text(yaml.safe_dump(config))
    started = datetime.now(UTC)
    result: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "model": name}
    try:
        orch(data, "up", "--config", str(data / "config.yaml"), "--num-gpus", "8")
        connect(data)
        base = f"http://127.0.0.1:{port}/private/%s/v1"
        t0 = time.monotonic()
        key = create(data, "elastic", source, "--min", "1", "--max", "3", *FAST)
        result["create_s"] = round(time.monotonic() - t0, 1)
        result["warm_request_s"] = round(min(ask(base % "elastic", key, name) for _ in range(3)), 3)
        print(f"tap create (1 replica, engine start included): {result['create_s']} s", flush=True)
        result["scale_up"] = scale_up(data, base % "elastic", key, name, "private-elastic")
        print(f"scale-up under load: {result['scale_up']}", flush=True)
        orch(data, "tap", "delete", "elastic")
        key = create(data, "cold", source, "--min", "0", "--max", "1", *FAST)
        assert replicas(data, "private-cold") == 0
        result["cold_start_s"] = round(ask(base % "cold", key, name), 1)
        result["warm_after_cold_s"] = round(min(ask(base % "cold", key, name) for _ in range(3)), 3)
    finally:
        import ray

        ray.shutdown()  # a driver whose cluster goes away exits its process: leave first
        orch(data, "down", timeout=300)
    result["duration_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    rows = [
        ("warm request (8 tokens), baseline", f"{result['warm_request_s']:.3f} s"),
        ("tap create -> RUNNING (1 replica)", f"{result['create_s']} s"),
        ("load start -> 2 replicas RUNNING", f"{result['scale_up']['to_2_replicas_s']} s"),
        ("load start -> 3 replicas RUNNING", f"{result['scale_up']['to_3_replicas_s']} s"),
        ("cold start: first request at 0 replicas", f"{result['cold_start_s']} s"),
        ("same request warm after it", f"{result['warm_after_cold_s']:.3f} s"),
    ]
    table = "\n".join(f"{label:<42} {value:>10}" for label, value in rows)
    print(f"\nprivate tap on {name}, 1-GPU groups (fake GPUs, CPU engine):\n{table}")
    result["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

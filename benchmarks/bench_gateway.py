"""Gateway vs bare vLLM: the same model, engine settings and streaming load, one server at a time.

    .venv/bin/python -m benchmarks.bench_gateway                       # 32 clients x 3 requests x 64 tokens, ~25 min
    .venv/bin/python -m benchmarks.bench_gateway --requests-per-client 2 --max-tokens 32   # quicker

Phase 1 starts vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with the
engine settings of the first model in ``--config``; phase 2 Ray Serve LLM's ``build_openai_app`` with the
same folder and engine arguments (``benchmarks/serve_llm_server.py``); phases 3 to 5 start llama-orch as
users do (``python -m orch.control.cli up`` on a copy of the config with a free port and its own data dir, then
``down``) three ways: ``billing: contract`` (usage rows only, no credit check), credits with a hold and a
settle per request (``credit_leases: false``), and credits on leases (the default); the last phase runs
bare vLLM again, so the table shows how much the machine drifted during the run. Each phase waits for
``/v1/models``, warms up, probes one client (``--single-requests`` requests of ``--max-tokens``), measures
the load, and records which vLLM threads did the work. Prints a table, the ratios against the goals of
issue 9 and writes JSON (default ``benchmarks/results/gateway.json``; server logs go next to it, under
``logs/``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psutil
import yaml

from benchmarks import procprobe
from benchmarks.loadgen import LoadSpec, measure, warm_up
from orch.config import EngineConfig, ModelConfig
from orch.serve_config import load_serve_config

REPO = Path(__file__).resolve().parent.parent
BARE, GATEWAY, NO_HOLD = "bare vLLM", "llama-orch gateway", "gateway, no hold"
HOLDS = "gateway, hold per request"
SERVE_LLM, BARE_LAST = "Ray Serve LLM", "bare vLLM (again, last)"
# The same stack three ways: credits on leases (the default), credits with a hold and a settle per request
# (the path before leases), and contract billing (usage rows only, no credit check).
TAP_ARGS: dict[str, dict[str, Any]] = {
    GATEWAY: {"billing": "credits", "credit_leases": True},
    HOLDS: {"billing": "credits", "credit_leases": False},
    NO_HOLD: {"billing": "contract"},
}
TAP_LOG = {GATEWAY: "credits", HOLDS: "holds", NO_HOLD: "contract"}
GOALS = {  # issue 9's, for the tap with credit billing (the default config)
    "throughput_ratio": (">=", 0.95),
    "single_stream_throughput_ratio": (">=", 0.95),
    "added_single_stream_ttft_p50_ms": ("<=", 3.0),
    "added_single_stream_ttft_p99_ms": ("<=", 10.0),
    "throughput_ratio_vs_serve_llm": (">=", 1.15),
    "serving_cpu_ms_per_token": ("<=", 0.5),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_model(config_path: Path) -> ModelConfig:
    """The first model of the config's first llama-orch app: the one both servers serve."""
    config = load_serve_config(config_path)
    app = next(a for a in config["applications"] if str(a.get("import_path", "")).startswith("apps."))
    return ModelConfig.model_validate(app["args"]["models"][0])


def with_dtype(model: ModelConfig, choice: str) -> ModelConfig:
    """The model with the engine dtype both servers will use (see ``--dtype``)."""
    dtype = model.engine.dtype
    if choice == "cpu-default" and dtype == "auto":
        from orch.models import default_engine_dtype

        dtype = default_engine_dtype()
    elif choice not in ("cpu-default", "config"):
        dtype = choice
    return model.model_copy(update={"engine": model.engine.model_copy(update={"dtype": dtype})})


def bare_vllm_command(
    model_dir: Path, name: str, port: int, engine: EngineConfig, stream_interval: int | None
) -> list[str]:
    """vLLM's OpenAI server with the same engine arguments llama-orch's ``VLLMEngine`` passes."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    for key, value in engine.engine_kwargs().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            cmd += [flag, str(value)]
    if stream_interval is not None:
        cmd += ["--stream-interval", str(stream_interval)]
    return cmd


def wait_ready(base_url: str, timeout_s: float, alive: Any = None, api_key: str | None = None) -> float:
    """Polls ``GET /v1/models`` until it answers 200; returns seconds waited."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if alive is not None and not alive():
            raise RuntimeError("server exited before it was ready")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(
                urllib.request.Request(base_url + "/models", headers=headers), timeout=5
            ) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/models did not answer within {timeout_s:.0f} s")


def stop_group(pgid: int, timeout_s: float = 30) -> None:
    """SIGTERM to a process group we started, then SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def measure_phase(
    label: str, base_url: str, root_pid: int, spec: LoadSpec, logs: list[Path], single_requests: int
) -> dict[str, Any]:
    """Warm-up, a one-client TTFT probe, then the measured load with CPU/thread snapshots around it."""
    print(f"[{label}] warming up ({spec.warmup_requests} requests) ...", flush=True)
    warmup_errors = asyncio.run(warm_up(spec))
    # Under 32 lock-step streams TTFT is the batch prefill (seconds); one stream shows the per-hop cost.
    single_spec = replace(spec, clients=1, requests_per_client=single_requests, warmup_requests=1)
    single = asyncio.run(measure(single_spec)).summary() if single_requests > 0 else None
    load_before = os.getloadavg()
    before = procprobe.snapshot(root_pid)
    print(
        f"[{label}] measuring {spec.clients} clients x {spec.requests_per_client} x {spec.max_tokens} tokens ...",
        flush=True,
    )
    report = asyncio.run(measure(spec))
    after = procprobe.snapshot(root_pid)
    report.warmup_errors = warmup_errors
    summary = report.summary()
    print(
        f"[{label}] {summary['throughput_tok_s']} tok/s, TTFT p50 {summary['ttft_ms']['p50']} ms, "
        f"errors {summary['errors']}",
        flush=True,
    )
    cpu = procprobe.phase_cpu(before, after, report.wall_s)
    engine = procprobe.engine_threads(before, after, report.wall_s)
    serving_cpu_s = cpu["ours_cpu_s"] - sum(float(e["cpu_s"]) for e in engine)
    return {
        "summary": summary,
        "single_stream": single,
        "serving_cpu_ms_per_token": round(serving_cpu_s * 1000 / max(1, summary["completion_tokens"]), 3),
        # CPU other sessions used during the measurement: above ~0.1 core the phase is noisy.
        "others_cores": round(cpu["others_cpu_s"] / report.wall_s, 2),
        "requests": [asdict(r) for r in report.results],
        "warmup_errors": warmup_errors[:5],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu": cpu,
        "engine_threads": engine,
        "binding_log": procprobe.binding_log_lines(logs),
    }


@dataclass(frozen=True)
class Run:
    """What every phase of one run shares: the load, the 1-stream probe, where logs go, the start limit."""

    spec_args: dict[str, Any]
    single_requests: int
    log_dir: Path
    timeout_s: float


def run_bare(label: str, model: ModelConfig, model_dir: Path, run: Run) -> dict[str, Any]:
    """vLLM's own OpenAI server (``label``: first, or again last to show the drift of the run)."""
    port = free_port()
    cmd = bare_vllm_command(model_dir, model.name, port, model.engine, model.stream_interval)
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1", **model.engine.env}
    log_name = "bare-vllm-last.log" if label == BARE_LAST else "bare-vllm.log"
    return run_server(label, cmd, env, port, model, run, log_name)


def run_serve_llm(model: ModelConfig, model_dir: Path, run: Run) -> dict[str, Any]:
    """Ray Serve LLM's ``build_openai_app`` on a head of its own, same folder and engine arguments."""
    port = free_port()
    engine_env = {"VLLM_HOST_IP": "127.0.0.1", **model.engine.env}
    engine = json.dumps(model.engine.engine_kwargs())
    cmd = [sys.executable, "-m", "benchmarks.serve_llm_server", "--model-dir", str(model_dir), "--name", model.name,
           "--port", str(port), "--engine", engine, "--env", json.dumps(engine_env)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return run_server(SERVE_LLM, cmd, env, port, model, run, "serve-llm.log")


def run_server(
    label: str, cmd: list[str], env: dict[str, str], port: int, model: ModelConfig, run: Run, log_name: str
) -> dict[str, Any]:
    """Starts one server in its own process group, measures it, stops the group."""
    log_path = run.log_dir / log_name
    base_url = f"http://127.0.0.1:{port}/v1"
    print(f"[{label}] starting: {' '.join(cmd[1:])}", flush=True)
    with open(log_path, "wb") as log:
        proc = spawn(cmd, log, env)
    result: dict[str, Any] = {"command": cmd, "log": str(log_path)}
    try:
        result["startup_s"] = round(wait_ready(base_url, run.timeout_s, alive=lambda: proc.poll() is None), 1)
        spec = LoadSpec(base_url=base_url, model=model.name, **run.spec_args)
        result.update(measure_phase(label, base_url, proc.pid, spec, [log_path], run.single_requests))
    except (RuntimeError, TimeoutError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_group(proc.pid, timeout_s=60)
        proc.wait(timeout=10)
    return result


def spawn(cmd: list[str], log: IO[bytes], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Starts a server in its own process group (stopped by group, never `ray stop`), output to ``log``."""
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=REPO
    )


def gateway_config(
    config_path: Path, port: int, model: ModelConfig, model_dir: Path, out: Path, tap_args: dict[str, Any]
) -> Path:
    """A copy of the user's config on a free port; the benchmarked model uses the bare server's folder and dtype."""
    config = yaml.safe_load(config_path.read_text())
    config.setdefault("http_options", {})["port"] = port
    for app in config["applications"]:
        if str(app.get("import_path", "")).startswith("apps."):
            app["args"].update(tap_args)
        for entry in (app.get("args") or {}).get("models", []):
            if entry.get("name") == model.name:
                entry["source"] = str(model_dir)  # same weights as the bare server, no second conversion
                entry.setdefault("engine", {})["dtype"] = model.engine.dtype
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def orch_cli(data_dir: Path, *args: str, log_path: Path, timeout_s: float) -> int:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always our own head
    cmd = [sys.executable, "-m", "orch.control.cli", "--data-dir", str(data_dir), *args]
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = spawn(cmd, log, env)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc.pid)
            return -1


def run_gateway(label: str, model: ModelConfig, model_dir: Path, config_path: Path, run: Run) -> dict[str, Any]:
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    config = gateway_config(config_path, port, model, model_dir, data_dir / "config.yaml", TAP_ARGS[label])
    log_path = run.log_dir / f"gateway-cli-{TAP_LOG[label]}.log"
    log_path.unlink(missing_ok=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    result: dict[str, Any] = {"data_dir": str(data_dir), "config": config.read_text(), "log": str(log_path)}
    head_pid: int | None = None
    print(f"[{label}] llama-orch up --config {config} (data dir {data_dir}) ...", flush=True)
    try:
        start = time.monotonic()
        rc = orch_cli(
            data_dir,
            "up",
            "--config",
            str(config),
            "--timeout",
            str(run.timeout_s),
            log_path=log_path,
            timeout_s=run.timeout_s + 60,
        )
        with contextlib.suppress(OSError, ValueError, KeyError):
            head_pid = int(json.loads((data_dir / "cluster.json").read_text())["pid"])
        if rc != 0:
            raise RuntimeError(f"llama-orch up exited {rc}; see {log_path}")
        if head_pid is None:
            raise RuntimeError(f"llama-orch up wrote no {data_dir / 'cluster.json'} (did it reuse a cluster?)")
        key = (data_dir / "demo_key").read_text().strip()
        wait_ready(base_url, 30, api_key=key)
        result["startup_s"] = round(time.monotonic() - start, 1)
        spec = LoadSpec(base_url=base_url, model=model.name, api_key=key, **run.spec_args)
        logs = procprobe.session_log_files(head_pid)
        result.update(measure_phase(label, base_url, head_pid, spec, logs, run.single_requests))
    except (RuntimeError, TimeoutError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        rc = orch_cli(data_dir, "down", log_path=log_path, timeout_s=120)
        if head_pid is not None and psutil.pid_exists(head_pid):
            stop_group(head_pid)  # `down` failed; the head daemon leads its own process group
        result["down_rc"] = rc
        if rc == 0 and "error" not in result:
            shutil.rmtree(data_dir, ignore_errors=True)  # keep it only to debug a failed phase
    return result


def machine_info() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in ("vllm-cpu", "vllm", "ray", "torch", "aiohttp", "llama-orch")},
        "caller_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND") if k in os.environ},
    }


def _value(phase: dict[str, Any], *path: str) -> Any:
    value: Any = phase
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _cell(phase: dict[str, Any], *path: str) -> str:
    value = _value(phase, *path)
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tok/s", ("summary", "throughput_tok_s")),
    ("TTFT p50 ms", ("summary", "ttft_ms", "p50")),
    ("TTFT p99 ms", ("summary", "ttft_ms", "p99")),
    ("lat p50 ms", ("summary", "latency_ms", "p50")),
    ("lat p99 ms", ("summary", "latency_ms", "p99")),
    ("errors", ("summary", "errors")),
    ("requests", ("summary", "requests")),
    ("1-stream TTFT p50 ms", ("single_stream", "ttft_ms", "p50")),
    ("overhead p50 ms", ("summary", "overhead_ms", "p50")),  # the tap's own x-orch-overhead-ms header
    ("1-stream overhead p50 ms", ("single_stream", "overhead_ms", "p50")),
    ("serving CPU ms/tok", ("serving_cpu_ms_per_token",)),
    ("others' cores", ("others_cores",)),
)


def table(phases: dict[str, dict[str, Any]]) -> str:
    """The comparison table.

    "serving CPU" is CPU spent outside vLLM's engine processes per output token; "others' cores" is the
    CPU other processes on the machine used meanwhile (noise: other vLLM engines also bind to core 0).
    """
    rows = [["server", *(name for name, _ in COLUMNS)]]
    for label, phase in phases.items():
        if "summary" not in phase:
            rows.append([label, "failed: " + str(phase.get("error", "?"))[:80]])
            continue
        rows.append([label, *(_cell(phase, *path) for _, path in COLUMNS)])
    widths = [max(len(r[i]) for r in rows if len(r) > i and len(rows[0]) == len(r)) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
        for r in rows
    ]
    return "\n".join(lines)


def comparison(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    bare, gw, no_hold = phases.get(BARE, {}), phases.get(GATEWAY, {}), phases.get(NO_HOLD, {})

    def diff(*path: str, base: dict[str, Any] = bare) -> float | None:
        a, b = _value(base, *path), _value(gw, *path)
        return None if a is None or b is None else round(float(b) - float(a), 1)

    tput_bare, tput_gw = _value(bare, "summary", "throughput_tok_s"), _value(gw, "summary", "throughput_tok_s")
    return {
        "throughput_ratio": round(tput_gw / tput_bare, 3) if tput_bare and tput_gw is not None else None,
        "single_stream_throughput_ratio": _ratio(gw, bare, "single_stream"),
        "added_ttft_p50_ms": diff("summary", "ttft_ms", "p50"),
        "added_latency_p50_ms": diff("summary", "latency_ms", "p50"),
        "added_single_stream_ttft_p50_ms": diff("single_stream", "ttft_ms", "p50"),
        "added_single_stream_ttft_p99_ms": diff("single_stream", "ttft_ms", "p99"),
        "serving_cpu_ms_per_token": _value(gw, "serving_cpu_ms_per_token"),
        "leases_vs_holds_throughput_ratio": _ratio(gw, phases.get(HOLDS, {})),
        "holds_added_single_stream_ttft_p50_ms": diff("single_stream", "ttft_ms", "p50", base=phases.get(HOLDS, {})),
        "hold_added_single_stream_ttft_p50_ms": diff("single_stream", "ttft_ms", "p50", base=no_hold),
        "hold_added_ttft_p50_ms": diff("summary", "ttft_ms", "p50", base=no_hold),
        "throughput_ratio_vs_serve_llm": _ratio(gw, phases.get(SERVE_LLM, {})),
        "serve_llm_throughput_ratio": _ratio(phases.get(SERVE_LLM, {}), bare),
        "bare_drift_ratio": _ratio(phases.get(BARE_LAST, {}), bare),  # the same server, last vs first
    }


def _ratio(a: dict[str, Any], b: dict[str, Any], part: str = "summary") -> float | None:
    x, y = _value(a, part, "throughput_tok_s"), _value(b, part, "throughput_tok_s")
    return round(float(x) / float(y), 3) if x is not None and y else None


def goals(ratio: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Each goal of GOALS with the measured value and whether it is met (None: not measured)."""
    out = {}
    for name, (op, bound) in GOALS.items():
        value = ratio.get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"goal": f"{op} {bound}", "value": value, "met": met}
    return out


def thread_lines(phases: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for label, phase in phases.items():
        for proc in phase.get("engine_threads", []):
            busy = ", ".join(f"{b['cpu_s']}s on cpus {b['cpus_allowed']}" for b in proc["busy_threads"]) or "none"
            lines.append(
                f"{label}: {proc['title'][:40]} pid {proc['pid']}: {proc['threads']} threads, "
                f"env {proc['env']}, busy threads: {busy}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--requests-per-client", type=int, default=3, help="requests each client sends in turn")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (ignore_eos: exactly this)")
    parser.add_argument("--single-requests", type=int, default=8, help="one-client TTFT probe requests (0: skip)")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--config", type=Path, default=REPO / "configs/local.yaml", help="llama-orch config to serve")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gateway.json")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds each server may take to start")
    parser.add_argument(
        "--dtype",
        default="cpu-default",
        help="engine dtype for both servers: 'cpu-default' (the config's, but 'auto' becomes what "
        "orch.models.default_engine_dtype() picks: float32 on CPUs without AVX512-BF16), 'config', or a dtype",
    )
    parser.add_argument(
        "--only", choices=("bare", "serve-llm", "gateway", "holds", "no-hold"), help="run one phase (debugging)"
    )
    args = parser.parse_args(argv)

    from orch.models import materialise_default_model

    model = with_dtype(first_model(args.config), args.dtype)
    model_dir = materialise_default_model() if model.source in ("default", model.name) else Path(model.source)
    spec_args: dict[str, Any] = {
        "clients": args.clients,
        "requests_per_client": args.requests_per_client,
        "max_tokens": args.max_tokens,
        "endpoint": args.endpoint,
        "warmup_requests": args.clients,
    }
    log_dir = args.out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    phases: dict[str, dict[str, Any]] = {}
    run = Run(spec_args, args.single_requests, log_dir, args.startup_timeout)
    if args.only in (None, "bare"):
        phases[BARE] = run_bare(BARE, model, model_dir, run)
    if args.only in (None, "serve-llm"):
        phases[SERVE_LLM] = run_serve_llm(model, model_dir, run)
    for label, only in ((NO_HOLD, "no-hold"), (HOLDS, "holds"), (GATEWAY, "gateway")):
        if args.only in (None, only):
            phases[label] = run_gateway(label, model, model_dir, args.config, run)
    if args.only is None:
        phases[BARE_LAST] = run_bare(BARE_LAST, model, model_dir, run)

    ratio = comparison(phases)
    print()
    print(table(phases))
    print(
        f"throughput gateway/bare: {ratio['throughput_ratio']}   added TTFT p50: {ratio['added_ttft_p50_ms']} ms   "
        f"added latency p50: {ratio['added_latency_p50_ms']} ms   "
        f"added 1-stream TTFT p50: {ratio['added_single_stream_ttft_p50_ms']} ms   "
        f"of which the hold (credits vs no hold): {ratio['hold_added_single_stream_ttft_p50_ms']} ms"
    )
    print(
        f"gateway/Ray Serve LLM: {ratio['throughput_ratio_vs_serve_llm']}   Ray Serve LLM/bare: "
        f"{ratio['serve_llm_throughput_ratio']}   bare last/first (drift): {ratio['bare_drift_ratio']}"
    )
    met = goals(ratio)
    for name, goal in met.items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
        print(f"goal {name} {goal['goal']}: {goal['value']} -> {verdict}")
    for line in thread_lines(phases):
        print(line)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        "settings": {
            **spec_args,
            "single_stream_requests": args.single_requests,
            "single_stream_max_tokens": args.max_tokens,
            "model": model.name,
            "model_dir": str(model_dir),
            "config": str(args.config),
            "engine": model.engine.engine_kwargs(),
            "dtype_choice": args.dtype,
            "stream_interval": model.stream_interval,
            "temperature": 0.0,
            "ignore_eos": True,
        },
        "machine": machine_info(),
        "comparison": ratio,
        "goals": met,
        "table": table(phases),
        "phases": phases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if all("summary" in p for p in phases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

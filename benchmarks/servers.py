"""The servers bench_gateway compares, each started, probed, measured and stopped the same way: bare vLLM's
OpenAI server, Ray Serve LLM, and llama-orch as users start it (``up``/``down`` on a config copy)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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
from pathlib import Path
from typing import IO, Any

import psutil
import yaml

from benchmarks import procprobe
from benchmarks.loadgen import LoadSpec, measure, warm_up
from orch.config import EngineConfig, ModelConfig
from orch.serve_config import is_tap, load_serve_config

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_model(config_path: Path) -> ModelConfig:
    """The first model of the config's first llama-orch app: the one both servers serve."""
    config = load_serve_config(config_path)
    app = next(a for a in config["applications"] if is_tap(a))
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
    return run_server(label, cmd, env, port, model, run, f"{label.replace(' ', '-').replace(',', '')}.log")


def run_serve_llm(model: ModelConfig, model_dir: Path, run: Run) -> dict[str, Any]:
    """Ray Serve LLM's ``build_openai_app`` on a head of its own, same folder and engine arguments."""
    port = free_port()
    engine_env = {"VLLM_HOST_IP": "127.0.0.1", **model.engine.env}
    engine = json.dumps(model.engine.engine_kwargs())
    cmd = [sys.executable, "-m", "benchmarks.serve_llm_server", "--model-dir", str(model_dir), "--name", model.name,
           "--port", str(port), "--engine", engine, "--env", json.dumps(engine_env)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return run_server("Ray Serve LLM", cmd, env, port, model, run, "serve-llm.log")


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
        if is_tap(app):
            for key, value in tap_args.items():  # a nested setting (gateway.colocate) keeps its siblings
                merged = app["args"].get(key)
                app["args"][key] = merged | value if isinstance(value, dict) and isinstance(merged, dict) else value
        for entry in (app.get("args") or {}).get("models", []):
            if entry.get("name") == model.name:
                entry["source"] = str(model_dir)  # same weights as the bare server, no second conversion
                entry.setdefault("engine", {})["dtype"] = model.engine.dtype
                if model.stream_interval is not None:
                    entry["stream_interval"] = model.stream_interval
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def orch_cli(
    data_dir: Path, *args: str, log_path: Path, timeout_s: float, extra_env: dict[str, str] | None = None
) -> int:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (extra_env or {})  # always our own head
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


def run_gateway(
    label: str,
    tap_args: dict[str, Any],
    model: ModelConfig,
    model_dir: Path,
    config_path: Path,
    run: Run,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """llama-orch as users start it, on a copy of ``config_path`` with ``tap_args`` set on its taps; ``env``
    goes to `up`, so the Ray head it starts (and every Serve process) has it."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    config = gateway_config(config_path, port, model, model_dir, data_dir / "config.yaml", tap_args)
    log_path = run.log_dir / f"gateway-cli-{label.replace(' ', '-').replace(',', '')}.log"
    log_path.unlink(missing_ok=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    result: dict[str, Any] = {
        "data_dir": str(data_dir), "config": config.read_text(), "log": str(log_path), "env": env or {}
    }  # fmt: skip
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
            extra_env=env,
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

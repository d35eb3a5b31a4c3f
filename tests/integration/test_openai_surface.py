"""More of the OpenAI surface on the session's stack, through the official ``openai`` client unmodified:
structured output (``response_format``) and logprobs, streamed and not, on the default model."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.integration.conftest import MODEL, Stack

pytestmark = pytest.mark.integration

PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Name a large city, its country and its population, as JSON."}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0, timeout=300)


def test_json_schema_answers_validate_greedy_and_sampled(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE, "strict": True}}
    answers = []
    for i in range(10):
        sampling = {"temperature": 0.0} if i < 5 else {"temperature": 1.0, "seed": i}
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=80,
            response_format=fmt,
            **sampling,  # type: ignore[arg-type]
        )
        answers.append(reply.choices[0].message.content or "")
    for answer in answers:
        jsonschema.validate(json.loads(answer), PLACE)  # raises on any answer that does not validate
    assert len(set(answers[5:])) > 1  # sampled answers differ: the schema constrains, it does not fix the text


def test_json_object_streams_a_json_object(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=80, temperature=0, response_format={"type": "json_object"}, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict), text


def test_top_logprobs_are_five_sorted_and_hold_the_chosen_token(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens == 12  # type: ignore[union-attr]
    for entry in content:
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
        assert entry.logprob <= 0 and entry.token in [t.token for t in entry.top_logprobs]
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    assert "".join(e.token for e in content) == reply.choices[0].message.content

    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content or []]  # fmt: skip
    assert [e.token for e in streamed] == [e.token for e in content]  # the same greedy tokens, chunk by chunk
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_completions_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                      temperature=0, logprobs=3)  # fmt: skip
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 6
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    # Three per token (fewer only where two tokens decode to the same text: the legacy shape is a dict).
    assert lp.top_logprobs and all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))  # greedy: chosen is top


def test_user_and_request_id_are_recorded_and_usage_groups_by_user(stack: Stack) -> None:
    import httpx

    from tests.integration.test_tap_billing import account, new_tenant

    tenant, key = new_tenant(stack, 10_000_000)
    tenant_client = openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0, timeout=300)
    for user in ("alice", "alice", "bob", None):
        extra = {"user": user} if user else {}
        tenant_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **extra)  # type: ignore[arg-type]
    mine = tenant_client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=2, user="carol", extra_headers={"X-Request-Id": "my-trace-42"}
    )
    assert mine.headers["x-request-id"] == "my-trace-42"  # echoed
    account(stack, tenant)  # waits until every usage row is committed
    headers = {"Authorization": f"Bearer {key}"}
    rows = httpx.get(stack.v1 + "/usage", headers=headers, timeout=60).json()["data"]
    assert [r["end_user"] for r in rows] == ["alice", "alice", "bob", None, "carol"]
    assert rows[-1]["http_request_id"] == "my-trace-42" and all(
        r["http_request_id"] for r in rows
    )  # Serve made the rest
    groups = httpx.get(stack.v1 + "/usage", params={"group_by": "user"}, headers=headers, timeout=60).json()
    by_user = {g["key"]: (g["requests"], g["cost_micro"]) for g in groups["data"]}
    assert {k: n for k, (n, _) in by_user.items()} == {"": 1, "alice": 2, "bob": 1, "carol": 1}
    assert sum(c for _, c in by_user.values()) == groups["totals"]["cost_micro_credits"] > 0


def test_n_choices_are_served_streamed_and_all_charged(stack: Stack) -> None:
    from orch.ledger import Price, cost
    from tests.integration.test_tap_billing import account, new_tenant, usage

    tenant, key = new_tenant(stack, 10_000_000)
    tenant_client = openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0, timeout=300)
    reply = tenant_client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=6, n=3, temperature=1.0, seed=7, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None and reply.usage.completion_tokens == 3 * 6  # every choice counted

    stream = tenant_client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=5, n=3, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    texts, finished, streamed_usage = ["", "", ""], [None, None, None], None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finished[choice.index] = choice.finish_reason or finished[choice.index]
        streamed_usage = chunk.usage or streamed_usage
    assert finished == ["length"] * 3 and all(texts)
    assert streamed_usage is not None and streamed_usage.completion_tokens == 15

    a = account(stack, tenant)
    rows = usage(stack, tenant)["data"]
    assert [r["completion_tokens"] for r in rows] == [18, 15]
    price = Price(1_000_000, 2_000_000)  # configs/local.yaml's
    assert [r["cost_micro"] for r in rows] == [cost(price, r["prompt_tokens"], r["completion_tokens"]) for r in rows]
    assert a["spent_micro_credits"] == sum(r["cost_micro"] for r in rows) == 10_000_000 - a["balance_micro_credits"]


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a city",
                                      "parameters": WEATHER}},
]  # fmt: skip
QUESTION = {"role": "user", "content": "What is the weather like in Paris today?"}
RESULT = '{"temp_c": 21, "sky": "sunny"}'


def _answer_from(client: openai.OpenAI, call: dict, *, stream: bool) -> tuple[str, str | None]:
    """Sends the call's result back as a ``tool`` message; the model answers in words (tool_choice none)."""
    messages = [
        QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": RESULT},
    ]
    if not stream:
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=60, temperature=0
        )  # type: ignore[arg-type]
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=60, temperature=0, stream=True
    )  # type: ignore[arg-type]
    text, finish = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def _check_weather_answer(answer: str, finish: str | None) -> None:
    assert finish in ("stop", "length") and answer.strip(), (answer, finish)
    assert "sunny" in answer.lower() or "21" in answer, answer  # it answered from the tool's result


def test_tool_round_trip_required_then_answer(stack: Stack) -> None:
    from orch.ledger import Price, cost
    from tests.integration.test_tap_billing import account, new_tenant, usage

    tenant, key = new_tenant(stack, 10_000_000)
    client = openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model=MODEL, messages=[QUESTION], tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
    )  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    assert {c.function.name for c in calls} <= {"get_weather", "get_time"}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)  # an object, not the string vLLM gives
    _check_weather_answer(*_answer_from(client, calls[0].model_dump(exclude_none=True), stream=False))

    # Billed to the token: the holds covered the tools and calls in the prompts (a short hold is charged
    # only what it held), and the ledger's debits equal the usage rows.
    a = account(stack, tenant)
    rows = usage(stack, tenant)["data"]
    price = Price(1_000_000, 2_000_000)  # configs/local.yaml's
    assert len(rows) == 2 and rows[0]["prompt_tokens"] > 200  # the tools' instructions are in the prompt
    assert [r["cost_micro"] for r in rows] == [cost(price, r["prompt_tokens"], r["completion_tokens"]) for r in rows]
    assert a["spent_micro_credits"] == sum(r["cost_micro"] for r in rows)


def test_tool_round_trip_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[QUESTION],
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        stream=True,
    )  # type: ignore[arg-type]
    calls: dict[int, dict] = {}
    finish, fragments = None, 0
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content  # a forced call is all calls
        for part in delta.tool_calls or []:
            fragments += 1
            if part.index not in calls:  # OpenAI's shape: the first fragment names the call
                assert part.id and part.type == "function" and part.function and part.function.name
                calls[part.index] = {"id": part.id, "type": "function",
                                     "function": {"name": part.function.name, "arguments": ""}}  # fmt: skip
            else:
                assert part.id is None  # later fragments only add arguments
            calls[part.index]["function"]["arguments"] += (part.function and part.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls and fragments > len(calls)  # the arguments came in pieces
    for call in calls.values():
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    _check_weather_answer(*_answer_from(client, calls[0], stream=True))


def test_named_tool_choice_calls_that_tool_with_valid_arguments(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 3}):
        reply = client.chat.completions.create(
            model=MODEL, messages=[QUESTION], tools=TOOLS, tool_choice=named, max_tokens=60, **sampling
        )  # type: ignore[arg-type]
        calls = reply.choices[0].message.tool_calls or []
        assert [c.function.name for c in calls] == ["get_time"] and reply.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


def test_auto_tool_choice_answers_in_words_or_calls(client: openai.OpenAI) -> None:
    """``auto`` on the default model: whatever it chooses comes back well formed (calls parsed by vLLM's
    hermes parser, or plain content), and a tool message without its call id is a 400."""
    reply = client.chat.completions.create(model=MODEL, messages=[QUESTION], tools=TOOLS, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            json.loads(call.function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=2)  # type: ignore[list-item,misc]
    assert err.value.body["param"] == "messages[0]"  # type: ignore[index]


def test_the_readmes_client_examples_run_as_written(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's ``openai`` examples (chat streaming, json_schema + logprobs, tools, embeddings), in
    order, against this stack: only the URL and the key are swapped in."""
    import re

    from tests.integration.conftest import REPO

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    code = "\n".join(b for b in blocks if "client." in b or "OpenAI(" in b)
    assert code.count("client.") >= 5, "the README lost its client examples"
    code = code.replace('"http://127.0.0.1:8000/v1"', repr(stack.v1))
    code = code.replace('open(".orch/demo_key").read().strip()', repr(stack.key))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # raises on any example that fails
    out = capsys.readouterr().out
    assert "get_weather {'city': 'Paris'}" in out, out
    assert namespace["answer"].choices[0].message.content  # the answer from the tool's result
    first, paraphrase, unrelated = namespace["vectors"]
    cosine = namespace["cosine"]
    assert len(first) == 384 and cosine(first, paraphrase) > cosine(first, unrelated)

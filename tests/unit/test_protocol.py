"""Wire shapes and request validation; responses are checked against the openai package's own types."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from orch.engine import TokenLogprob
from orch.errors import InvalidRequest
from orch.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GrantBody,
    parse_body,
    parse_request,
    parse_usage_query,
)
from orch.responses import Choice, ChunkWriter, chat_completion, text_completion

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _raises(model: type, body: dict | bytes) -> InvalidRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(InvalidRequest) as err:
        parse_request(model, raw)
    return err.value


def test_negative_max_tokens_names_the_parameter() -> None:
    err = _raises(ChatCompletionRequest, {**CHAT, "max_tokens": -1})
    assert (err.status, err.param, err.type) == (400, "max_tokens", "invalid_request_error")


def test_missing_messages_is_missing_required_parameter() -> None:
    err = _raises(ChatCompletionRequest, {"model": "m"})
    assert err.param == "messages" and err.code == "missing_required_parameter"


def test_body_not_json_is_400_without_param() -> None:
    err = _raises(ChatCompletionRequest, b"{not json")
    assert err.status == 400 and err.param is None and err.code == "invalid_json"


def test_json_array_body_is_refused() -> None:
    assert _raises(ChatCompletionRequest, b"[1, 2]").code == "invalid_json"


def test_nested_errors_name_the_path() -> None:
    err = _raises(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert err.param == "messages[0].content"
    assert _raises(ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot"}]}).param == "messages[0].role"


def test_n_choices_are_bounded() -> None:
    assert parse_request(ChatCompletionRequest, json.dumps({**CHAT, "n": 3}).encode()).n == 3
    assert _raises(ChatCompletionRequest, {**CHAT, "n": 0}).param == "n"
    assert _raises(CompletionRequest, {"model": "m", "prompt": "x", "n": 17}).param == "n"


def test_n_choices_stream_interleaved_each_opening_with_its_role() -> None:
    writer = ChunkWriter(chat=True, request_id="c", model="m", include_usage=False)
    frames = [writer.first(), writer.delta("A", None, index=0), writer.delta("B", None, index=1),
              writer.delta("", "stop", index=1), writer.delta("a", "length", index=0)]  # fmt: skip
    chunks = [ChatCompletionChunk.model_validate_json(f[6:]) for f in frames]
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chunks] == [
        (0, "assistant"), (0, None), (1, "assistant"), (1, None), (0, None)
    ]  # fmt: skip
    whole = chat_completion("c", "m", [Choice("Aa", "length"), Choice("B", "stop")], 5, 4)
    assert [(c.index, c.message.content) for c in ChatCompletion.model_validate(whole).choices] == [(0, "Aa"), (1, "B")]


def test_unsupported_features_are_refused_not_ignored() -> None:
    assert _raises(ChatCompletionRequest, {**CHAT, "functions": [{"name": "f"}]}).param == "functions"
    assert _raises(CompletionRequest, {"model": "m", "prompt": "x", "echo": True}).param == "echo"


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tool_requests_are_checked() -> None:
    assert _raises(ChatCompletionRequest, {**CHAT, "tools": [{"type": "function"}]}).param == "tools[0].function"
    named = {"type": "function", "function": {"name": "nope"}}
    assert _raises(ChatCompletionRequest, {**CHAT, "tools": [TOOL], "tool_choice": named}).param == "tool_choice"
    assert _raises(ChatCompletionRequest, {**CHAT, "tool_choice": "required"}).param == "tool_choice"  # no tools
    forced_json = {**CHAT, "tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}
    assert _raises(ChatCompletionRequest, forced_json).param == "response_format"
    orphan = {"model": "m", "messages": [{"role": "tool", "content": "21C"}]}
    assert _raises(ChatCompletionRequest, orphan).param == "messages[0]"
    chat = parse_request(ChatCompletionRequest, json.dumps({**CHAT, "tools": [TOOL]}).encode())
    assert chat.tool_spec() == "auto"  # tools without a choice: the model chooses
    assert parse_request(ChatCompletionRequest, json.dumps(CHAT).encode()).tool_spec() == "none"


def test_tool_calls_in_the_history_reach_the_engine() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    body = {"model": "m", "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "21C", "tool_call_id": "call_1"},
    ]}  # fmt: skip
    messages = [m.engine_message() for m in parse_request(ChatCompletionRequest, json.dumps(body).encode()).messages]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert messages[2] == {"role": "tool", "content": "21C", "tool_call_id": "call_1"}


def test_tool_call_answers_validate_as_openai_types() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    whole = ChatCompletion.model_validate(chat_completion("c", "m", [Choice("", "tool_calls", None, calls)], 5, 4))
    message = whole.choices[0].message
    assert message.content is None and message.tool_calls[0].function.arguments == '{"a": 1}'  # type: ignore[index]
    writer = ChunkWriter(chat=True, request_id="c", model="m", include_usage=False)
    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    rest = {"index": 0, "function": {"arguments": '{"a": 1}'}}
    frames = [
        writer.first(),
        writer.delta("", None, tool_calls=[head]),
        writer.delta("", "tool_calls", tool_calls=[rest]),
    ]
    chunks = [ChatCompletionChunk.model_validate_json(f[6:]) for f in frames]
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[1].tool_calls[0].function.name == "f" and deltas[1].tool_calls[0].id == "call_1"  # type: ignore[index,union-attr]
    assert deltas[2].tool_calls[0].function.arguments == '{"a": 1}'  # type: ignore[index,union-attr]
    assert chunks[2].choices[0].finish_reason == "tool_calls"


def test_logprobs_and_response_format_are_checked_and_mapped() -> None:
    assert _raises(ChatCompletionRequest, {**CHAT, "top_logprobs": 3}).param == "top_logprobs"  # logprobs false
    assert _raises(ChatCompletionRequest, {**CHAT, "logprobs": True, "top_logprobs": 21}).param == "top_logprobs"
    assert _raises(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 6}).param == "logprobs"
    chat = parse_request(ChatCompletionRequest, json.dumps({**CHAT, "logprobs": True, "top_logprobs": 5}).encode())
    assert chat.logprobs_wanted() == 5
    assert parse_request(ChatCompletionRequest, json.dumps({**CHAT, "logprobs": True}).encode()).logprobs_wanted() == 0
    assert parse_request(ChatCompletionRequest, json.dumps(CHAT).encode()).logprobs_wanted() is None
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    req = parse_request(ChatCompletionRequest, json.dumps({**CHAT, "response_format": fmt}).encode())
    assert req.structured() == {"json": schema}
    json_object = {**CHAT, "response_format": {"type": "json_object"}}
    assert parse_request(ChatCompletionRequest, json.dumps(json_object).encode()).structured() == {"json_object": True}
    text = {**CHAT, "response_format": {"type": "text"}}
    assert parse_request(ChatCompletionRequest, json.dumps(text).encode()).structured() is None
    no_schema = {**CHAT, "response_format": {"type": "json_schema"}}
    assert _raises(ChatCompletionRequest, no_schema).param == "response_format"
    assert _raises(ChatCompletionRequest, {**CHAT, "response_format": {"type": "yaml"}}).param == "response_format.type"


def test_logprobs_shapes_match_openai_types_streamed_and_whole() -> None:
    tokens = [TokenLogprob("Par", -0.1, (("Par", -0.1), ("Lon", -2.5))), TokenLogprob("is", -0.01, (("is", -0.01),))]
    chat = ChatCompletion.model_validate(chat_completion("c", "m", [Choice("Paris", "stop", tokens)], 5, 2))
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [c.token for c in content] == ["Par", "is"] and content[0].top_logprobs[1].logprob == -2.5  # type: ignore[index]
    assert bytes(content[0].bytes or []) == b"Par"
    text = Completion.model_validate(text_completion("t", "m", [Choice("Paris", "stop", tokens)], 5, 2))
    assert text.choices[0].logprobs.text_offset == [0, 3]  # type: ignore[union-attr]
    writer = ChunkWriter(chat=False, request_id="t", model="m", include_usage=False)
    writer.delta("Par", None, tokens[:1])
    second = json.loads(writer.delta("is", "stop", tokens[1:])[6:])
    assert second["choices"][0]["logprobs"]["text_offset"] == [3]  # offsets run across chunks
    chunk = ChatCompletionChunk.model_validate_json(
        ChunkWriter(chat=True, request_id="c", model="m", include_usage=False).delta("Par", None, tokens[:1])[6:]
    )
    assert chunk.choices[0].logprobs.content[0].token == "Par"  # type: ignore[union-attr,index]


def test_unknown_fields_are_accepted() -> None:
    req = parse_request(ChatCompletionRequest, json.dumps({**CHAT, "user": "u", "metadata": {"a": 1}}).encode())
    assert req.messages[0].text() == "hi"


def test_max_completion_tokens_is_an_alias() -> None:
    req = parse_request(ChatCompletionRequest, json.dumps({**CHAT, "max_completion_tokens": 7}).encode())
    assert req.max_tokens == 7


def test_text_parts_are_joined() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    }
    assert parse_request(ChatCompletionRequest, json.dumps(body).encode()).messages[0].text() == "ab"


def test_completion_prompt_forms() -> None:
    assert parse_request(CompletionRequest, b'{"model":"m","prompt":["one"]}').prompt == "one"
    assert parse_request(CompletionRequest, b'{"model":"m","prompt":[1,2,3]}').prompt == [1, 2, 3]
    assert _raises(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).param == "prompt"


def test_stop_as_string_or_list() -> None:
    assert parse_request(ChatCompletionRequest, json.dumps({**CHAT, "stop": "x"}).encode()).stop_list() == ["x"]
    assert parse_request(ChatCompletionRequest, json.dumps({**CHAT, "stop": ["a", "b"]}).encode()).stop_list() == [
        "a",
        "b",
    ]


def test_non_stream_bodies_match_openai_types() -> None:
    chat = ChatCompletion.model_validate(chat_completion("chatcmpl-1", "m", [Choice("Paris.", "stop")], 10, 3))
    assert chat.usage is not None and chat.usage.total_tokens == 13
    text = Completion.model_validate(text_completion("cmpl-1", "m", [Choice(" Paris", "length")], 5, 8))
    assert text.choices[0].text == " Paris"


def _frames(raw: bytes) -> list[dict]:
    return [json.loads(part[6:]) for part in raw.split(b"\n\n") if part.startswith(b"data: {")]


def test_chat_chunks_role_first_finish_last_usage_after() -> None:
    w = ChunkWriter(chat=True, request_id="chatcmpl-1", model="m", include_usage=True)
    raw = w.first() + w.delta("Par", None) + w.delta("is.", "stop") + w.usage(10, 2) + w.DONE
    frames = [ChatCompletionChunk.model_validate(f) for f in _frames(raw)]
    assert frames[0].choices[0].delta.role == "assistant"
    assert [f.choices[0].finish_reason for f in frames[:-1]] == [None, None, "stop"]
    assert all(f.usage is None for f in frames[:-1])
    assert frames[-1].choices == [] and frames[-1].usage is not None and frames[-1].usage.completion_tokens == 2
    assert raw.endswith(b"data: [DONE]\n\n")


def test_chunks_omit_usage_key_without_include_usage() -> None:
    w = ChunkWriter(chat=True, request_id="chatcmpl-1", model="m", include_usage=False)
    assert all("usage" not in f for f in _frames(w.first() + w.delta("a", "stop")))


def test_text_completion_chunks() -> None:
    w = ChunkWriter(chat=False, request_id="cmpl-1", model="m", include_usage=False)
    assert w.first() == b""
    frame = _frames(w.delta(" Paris", "length"))[0]
    assert Completion.model_validate(frame).choices[0].finish_reason == "length"


def test_a_deeply_nested_body_is_a_400_not_a_recursion_error() -> None:
    deep = b"[" * 100_000
    assert _raises(ChatCompletionRequest, deep).code == "invalid_json"
    with pytest.raises(InvalidRequest) as err:
        parse_body(GrantBody, deep)
    assert (err.value.status, err.value.code) == (400, "invalid_json")  # the whole body: no param, as OpenAI


@pytest.mark.parametrize("stop", ["", ["ok", ""]])
def test_an_empty_stop_sequence_is_a_400_naming_stop(stop: str | list[str]) -> None:
    err = _raises(CompletionRequest, {"model": "m", "prompt": "x", "stop": stop})
    assert (err.status, err.param) == (400, "stop")


@pytest.mark.parametrize("seed", [2**70, 2**63, -(2**63) - 1])
def test_a_seed_outside_int64_is_a_400_naming_seed(seed: int) -> None:
    err = _raises(ChatCompletionRequest, {**CHAT, "seed": seed})
    assert (err.status, err.param) == (400, "seed")
    assert parse_request(ChatCompletionRequest, json.dumps({**CHAT, "seed": 2**63 - 1}).encode()).seed == 2**63 - 1


@pytest.mark.parametrize("when", ["9999-12-31T23:00:00-01:00", "0001-01-01T00:30:00+01:00"])
def test_a_usage_time_past_the_calendar_in_utc_is_a_400_naming_it(when: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_usage_query({"until": when})
    assert (err.value.status, err.value.param) == (400, "until")

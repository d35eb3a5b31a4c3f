"""Tool calling's pure logic: schemas for forced calls, calls out of streamed text, the prompt's messages."""

from __future__ import annotations

import json

import jsonschema
import pytest

from orch.errors import InvalidRequest
from orch.tools import ForcedCalls, forced_schema, merge_fragments, render_inputs, template_knows_tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]


def _stream(calls: ForcedCalls, text: str, step: int) -> list[dict]:
    fragments = []
    for i in range(0, len(text), step):
        fragments += calls.feed(text[i : i + step], [])[1]
    return fragments


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_required_calls_stream_head_first_then_arguments_whatever_the_chunking(step: int) -> None:
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    fragments = _stream(ForcedCalls(None), text, step)
    heads = [f for f in fragments if "id" in f]
    assert [h["function"]["name"] for h in heads] == ["get_weather", "get_time"]
    assert [h["index"] for h in heads] == [0, 1]
    calls = merge_fragments(fragments)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {}]
    assert len({c["id"] for c in calls}) == 2


def test_required_call_with_keys_in_another_order_goes_out_whole() -> None:
    calls = merge_fragments(_stream(ForcedCalls(None), '[{"arguments": {"city": "Oslo"}, "name": "get_weather"}]', 3))
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}


def test_a_cut_off_call_keeps_what_was_generated() -> None:
    stream = ForcedCalls(None)
    calls = merge_fragments(_stream(stream, '[{"name": "get_weather", "arguments": {"ci', 4))
    assert stream.called and calls[0]["function"]["arguments"] == '{"ci'


def test_named_call_streams_its_arguments() -> None:
    stream = ForcedCalls("get_weather")
    calls = merge_fragments(_stream(stream, '{"city": "Rome"}', 3))
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


def test_forced_schemas_validate_exactly_the_calls() -> None:
    named = forced_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, True)
    assert named == WEATHER
    required = forced_schema(TOOLS, "required", True)
    assert required is not None
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}}], required)
    for wrong in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "other", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, required)
    single = forced_schema(TOOLS, "required", False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {}}] * 2, single)
    assert forced_schema(TOOLS, "auto", True) is None


def test_defs_are_lifted_and_conflicts_refused() -> None:
    def tool(name: str, ref_type: str) -> dict:
        params = {"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": {"X": {"type": ref_type}}}
        return {"type": "function", "function": {"name": name, "parameters": params}}

    schema = forced_schema([tool("a", "string"), tool("b", "string")], "required", True)
    assert schema is not None and schema["$defs"] == {"X": {"type": "string"}}
    jsonschema.validate([{"name": "a", "arguments": {"x": "s"}}], schema)
    with pytest.raises(InvalidRequest) as err:
        forced_schema([tool("a", "string"), tool("b", "integer")], "required", True)
    assert err.value.param == "tools"


def test_templates_without_tools_get_them_as_text() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "21C", "tool_call_id": "c1"},
    ]
    messages, tools = render_inputs(history, TOOLS, native=False)
    assert tools is None
    assert "<tools>" in messages[0]["content"] and messages[0]["content"].endswith("Be brief.")
    assert (
        messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert messages[3] == {"role": "user", "content": "get_weather returned: 21C"}
    native, native_tools = render_inputs(history, TOOLS, native=True)
    assert native_tools == TOOLS and native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_template_detection() -> None:
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_knows_tools("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    assert not template_knows_tools(None)


class _Vocab:
    """A tokenizer stand-in: vLLM's Hermes parser only needs one to exist (it reads text, not ids)."""

    def get_vocab(self) -> dict[str, int]:
        return {}


def test_auto_calls_come_from_vllms_own_parser_as_the_text_streams() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    from orch.tools import ParsedCalls

    request = ChatCompletionRequest(
        model="-", messages=[{"role": "user", "content": ""}], tools=TOOLS, tool_choice="auto"
    )
    parser = ToolParserManager.get_tool_parser("hermes")(_Vocab(), request.tools)  # type: ignore[arg-type]
    stream = ParsedCalls(parser, request)
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, fragments = "", []
    for i in range(0, len(text), 3):
        more, found = stream.feed(text[i : i + 3], [])
        content, fragments = content + more, fragments + found
    more, found = stream.finish()
    content, fragments = content + more, fragments + found
    assert stream.called and content.strip() == "Let me check."
    calls = merge_fragments(fragments)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls[0]["id"] and calls[0]["type"] == "function"


def test_auto_needs_a_parser_and_a_wrong_parser_name_fails_the_start() -> None:
    from orch.engine import GenerationRequest
    from orch.vllm_parts import call_streams, find_tool_parser

    assert find_tool_parser(None, native_tools=True) is None  # the template renders tools: no guess at its format
    assert find_tool_parser(None, native_tools=False).__name__ == "Hermes2ProToolParser"
    with pytest.raises(ValueError, match="engine.tool_parser: unknown vLLM tool parser 'hermes3'; known: .*hermes"):
        find_tool_parser("hermes3", native_tools=False)
    auto = GenerationRequest("r", messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="auto")
    with pytest.raises(InvalidRequest) as err:
        call_streams(auto, None, None, None)
    assert err.value.param == "tool_choice"
    assert call_streams(GenerationRequest("r", messages=[], tools=TOOLS, tool_choice="required"), None, None, None)
    assert call_streams(GenerationRequest("r", messages=[], tools=TOOLS, tool_choice="none"), None, None, None) is None


def test_auto_text_held_back_as_a_possible_tag_comes_out_at_the_end() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    from orch.tools import ParsedCalls

    request = ChatCompletionRequest(
        model="-", messages=[{"role": "user", "content": ""}], tools=TOOLS, tool_choice="auto"
    )
    stream = ParsedCalls(ToolParserManager.get_tool_parser("hermes")(_Vocab(), request.tools), request)  # type: ignore[arg-type]
    content = "".join(stream.feed(part, [])[0] for part in ("1 ", "< 2 is true, x <", "tool"))
    more, calls = stream.finish()
    assert content + more == "1 < 2 is true, x <tool" and not calls and not stream.called

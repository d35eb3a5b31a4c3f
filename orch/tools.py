"""Tool calling: the request's tools, how they reach the prompt, and how calls come back out of the text.

- ``tool_choice`` ``required`` or a named function: the engine's guided decoding constrains the output
  to the calls themselves, the arguments to the tool's ``parameters`` schema (so they parse and
  validate on any model, the smallest included); :class:`ForcedCalls` turns that text into calls.
- ``auto``: the model writes what it likes and the model's vLLM tool parser (``tool_parser`` in its
  engine config, as ``vllm serve --tool-call-parser``) finds the calls: :class:`ParsedCalls`.
- A chat template that knows no tools (the default model's) gets them as Hermes-style instructions
  in the system prompt and the history's calls as ``<tool_call>`` text, which the ``hermes`` parser
  reads back; a result is a user message "<tool> returned: ...". Measured on SmolLM2-135M: with
  ``<tool_response>`` tags it echoed the tags; with those words it answered from the result.

Every stream here turns text deltas into ``(content, tool_call fragments)`` in OpenAI's streaming shape
(the first fragment of a call carries its ``id``, ``type`` and name; later ones add ``arguments`` text).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from orch.errors import InvalidRequest

# ---- request models -------------------------------------------------------------------------------


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: _FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
Tools = Annotated[list[Tool], Field(min_length=1, max_length=128)]


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(max_length=64)  # a tool's name: what a result renders with (the hold counts 64)
    arguments: str


class ToolCallIn(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


def choice_spec(tools: list[Tool] | None, choice: ToolChoice | None) -> str | dict[str, Any]:
    """The effective ``tool_choice`` (``auto`` with tools, ``none`` without); 400 for a choice that
    names a tool not in ``tools``, or any choice but ``none`` without tools.

    >>> choice_spec(None, None)
    'none'
    """
    if choice is None:
        return "auto" if tools else "none"
    if not tools and choice != "none":
        raise InvalidRequest(
            "Invalid 'tool_choice': it needs 'tools' to choose from.", param="tool_choice", code="invalid_value"
        )
    if isinstance(choice, NamedToolChoice):
        names = [t.function.name for t in tools or []]
        if choice.function.name not in names:
            raise InvalidRequest(
                f"Invalid 'tool_choice': no tool named '{choice.function.name}' in 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
        return choice.model_dump()
    return choice


# ---- the prompt -----------------------------------------------------------------------------------

HERMES_PROMPT = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "Here are the available functions within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders ``tools`` itself (it names the variable)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template or "") is not None


def render_inputs(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to hand a chat template. ``native``: the template renders tools, calls
    and results itself (it gets call arguments as objects, as vLLM gives them); else they become text.

    >>> msgs, _ = render_inputs([{"role": "tool", "content": "21C", "tool_call_id": "c1", "name": "weather"}],
    ...                         None, native=False)
    >>> msgs[0]
    {'role': 'user', 'content': 'weather returned: 21C'}
    """
    if native:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [{**c, "function": {**c["function"], "arguments": _as_object(c["function"]["arguments"])}}
                         for c in m["tool_calls"]]  # fmt: skip
                m = {**m, "tool_calls": calls}
            out.append(m)
        return out, tools
    out = []
    names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or ()}
    for m in messages:
        if m["role"] == "tool":  # words, not tags: a small model answers from them instead of echoing them
            name = m.get("name") or names.get(m["tool_call_id"], "The tool")
            out.append({"role": "user", "content": f"{name} returned: {m['content']}"})
        elif m.get("tool_calls"):
            written = "\n".join(_hermes_call(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + written})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        instructions = HERMES_PROMPT.format(tools=listed)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": "system", "content": instructions + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out, None


def _as_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _hermes_call(call: dict[str, Any]) -> str:
    body = {"name": call["function"]["name"], "arguments": _as_object(call["function"]["arguments"])}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


# ---- guided decoding for forced calls --------------------------------------------------------------


def forced_schema(tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool) -> dict[str, Any] | None:
    """The JSON schema the output must follow: a named tool's ``parameters`` (the output is its
    arguments), or for ``required`` an array of ``{"name", "arguments"}`` objects, one branch per tool,
    each with its own ``parameters`` (``$defs`` lifted to the top). None for ``auto`` and ``none``.

    >>> forced_schema([{"type": "function", "function": {"name": "f"}}], "required", False)["maxItems"]
    1
    """
    by_name = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "properties": {}}
               for t in tools}  # fmt: skip
    if isinstance(choice, dict):
        return by_name[choice["function"]["name"]]
    if choice != "required":
        return None
    defs: dict[str, Any] = {}
    branches = []
    for name, params in by_name.items():
        params = dict(params)
        for key, value in (params.pop("$defs", None) or {}).items():
            if defs.setdefault(key, value) != value:
                raise InvalidRequest(
                    f"Invalid 'tools': two tools define '$defs/{key}' differently.", param="tools", code="invalid_value"
                )
        branches.append({
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


# ---- calls out of the text --------------------------------------------------------------------------

Fragment = dict[str, Any]


class CallStream(Protocol):
    """Turns one choice's text deltas into content and tool-call fragments."""

    def feed(self, text: str, token_ids: Sequence[int]) -> tuple[str, list[Fragment]]: ...

    def finish(self) -> tuple[str, list[Fragment]]: ...

    @property
    def called(self) -> bool: ...


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _head(index: int, name: str, arguments: str = "") -> Fragment:
    return {"index": index, "id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _args(index: int, arguments: str) -> Fragment:
    return {"index": index, "function": {"arguments": arguments}}


_ELEMENT_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_DECODER = json.JSONDecoder()


class ForcedCalls:
    """The output of guided decoding under :func:`forced_schema`: for a named tool the text is its
    arguments, streamed as they come; for ``required`` a JSON array of calls, each streamed once its
    name is complete, its arguments as they grow (everything after ``"arguments":`` belongs to them
    until they parse whole)."""

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._text = ""
        self._pos = 0  # required: where the array's next call starts (0: before the '[')
        self._open = False  # required: the current call's head went out, its arguments are not whole yet
        self._sent = 0  # characters of the current call's arguments already sent
        self._count = 0  # calls whose head went out
        self.called = False

    def feed(self, text: str, token_ids: Sequence[int]) -> tuple[str, list[Fragment]]:
        if self._name is not None:
            return "", self._named(text)
        self._text += text
        return "", self._array()

    def finish(self) -> tuple[str, list[Fragment]]:
        return "", []

    def _named(self, text: str) -> list[Fragment]:
        if not self.called:
            self.called = True
            return [_head(0, self._name or "", text)]
        return [_args(0, text)] if text else []

    def _array(self) -> list[Fragment]:
        out: list[Fragment] = []
        text = self._text
        if self._pos == 0:
            self._pos = text.find("[") + 1
            if self._pos == 0:
                return out
        while True:
            start = self._pos
            while start < len(text) and text[start] in " \t\n\r,":
                start += 1
            if start >= len(text) or text[start] == "]":
                return out
            whole = _decode(text, start)
            head = _ELEMENT_HEAD.match(text, start)
            if head is None:  # the name is not whole yet, or the keys come in another order
                if whole is None:
                    return out
                call = whole[0] if isinstance(whole[0], dict) else {}
                arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
                out.append(_head(self._count, str(call.get("name", "")), arguments))
                self._count += 1
                self.called = True
                self._pos = whole[1]
                continue
            if not self._open:
                out.append(_head(self._count, json.loads(f'"{head.group(1)}"')))
                self._count += 1
                self._open, self._sent, self.called = True, 0, True
            args = _decode(text, head.end())
            fragment = text[head.end() + self._sent : args[1] if args is not None else len(text)]
            if fragment:
                out.append(_args(self._count - 1, fragment))
                self._sent += len(fragment)
            if whole is None:
                return out
            self._pos, self._open = whole[1], False


def _decode(text: str, at: int) -> tuple[Any, int] | None:
    try:
        return _DECODER.raw_decode(text, at)
    except ValueError:
        return None


class ParsedCalls:
    """``auto``: the model's vLLM tool parser reads calls out of the text as it streams."""

    def __init__(self, parser: Any, request: Any) -> None:
        self._parser = parser
        self._request = request
        self._text = ""
        self._ids: list[int] = []
        self._sent = 0  # characters of content sent
        self.called = False

    def feed(self, text: str, token_ids: Sequence[int]) -> tuple[str, list[Fragment]]:
        previous, previous_ids = self._text, self._ids
        self._text, self._ids = previous + text, previous_ids + list(token_ids)
        message = self._parser.extract_tool_calls_streaming(
            previous, self._text, text, previous_ids, self._ids, list(token_ids), self._request
        )
        if message is None:
            return "", []
        calls = [c.model_dump(exclude_none=True) for c in message.tool_calls or []]
        for call in calls:
            if call.get("id"):
                call.setdefault("type", "function")
        self.called = self.called or bool(calls)
        self._sent += len(message.content or "")
        return message.content or "", calls

    def finish(self) -> tuple[str, list[Fragment]]:
        """Arguments the parser parsed but had not streamed yet (vLLM's server sends them last too); with no
        call, the text it held back as a possible tag's start ("<tool")."""
        if not self.called:
            return self._text[self._sent :], []
        rest = self._parser.get_remaining_unstreamed_args()
        return "", [_args(len(self._parser.prev_tool_call_arr) - 1, rest)] if rest else []


def merge_fragments(fragments: Sequence[Fragment]) -> list[dict[str, Any]]:
    """Whole calls from a choice's streamed fragments (what a non-streaming answer carries).

    >>> merge_fragments([_head(0, "f", '{"a"') | {"id": "c"}, _args(0, ": 1}")])
    [{'id': 'c', 'type': 'function', 'function': {'name': 'f', 'arguments': '{"a": 1}'}}]
    """
    calls: dict[int, dict[str, Any]] = {}
    for f in fragments:
        call = calls.setdefault(f["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = f.get("id") or call["id"]
        fn = f.get("function") or {}
        call["function"]["name"] = fn.get("name") or call["function"]["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]

"""OpenAI wire protocol: request models and validation errors (400s naming the parameter).

Request models accept unknown fields (clients send them) but refuse the known ones this server
cannot honour, so nothing silently changes meaning. The answers' shapes are in ``orch/responses.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orch.errors import InvalidRequest
from orch.tools import ToolCallIn, ToolChoice, Tools, choice_spec

Role = Literal["system", "developer", "user", "assistant", "tool"]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Role
    content: str | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls, in the history
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_message_names_its_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the 'tool_call_id' it answers")
        return self

    def engine_message(self) -> dict[str, Any]:
        """The message as the engine renders it: text content, plus the calls or the call it answers."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON that validates against a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema', and only with it")
        return self

    def structured(self) -> dict[str, Any] | None:
        """vLLM's structured-output setting for this format (None: free text).

        >>> ResponseFormat(type="json_object").structured()
        {'json_object': True}
        """
        if self.type == "json_object":
            return {"json_object": True}
        if self.json_schema is not None:
            return {"json": self.json_schema.json_schema or {"type": "object"}}
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(RequestModel):
    """Fields shared by chat and text completions (``ignore_eos`` and ``min_tokens`` are vLLM's extensions)."""

    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None  # the engine's int64, as vLLM's server
    n: Annotated[int, Field(ge=1, le=16)] = 1  # choices; the hold covers all of them
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # recorded in the usage row

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 16:
            raise ValueError("at most 16 stop sequences")
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("a stop sequence must not be empty")
        return stop

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _refuse(self, *fields: str) -> None:
        extra = self.model_extra or {}
        for name in fields:
            value = extra.get(name)
            if value not in (None, False, [], {}):
                raise InvalidRequest(
                    f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter"
                )


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def check_supported(self) -> None:
        self._refuse("functions", "function_call", "audio", "prediction")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                "Invalid 'top_logprobs': 'logprobs' must be true to use it.", param="top_logprobs", code="invalid_value"
            )
        forced = not isinstance(self.tool_spec(), str) or self.tool_spec() == "required"
        if forced and self.structured() is not None:
            raise InvalidRequest(
                "Invalid 'response_format': a forced tool call ('tool_choice' required or a named function) "
                "already sets the output's format.",
                param="response_format",
                code="invalid_value",
            )

    def tool_spec(self) -> str | dict[str, Any]:
        """The effective ``tool_choice``: "none", "auto", "required" or {"type": "function", ...}."""
        return choice_spec(self.tools, self.tool_choice)

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def logprobs_wanted(self) -> int | None:
        """How many top logprobs per token the engine computes (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def structured(self) -> dict[str, Any] | None:
        return self.response_format.structured() if self.response_format is not None else None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` body."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            return prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    def check_supported(self) -> None:
        self._refuse("echo", "suffix", "best_of")

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def structured(self) -> dict[str, Any] | None:
        return None


TOOL_RESULT_ROOM = "x" * 80  # a function name (at most 64 characters) and " returned: "


def chat_texts(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[str]:
    """The texts a chat prompt is rendered from, for its token bound: each message's content, each call
    of the history and each tool (as JSON, which is how templates write them).

    >>> chat_texts([{"role": "user", "content": "Hi"}], [{"type": "function", "function": {"name": "f"}}])
    ['Hi', '{"type": "function", "function": {"name": "f"}}']
    """
    texts = [m["content"] + m.get("name", "") + m.get("tool_call_id", "") for m in messages]
    # A tool message may render as "<function name> returned: ..." (orch/tools.py): room for the name.
    texts += [TOOL_RESULT_ROOM for m in messages if m["role"] == "tool"]
    texts += [json.dumps(c, ensure_ascii=False) for m in messages for c in m.get("tool_calls") or ()]
    texts += [json.dumps(t, ensure_ascii=False) for t in tools or ()]
    return texts


def parse_request(model: type[RequestModel], body: bytes | dict[str, Any]) -> Any:
    """Parses and validates a JSON body (or its object, parsed) into ``model``; raises
    :class:`InvalidRequest` naming the parameter.

    >>> parse_request(ChatCompletionRequest, b'{"model": "m"}').messages
    Traceback (most recent call last):
    ...
    orch.errors.InvalidRequest: Missing required parameter: 'messages'.
    """
    data = body if isinstance(body, dict) else json_object(body)
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    request.check_supported()  # type: ignore[attr-defined]
    return request


def json_object(body: bytes, *, empty_is_object: bool = False) -> dict[str, Any]:
    """The JSON object of a body; 400 for anything else, nesting too deep for the parser included."""
    if empty_is_object and not body.strip():
        return {}
    try:
        data = json.loads(body)
    except RecursionError:
        raise InvalidRequest("The JSON body of your request is nested too deeply.", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def validation_error(exc: ValidationError) -> InvalidRequest:
    """Maps the first pydantic error to an OpenAI-style message naming the parameter."""
    err = exc.errors()[0]
    param = _param_name([part for part in err["loc"] if _names_a_field(part)])
    kind = err["type"]
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    got = err.get("input")
    detail = err["msg"].removeprefix("Value error, ")
    return InvalidRequest(
        f"Invalid '{param}': {detail}. Got {json.dumps(got)[:80]} instead.", param=param, code="invalid_value"
    )


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _names_a_field(part: Any) -> bool:
    """Pydantic puts union members ("str", "list[TextPart]", "function-after[...]") in error locations."""
    return isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS)


def _param_name(loc: list[Any]) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


# ---- account, usage and admin APIs ----------------------------------------------------------------


class _Body(BaseModel):
    # strict: a JSON true is not the integer 1, nor "5" the number 5 (schemathesis found {"tpm": true} taken as 1)
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateTenantBody(_Body):
    """``POST /admin/tenants``: a retry with the same ``idempotency_key`` returns the same tenant."""

    name: str = Field(min_length=1, max_length=200)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


class CreateKeyBody(_Body):
    """``POST /admin/tenants/{id}/keys``; ``tap`` defaults to the tap that serves the call. The key's own
    priority class (its requests' default; ``X-Priority`` may only lower it) and rate limits."""

    tap: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    priority: Literal["interactive", "batch"] | None = None
    rpm: int | None = Field(None, ge=1, le=10**9, description="Requests per minute of this key.")
    tpm: int | None = Field(None, ge=1, le=10**12, description="Tokens per minute of this key.")


class CreateOwnKeyBody(_Body):
    """``POST /v1/keys``: a tenant's new key of the tap that serves the call, with the key's own rate limits
    (under the tenant's, which still apply); its priority class is the tenant's, set by an admin."""

    rpm: int | None = Field(None, ge=1, le=10**9, description="Requests per minute of this key.")
    tpm: int | None = Field(None, ge=1, le=10**12, description="Tokens per minute of this key.")


class TenantPolicyBody(_Body):
    """``PATCH /admin/tenants/{id}``: the fields given are set (null clears one), the others kept."""

    priority: Literal["interactive", "batch"] | None = None
    weight: float | None = Field(None, gt=0, le=10**6, description="Fair-share weight when a model is saturated.")
    rpm: int | None = Field(None, ge=1, le=10**9, description="Requests per minute of the tenant, all keys.")
    tpm: int | None = Field(None, ge=1, le=10**12, description="Tokens per minute of the tenant, all keys.")

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class GrantBody(_Body):
    """``POST /admin/tenants/{id}/grants``: money moves only with an id, so a retry never grants twice."""

    micro_credits: int = Field(gt=0, le=10**15)
    idempotency_key: str = Field(min_length=1, max_length=200)


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """Parses a JSON body into ``model`` (an empty body is ``{}``); 400 naming the parameter."""
    data = json_object(body, empty_is_object=True)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


GroupBy = Literal["day", "model", "user", "tenant", "day_model"]
GROUP_BYS: tuple[GroupBy, ...] = ("day", "model", "user", "tenant", "day_model")
USAGE_LIMIT = 1000  # the most requests one usage report lists (totals always count every one)


class UsageQuery(NamedTuple):
    """The query of ``GET /v1/usage`` and the admin reports: ``[since, until)``, the grouping, and how
    many of the latest requests to list when not grouped."""

    since: datetime | None = None
    until: datetime | None = None
    group_by: GroupBy | None = None
    limit: int = USAGE_LIMIT


def parse_usage_query(params: dict[str, str]) -> UsageQuery:
    """``since``/``until`` (ISO 8601 date or time; naive means UTC), ``group_by`` and ``limit`` of
    ``GET /v1/usage``.

    >>> parse_usage_query({"since": "2026-11-01", "group_by": "day"}).since.isoformat()
    '2026-11-01T00:00:00+00:00'
    """
    unknown = sorted(set(params) - {"since", "until", "group_by", "limit"})
    if unknown:
        raise InvalidRequest(f"Unknown query parameter '{unknown[0]}'.", param=unknown[0], code="unknown_parameter")
    times: list[datetime | None] = []
    for name in ("since", "until"):
        raw = params.get(name)
        if not raw:
            times.append(None)
            continue
        try:
            at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        except (ValueError, OverflowError):  # OverflowError: 9999-12-31T23:00-01:00 is past year 9999 in UTC
            raise InvalidRequest(
                f"Invalid '{name}': expected an ISO 8601 date or time like 2026-11-01 or 2026-11-01T12:00:00Z.",
                param=name,
                code="invalid_value",
            ) from None
        times.append(at)
    group_by = params.get("group_by") or None
    if group_by is not None and group_by not in GROUP_BYS:
        raise InvalidRequest(
            f"Invalid 'group_by': expected one of {', '.join(repr(g) for g in GROUP_BYS)}.",
            param="group_by",
            code="invalid_value",
        )
    raw_limit = params.get("limit") or str(USAGE_LIMIT)
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= USAGE_LIMIT:
        raise InvalidRequest(
            f"Invalid 'limit': expected a whole number from 1 to {USAGE_LIMIT}.", param="limit", code="invalid_value"
        )
    return UsageQuery(times[0], times[1], group_by, int(raw_limit))  # type: ignore[arg-type]

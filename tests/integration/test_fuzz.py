"""Fuzzing the session's real stack with hypothesis: generated bodies for the OpenAI routes (valid requests with
one field set to anything JSON can say, fields dropped, odd unicode, absurd ``max_tokens``, raw bytes). Every
answer is below 500, and every refusal is OpenAI-shaped (``{"error": {message, type, param, code}}``). Then
schemathesis generates cases from the OpenAPI document the gateway serves (``GET /openapi.json``): no 5xx,
answers as the document says, and bodies the document calls invalid refused.

Bounded: a fixed number of cases per route (``LLAMA_ORCH_FUZZ_CASES`` scales it), each a small request
(``max_tokens`` stays tiny unless it is the field under test, and then it is absurd or of the wrong type).
Prints the cases tried and the 5xx seen, for the reliability table."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from orch import openapi
from tests.integration.conftest import MODEL, Stack
from tests.integration.test_bad_input import new_key
from tests.reliability.table import figure

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

SCALE = float(os.environ.get("LLAMA_ORCH_FUZZ_CASES", "1"))
EMBEDDING_MODEL = "all-minilm-l6-v2"
seen: Counter[str] = Counter()  # cases per route and statuses, printed at the end

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
ODD_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from(["\u0000", "\u202e", "\ufeff", "\U0001f600"]),
                   max_size=60)  # fmt: skip
ABSURD_MAX_TOKENS = st.sampled_from([-1, 0, 10**9, 2**63, 2**70, "4", 4.5, True, [], {}])
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
               "stream", "stream_options", "seed", "logprobs", "top_logprobs", "tools", "tool_choice",
               "response_format", "user", "presence_penalty", "frequency_penalty", "logit_bias"]  # fmt: skip
TEXT_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed", "echo",
               "logprobs", "suffix", "best_of", "user"]  # fmt: skip


@st.composite
def chat_bodies(draw: st.DrawFn) -> Any:
    content = draw(st.one_of(ODD_TEXT, st.just("")))
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    return _mutated(draw, body, CHAT_FIELDS)


@st.composite
def text_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {"model": MODEL, "prompt": draw(ODD_TEXT), "max_tokens": 2}
    return _mutated(draw, body, TEXT_FIELDS)


@st.composite
def embedding_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {"model": EMBEDDING_MODEL, "input": draw(ODD_TEXT)}
    return _mutated(draw, body, ["model", "input", "encoding_format", "dimensions", "user"])


def _mutated(draw: st.DrawFn, body: dict[str, Any], fields: list[str]) -> Any:
    how = draw(st.sampled_from(["set", "set", "set", "drop", "empty messages", "max_tokens", "whole", "as is"]))
    if how == "set":
        body[draw(st.sampled_from(fields))] = draw(JSON)
    elif how == "drop":
        body.pop(draw(st.sampled_from(sorted(body))), None)
    elif how == "empty messages" and "messages" in body:
        body["messages"] = draw(st.sampled_from([[], [{}], [{"role": "user"}], [{"role": "nobody", "content": "x"}]]))
    elif how == "max_tokens":
        body["max_tokens"] = draw(ABSURD_MAX_TOKENS)
    elif how == "whole":
        return draw(JSON)
    # A valid large (or absent: up to the context) length would only make the run slow: kept tiny.
    if body.get("max_tokens") is None and "max_tokens" in fields:
        body["max_tokens"] = 2
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if type(value) is int and 2 < value < 10**6:
            body[field] = 2
    return body


@pytest.fixture(scope="module")
def client(stack: Stack) -> Any:
    key = new_key(stack, micro_credits=10**11)[1]
    with httpx.Client(base_url=stack.v1, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        yield c
    cases = sum(v for k, v in seen.items() if k.startswith("case "))
    fives = sum(v for k, v in seen.items() if k.startswith("status 5"))
    figure("fuzz cases tried (OpenAI routes, live stack)", cases)
    figure("fuzz 5xx", fives)
    figure("fuzz statuses", dict(sorted((k, v) for k, v in seen.items() if k.startswith("status"))))
    figure(
        "schemathesis cases (served OpenAPI document)",
        sum(v for k, v in seen.items() if k.startswith("schemathesis ") and "status" not in k),
    )
    figure("schemathesis statuses", dict(sorted((k.split()[-1], v) for k, v in seen.items()
                                                if k.startswith("schemathesis status"))))  # fmt: skip


def check(client: httpx.Client, path: str, body: Any, raw: bytes | None = None) -> None:
    content = raw if raw is not None else json.dumps(body).encode()
    resp = client.post(path, content=content, headers={"Content-Type": "application/json"})
    seen[f"case {path}"] += 1
    seen[f"status {resp.status_code}"] += 1
    assert resp.status_code < 500, (path, content[:300], resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, resp.text[:300]
        assert isinstance(error["message"], str) and error["message"], resp.text[:300]
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-300:]
    else:
        assert "error" not in resp.json(), resp.text[:300]


# No shrinking: a failing case is shown as found (each case is a real request; shrinking would take minutes).
FUZZ = settings(max_examples=int(120 * SCALE), deadline=None, database=None, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip


@FUZZ
@given(body=chat_bodies())
def test_generated_chat_bodies_never_get_a_5xx(client: httpx.Client, body: Any) -> None:
    check(client, "/chat/completions", body)


@settings(FUZZ, max_examples=int(60 * SCALE))
@given(body=text_bodies())
def test_generated_completion_bodies_never_get_a_5xx(client: httpx.Client, body: Any) -> None:
    check(client, "/completions", body)


@settings(FUZZ, max_examples=int(40 * SCALE))
@given(body=embedding_bodies())
def test_generated_embedding_bodies_never_get_a_5xx(client: httpx.Client, body: Any) -> None:
    check(client, "/embeddings", body)


@settings(FUZZ, max_examples=int(30 * SCALE))
@given(raw=st.binary(max_size=300), path=st.sampled_from(["/chat/completions", "/completions", "/embeddings"]))
def test_raw_bytes_are_a_4xx(client: httpx.Client, raw: bytes, path: str) -> None:
    check(client, path, None, raw)


def test_the_fuzzing_reached_the_engines_and_the_validation(client: httpx.Client) -> None:
    """The cases above were not all refused at the door: some were served, some refused as bad input."""
    assert seen["status 200"] > 0 and seen["status 400"] > 0, dict(seen)
    assert seen["status 401"] == seen["status 403"] == 0, dict(seen)


DOCUMENT = schemathesis.openapi.from_dict(openapi.document("public"))  # what the public tap serves (checked below)
OPERATIONS = [result.ok() for result in DOCUMENT.get_all_operations()]
SERVED_CHECKS = [getattr(schemathesis.checks, name) for name in ("not_a_server_error", "status_code_conformance",
                 "content_type_conformance", "response_schema_conformance", "negative_data_rejection")]  # fmt: skip
MODELS = {"/v1/chat/completions": MODEL, "/v1/completions": MODEL, "/v1/embeddings": EMBEDDING_MODEL}


def test_the_gateway_serves_its_openapi_document(stack: Stack) -> None:
    served = httpx.get(stack.base_url + "/openapi.json", timeout=30)  # open, as /health
    assert served.status_code == 200 and served.json() == openapi.document("public"), served.text[:300]
    assert {op.label for op in OPERATIONS} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                               "POST /v1/embeddings", "GET /v1/models"}  # fmt: skip


@pytest.mark.parametrize(
    ("operation", "mode"),
    [(op, mode) for op in OPERATIONS for mode in ("positive", "negative") if mode == "positive" or op.method == "post"],
    ids=lambda x: x if isinstance(x, str) else x.label,
)
@settings(FUZZ, max_examples=int(6 * SCALE))
@given(data=st.data())
def test_the_served_openapi_document_holds(
    client: httpx.Client, stack: Stack, operation: Any, mode: str, data: st.DataObject
) -> None:
    """Schemathesis cases from the document: positive ones (valid bodies reach the engine, with the served
    model and a tiny length) and, for bodies, negative ones (which the gateway must refuse with a 4xx)."""
    from schemathesis.generation.modes import GenerationMode

    case = data.draw(operation.as_strategy(GenerationMode(mode)))
    body = case.body
    if mode == "positive" and isinstance(body, dict) and case.path in MODELS:
        body["model"] = MODELS[case.path]
        for field in ("max_tokens", "max_completion_tokens", "min_tokens", "n"):
            if field in body or field == "max_tokens":
                body[field] = (
                    min(body[field], 2) if type(body.get(field)) is int else (0 if field == "min_tokens" else 2)
                )
    response = case.call(base_url=stack.base_url, headers={"Authorization": client.headers["authorization"]})
    seen[f"schemathesis {case.method} {case.path}"] += 1
    seen[f"schemathesis status {response.status_code}"] += 1
    case.validate_response(response, checks=SERVED_CHECKS)

"""The pipe, end to end: official openai client -> Serve gateway -> model deployment -> vLLM CPU engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.integration.conftest import MODEL, TAP_REPLICAS, Stack

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key=stack.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(model_dir)


def test_lists_the_default_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "all-minilm-l6-v2"]  # configs/local.yaml's chat and embedding models
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_answers_with_exact_usage(client: openai.OpenAI, tokenizer: object) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tokenizer(prompt_ids, add_special_tokens=False).input_ids)  # type: ignore[operator]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_shapes_and_usage_equal_engine_counts(client: openai.OpenAI) -> None:
    max_tokens = 12
    plain = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=max_tokens, seed=1, stop=["\n\n\n\n"]
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=max_tokens,
            seed=1,
            stop=["\n\n\n\n"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert content_chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.usage is None for c in content_chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == plain.choices[0].message.content
    assert plain.usage is not None
    assert usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == plain.usage.completion_tokens
    if plain.choices[0].finish_reason == "length":
        assert usage_chunk.usage.completion_tokens == max_tokens


def test_stream_ends_with_done(stack: Stack) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", stack.v1 + "/chat/completions", json=body, headers=stack.headers, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_every_completion_says_its_overhead_outside_the_engine(stack: Stack) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    for stream in (False, True):
        t0 = time.monotonic()
        resp = httpx.post(stack.v1 + "/chat/completions", json={**body, "stream": stream}, headers=stack.headers,
                          timeout=120)  # fmt: skip
        elapsed_ms = (time.monotonic() - t0) * 1000
        assert resp.status_code == 200, resp.text
        overhead = float(resp.headers["x-orch-overhead-ms"])
        assert 0.0 <= overhead < elapsed_ms, (stream, overhead, elapsed_ms)


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.object == "text_completion"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert reply.choices[0].finish_reason == "length"
    streamed = list(
        client.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens == 8


def test_max_tokens_negative_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=-1)
    assert err.value.status_code == 400
    assert err.value.param == "max_tokens"
    assert err.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "' + MODEL.encode() + b'"}', "messages"),
        (b"this is not json", None),
        (b'{"model": "' + MODEL.encode() + b'", "messages": [], "n": 1}', "messages"),
        (b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "x"}], "n": 17}', "n"),
    ],
)
def test_bad_bodies_are_400_openai_shaped(stack: Stack, body: bytes, param: str | None) -> None:
    headers = {"content-type": "application/json", **stack.headers}
    resp = httpx.post(stack.v1 + "/chat/completions", content=body, headers=headers)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert err.value.code == "model_not_found"


def test_context_overflow_is_400_not_500(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    assert err.value.param == "max_tokens"


def test_unknown_route_and_method(stack: Stack) -> None:
    assert httpx.get(stack.v1 + "/nope", headers=stack.headers).status_code == 404
    resp = httpx.get(stack.v1 + "/chat/completions", headers=stack.headers)
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_health(stack: Stack) -> None:
    resp = httpx.get(stack.base_url + "/health", timeout=30)
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


def _engine_stats() -> dict[str, int]:
    """The engines' counts summed over the tap's replicas (a handle call answers from any one)."""
    from ray import serve

    handle = serve.get_deployment_handle(f"model-{MODEL}", app_name="public")
    seen: dict[str, dict[str, int]] = {}
    deadline = time.monotonic() + 300  # a replica replaced by an earlier test may still be starting its engine
    while len(seen) < TAP_REPLICAS and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats.pop("replica")] = stats
        time.sleep(0.05)
    assert len(seen) == TAP_REPLICAS, seen
    counts = [name for name, value in next(iter(seen.values())).items() if isinstance(value, int)]
    return {name: sum(s[name] for s in seen.values()) for name in counts}  # the engine's counts, not the queue's


def test_disconnect_mid_stream_aborts_the_engine_request(stack: Stack, ray_driver: None) -> None:
    before = _engine_stats()  # also warms the handle: its first call can take seconds
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    body = {"model": MODEL, "messages": story, "max_tokens": 1800, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", stack.v1 + "/chat/completions", json=body, headers=stack.headers, timeout=120) as resp:
        assert resp.status_code == 200
        received = 0
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                received += 1
                chunk = json.loads(line[6:])
                assert chunk["choices"][0]["finish_reason"] is None, chunk
            if received >= 5:
                break
    # Leaving the block closed the connection mid-stream, 5 chunks into 1800 tokens.
    deadline = time.monotonic() + 30
    stats = _engine_stats()
    while time.monotonic() < deadline and (
        stats["aborted"] == before["aborted"] or stats["unfinished"] or stats["running"]
    ):
        time.sleep(0.2)
        stats = _engine_stats()
    assert stats["aborted"] == before["aborted"] + 1, (before, stats)
    assert stats["unfinished"] == 0 and stats["running"] == 0, stats
    # The engine still serves.
    body = {"model": MODEL, "prompt": "a", "max_tokens": 2}
    reply = httpx.post(stack.v1 + "/completions", json=body, headers=stack.headers, timeout=60)
    assert reply.status_code == 200

"""Gateway logic without Ray: error mapping and SSE framing over a fake stream (named as such)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from openai.types.chat import ChatCompletionChunk
from ray.exceptions import ActorDiedError, RayTaskError
from starlette.requests import Request

from apps.wire import api_error, read_body, sse_frames
from orch.billing import Principal
from orch.engine import Delta
from orch.errors import EngineUnavailable, InvalidRequest, PayloadTooLarge
from orch.ledger import Price
from orch.metering import Meter
from orch.responses import ChunkWriter


class FakeStream:
    """Stands in for a DeploymentResponseGenerator: yields deltas, may fail, records cancel()."""

    def __init__(self, deltas: list[Delta], fail_after: int | None = None) -> None:
        self._deltas = deltas
        self._fail_after = fail_after
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[Delta]:
        for i, delta in enumerate(self._deltas):
            if self._fail_after is not None and i >= self._fail_after:
                raise ActorDiedError()
            yield delta

    def cancel(self) -> None:
        self.cancelled = True


async def _drain(gen: AsyncIterator[bytes], limit: int | None = None) -> bytes:
    out = b""
    n = 0
    async for part in gen:
        out += part
        n += 1
        if limit is not None and n >= limit:
            break
    return out


def _frames(raw: bytes) -> list[dict]:
    return [json.loads(p[6:]) for p in raw.split(b"\n\n") if p.startswith(b"data: {")]


def test_api_errors_pass_through_and_ray_failures_are_503() -> None:
    err = InvalidRequest("bad", param="max_tokens")
    assert api_error(err) is err
    assert isinstance(api_error(ActorDiedError()), EngineUnavailable)
    assert api_error(ActorDiedError()).status == 503
    assert api_error(ValueError("boom")).status == 500
    assert "boom" not in api_error(ValueError("boom")).message


def test_api_error_unwraps_ray_task_errors() -> None:
    cause = InvalidRequest("too long", param="max_tokens", code="context_length_exceeded")
    wrapped = RayTaskError("generate", "traceback", cause)
    err = api_error(wrapped)
    assert (err.status, err.param, err.code) == (400, "max_tokens", "context_length_exceeded")


class FakeSettle:
    """Stands in for Gateway._settle: records (status, tokens seen) per call, returns a done task."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, meter: Meter, status: str) -> asyncio.Future[None]:
        assert meter.last is not None
        self.calls.append((status, meter.last.completion_tokens))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _meter(first: Delta) -> Meter:
    meter = Meter(Principal("t-1", "k", "public"), "m", Price(1, 1), "chatcmpl-x", "hold-chatcmpl-x")
    meter.last = first
    return meter


def test_sse_streams_a_whole_completion_and_settles_before_done() -> None:
    stream = FakeStream([Delta("is", 10, 2), Delta(".", 10, 3, "stop")])
    writer = ChunkWriter(chat=True, request_id="chatcmpl-x", model="m", include_usage=True)
    settle = FakeSettle()
    raw = asyncio.run(_drain(sse_frames(writer, _meter(Delta("Par", 10, 1)), stream, settle)))  # type: ignore[arg-type]
    chunks = [ChatCompletionChunk.model_validate(f) for f in _frames(raw)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Paris."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert raw.endswith(b"data: [DONE]\n\n") and not stream.cancelled
    assert settle.calls == [("ok", 3)]


def test_sse_reports_engine_failure_in_band_and_settles_what_was_produced() -> None:
    stream = FakeStream([Delta("a", 1, 2), Delta("b", 1, 3)], fail_after=1)
    writer = ChunkWriter(chat=False, request_id="cmpl-x", model="m", include_usage=False)
    settle = FakeSettle()
    raw = asyncio.run(_drain(sse_frames(writer, _meter(Delta("x", 1, 1)), stream, settle)))  # type: ignore[arg-type]
    assert _frames(raw)[-1]["error"]["type"] == "service_unavailable_error"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert settle.calls == [("error", 2)]


def test_sse_closed_early_cancels_the_engine_stream_and_settles_as_aborted() -> None:
    stream = FakeStream([Delta("b", 1, i) for i in range(2, 50)])
    writer = ChunkWriter(chat=True, request_id="chatcmpl-x", model="m", include_usage=False)
    settle = FakeSettle()

    async def client_goes_away() -> None:
        gen = sse_frames(writer, _meter(Delta("a", 1, 1)), stream, settle)  # type: ignore[arg-type]
        await _drain(gen, limit=3)
        await gen.aclose()  # what the server does when the client disconnects

    asyncio.run(client_goes_away())
    assert stream.cancelled
    assert settle.calls == [("aborted", 3)]


def test_sse_of_a_one_delta_completion_closed_at_once_still_settles() -> None:
    stream = FakeStream([])
    writer = ChunkWriter(chat=True, request_id="chatcmpl-x", model="m", include_usage=False)
    settle = FakeSettle()

    async def client_goes_away() -> None:
        gen = sse_frames(writer, _meter(Delta("Hi.", 5, 1, "stop")), stream, settle)  # type: ignore[arg-type]
        await _drain(gen, limit=1)
        await gen.aclose()

    asyncio.run(client_goes_away())
    assert settle.calls == [("aborted", 1)]


def _request(headers: dict[str, str], chunks: list[bytes]) -> tuple[Request, list[int]]:
    """A Starlette request whose body arrives in ``chunks``; counts the receive() calls."""
    received: list[int] = []

    async def receive() -> dict[str, object]:
        received.append(1)
        i = len(received) - 1
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    scope = {
        "type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip
    return Request(scope, receive), received


def test_a_body_declared_over_the_limit_is_refused_before_it_is_read() -> None:
    request, received = _request({"content-length": str(20 << 20)}, [b"x" * 1024])
    with pytest.raises(PayloadTooLarge) as err:
        asyncio.run(read_body(request))
    assert err.value.status == 413 and err.value.body()["error"]["code"] == "request_too_large"
    assert received == []


def test_a_streamed_body_is_cut_off_once_past_the_limit() -> None:
    request, received = _request({}, [b"x" * 1000] * 100)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(request, limit=4500))
    assert len(received) == 5  # stopped at the chunk that crossed the limit, not at the end
    request, _ = _request({"content-length": "3"}, [b"{}", b" "])
    assert asyncio.run(read_body(request, limit=4500)) == b"{} "

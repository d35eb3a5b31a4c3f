"""HTTP in and out of the OpenAI front: bodies read within a limit, errors in OpenAI's shape, and the SSE
stream of one completion that settles however it ends (``apps/gateway.py`` maps routes onto these)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import RayError, RayTaskError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from actors.ledger import LedgerUnavailable
from apps.model_port import ModelStream
from orch.errors import APIError, EngineUnavailable, InternalError, PayloadTooLarge
from orch.metering import Meter
from orch.responses import ChunkWriter

MAX_BODY_BYTES = 4 << 20  # 4 MiB: far past any prompt a model here can take (see prompt_token_bound)


def api_error(exc: BaseException) -> APIError:
    """The OpenAI-shaped error for any exception: API errors as raised, engine/Ray failures as 503."""
    if isinstance(exc, RayTaskError):
        exc = exc.cause if exc.cause is not None else exc
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LedgerUnavailable):
        return EngineUnavailable("Billing is unavailable right now; retry later.", code="ledger_unavailable")
    if isinstance(exc, RayError):
        return EngineUnavailable("The model is unavailable right now; retry later.", code="engine_unavailable")
    return InternalError("The server had an error while processing your request.", code="internal_error")


def error_response(err: APIError) -> Response:
    return Response(err.to_json(), status_code=err.status, media_type="application/json", headers=err.headers())


class SettlingStream(StreamingResponse):
    """An SSE response that settles its request however the response ends: Starlette never closes a
    body generator it did not start (a client gone before the first byte), so this does."""

    def __init__(
        self, meter: Meter, stream: Any, settle: Callable[[Meter, str], Any], body: AsyncIterator[bytes]
    ) -> None:
        # Headers go out with the first delta: the overhead up to the first token.
        super().__init__(body, media_type="text/event-stream", headers=overhead_header(meter))
        self._meter, self._stream, self._settle_fn = meter, stream, settle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._meter.settled is None:
                self._stream.cancel()
                self._settle_fn(self._meter, "aborted")


OVERHEAD_HEADER = "x-orch-overhead-ms"


def overhead_header(meter: Meter) -> dict[str, str]:
    """Every completion says what the tap cost it: time in the gateway and its hops, outside the engine."""
    return {OVERHEAD_HEADER: f"{meter.overhead_ms():.1f}", **meter.headers}


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused (413) as soon as it is known to be over ``limit``: by its
    Content-Length before reading, else while reading the stream."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than {limit} bytes.", code="request_too_large")


async def sse_frames(
    writer: ChunkWriter, meter: Meter, stream: ModelStream, settle: Callable[[Meter, str], Any]
) -> AsyncIterator[bytes]:
    """SSE frames of one completion from its first delta on. A disconnect closes this generator, which
    cancels the engine request and settles the tokens produced so far ("aborted"); an engine failure
    is reported in-band and settled as "error"; a finished stream is settled before ``[DONE]``."""
    assert meter.last is not None
    first = meter.last
    finished = False
    try:
        yield writer.first() + writer.delta(
            first.text, first.finish_reason, first.logprobs, first.index, first.tool_calls
        )
        async for delta in stream:  # to its end, even after a final first delta: a local engine's generator closes
            meter.last = delta
            yield writer.delta(delta.text, delta.finish_reason, delta.logprobs, delta.index, delta.tool_calls)
        finished = True
    except Exception as exc:
        finished = True  # the stream is over; only the report is left
        stream.cancel()
        settle(meter, "error")
        # Headers are gone: report in-band, as vLLM's server does.
        yield writer.error(api_error(exc).body()) + writer.DONE
        return
    finally:
        if not finished:
            stream.cancel()
            settle(meter, "aborted")
    await asyncio.shield(settle(meter, "ok"))
    if writer.include_usage:
        yield writer.usage(meter.last.prompt_tokens, meter.last.completion_tokens)
    yield writer.DONE

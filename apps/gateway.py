"""The OpenAI-compatible ingress of a tap: routes map HTTP to calls, results and errors back to HTTP.

``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /health``. Completions stream from the model deployment through a streaming
``DeploymentHandle``; the gateway waits for the first delta before answering, so a bad request or a
failed engine still gets its own status instead of a broken 200 stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orch.engine import Delta, GenerationRequest
from orch.errors import APIError, EngineUnavailable, InternalError, MethodNotAllowed, NotFound
from orch.protocol import (
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    chat_completion,
    new_id,
    parse_request,
    text_completion,
)

log = logging.getLogger("ray.serve")

Handler = Callable[[Request, str], Awaitable[Response]]


def api_error(exc: BaseException) -> APIError:
    """The OpenAI-shaped error for any exception: API errors as raised, engine/Ray failures as 503."""
    if isinstance(exc, RayTaskError):
        exc = exc.cause if exc.cause is not None else exc
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RayError):
        return EngineUnavailable("The model is unavailable right now; retry later.", code="engine_unavailable")
    return InternalError("The server had an error while processing your request.", code="internal_error")


def error_response(err: APIError) -> Response:
    return Response(err.to_json(), status_code=err.status, media_type="application/json")


@serve.deployment(logging_config={"enable_access_log": False})
class Gateway:
    def __init__(self, models: dict[str, DeploymentHandle], tap: str = "public") -> None:
        self._models = models
        self._tap = tap
        self._created = int(time.time())
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/models": {"GET": self._list_models},
            "/health": {"GET": self._health},
        }

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.removeprefix(request.scope.get("root_path", "")).rstrip("/") or "/"
        try:
            methods, arg = self._route(path)
            handler = methods.get(request.method)
            if handler is None:
                raise MethodNotAllowed(f"Method {request.method} is not allowed on {path}.", code="method_not_allowed")
            return await handler(request, arg)
        except Exception as exc:
            err = api_error(exc)
            if err.status >= 500:
                log.warning("%s %s failed: %s", request.method, path, type(exc).__name__)
            return error_response(err)

    def _route(self, path: str) -> tuple[dict[str, Handler], str]:
        if path in self._routes:
            return self._routes[path], ""
        if path.startswith("/v1/models/"):
            return {"GET": self._get_model}, path.removeprefix("/v1/models/")
        raise NotFound(f"Unknown path {path}.", code="unknown_url")

    # ---- models and health ------------------------------------------------------------------------

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self._created, "owned_by": "llama-orch"}

    async def _list_models(self, request: Request, _: str) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(name) for name in self._models]})

    async def _get_model(self, request: Request, name: str) -> Response:
        self._handle(name)
        return JSONResponse(self._model_card(name))

    async def _health(self, request: Request, _: str) -> Response:
        checks = [handle.check_health.remote() for handle in self._models.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*checks), timeout=10)
        except Exception as exc:
            raise EngineUnavailable(f"unhealthy: {type(exc).__name__}", code="unhealthy") from None
        return JSONResponse({"status": "ok", "models": list(self._models)})

    def _handle(self, model: str) -> DeploymentHandle:
        handle = self._models.get(model)
        if handle is None:
            raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return handle

    # ---- completions ------------------------------------------------------------------------------

    async def _chat(self, request: Request, _: str) -> Response:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await request.body())
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await self._complete(req, new_id("chatcmpl"), chat=True, messages=messages)

    async def _completions(self, request: Request, _: str) -> Response:
        req: CompletionRequest = parse_request(CompletionRequest, await request.body())
        return await self._complete(req, new_id("cmpl"), chat=False, prompt=req.prompt)

    async def _complete(
        self, req: ChatCompletionRequest | CompletionRequest, request_id: str, *, chat: bool, **prompt: Any
    ) -> Response:
        handle = self._handle(req.model)
        gen = GenerationRequest(
            request_id=request_id,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            **prompt,
        )
        stream: DeploymentResponseGenerator = handle.options(stream=True).generate.remote(gen)
        try:
            first: Delta = await stream.__anext__()
        except BaseException:
            stream.cancel()
            raise
        if req.stream:
            writer = ChunkWriter(chat=chat, request_id=request_id, model=req.model, include_usage=req.include_usage)
            return StreamingResponse(_sse(writer, first, stream), media_type="text/event-stream")
        return await _collect(req.model, request_id, chat, first, stream)


async def _collect(
    model: str, request_id: str, chat: bool, first: Delta, stream: DeploymentResponseGenerator
) -> Response:
    parts, last = [first.text], first
    try:
        async for delta in stream:
            parts.append(delta.text)
            last = delta
    except BaseException:
        stream.cancel()
        raise
    build = chat_completion if chat else text_completion
    body = build(request_id, model, "".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens)
    return JSONResponse(body)


async def _sse(writer: ChunkWriter, first: Delta, stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """SSE frames of one completion; a disconnect cancels this generator, which cancels the engine request."""
    last = first
    done = first.finish_reason is not None
    try:
        yield writer.first() + writer.delta(first.text, first.finish_reason)
        if not done:
            async for delta in stream:
                last = delta
                yield writer.delta(delta.text, delta.finish_reason)
        done = True
    except Exception as exc:
        # Headers are gone: report in-band, as vLLM's server does.
        yield writer.error(api_error(exc).body()) + writer.DONE
        return
    finally:
        if not done:
            stream.cancel()
    if writer.include_usage:
        yield writer.usage(last.prompt_tokens, last.completion_tokens)
    yield writer.DONE

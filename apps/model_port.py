"""How the OpenAI front reaches a model: through a Serve handle, or in its own process.

The front (``apps/gateway.py``) sees a model as a :class:`ModelPort`: a stream of deltas per request,
embeddings (a pooling model), the prompt limits, a health check. :class:`HandleModel` is the model
deployment behind a streaming ``DeploymentHandle`` (one Ray hop per chunk; the front scales apart);
:class:`LocalModel` is an engine in the front's own replica (``apps/tap_replica.py``: no hop at all).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ray.serve.handle import DeploymentHandle

from actors.model import ModelActor
from orch.billing import PromptLimits
from orch.embeddings import Embedded, EmbeddingJob
from orch.engine import Delta, GenerationRequest


class ModelStream(Protocol):
    """The deltas of one request; ``cancel()`` stops it and aborts the engine request."""

    def __aiter__(self) -> AsyncIterator[Delta]: ...
    async def __anext__(self) -> Delta: ...
    def cancel(self) -> None: ...


class ModelPort(Protocol):
    def stream(self, request: GenerationRequest) -> ModelStream: ...
    async def embed(self, job: EmbeddingJob) -> Embedded: ...
    async def limits(self) -> PromptLimits: ...
    async def check_health(self) -> None: ...


class HandleModel:
    """A model deployment through its handle. The streaming handle is made once: ``options()`` builds a
    new handle, which costs time on every request (Ray Serve LLM keeps them too)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)

    def stream(self, request: GenerationRequest) -> ModelStream:
        return self._stream.generate.remote(request)  # type: ignore[return-value]  # stream=True: a DeploymentResponseGenerator

    async def embed(self, job: EmbeddingJob) -> Embedded:
        return await self._handle.embed.remote(job)  # type: ignore[no-any-return]

    async def limits(self) -> PromptLimits:
        return await self._handle.limits.remote()  # type: ignore[no-any-return]

    async def check_health(self) -> None:
        await self._handle.check_health.remote()


class LocalModel:
    """The engine of this very replica: deltas go from the engine's output handler to the SSE writer
    with no serialisation and no Ray hop."""

    def __init__(self, actor: ModelActor) -> None:
        self._actor = actor
        self._closing: set[asyncio.Task[None]] = set()  # cancels in flight (a task needs a reference)

    def stream(self, request: GenerationRequest) -> ModelStream:
        return LocalStream(self._actor.generate(request), request.request_id, self._cancel)

    async def embed(self, job: EmbeddingJob) -> Embedded:
        return await self._actor.embed(job)

    async def limits(self) -> PromptLimits:
        return self._actor.limits()

    async def check_health(self) -> None:
        await self._actor.check_health()

    def _cancel(self, gen: AsyncIterator[Delta], request_id: str) -> None:
        task = asyncio.ensure_future(self._close(gen, request_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, gen: Any, request_id: str) -> None:
        try:
            await gen.aclose()  # vLLM aborts the request when its generator is closed
        except RuntimeError:
            pass  # still running in another task: that task's cancellation closes it
        await self._actor.abort(request_id)  # and in any case: aborting a finished request is a no-op


class LocalStream:
    """One request's deltas from the local engine, with the ``cancel()`` of a Serve response generator."""

    def __init__(self, gen: AsyncIterator[Delta], request_id: str, cancel: Any) -> None:
        self._gen, self._request_id, self._cancel = gen, request_id, cancel
        self._cancelled = False

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> Delta:
        return await self._gen.__anext__()

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._cancel(self._gen, self._request_id)

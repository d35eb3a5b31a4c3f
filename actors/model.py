"""ModelActor: one engine's lifecycle (start, health, stats, shutdown) and its generate stream.

A thin shell: the engine does the work. Serve hosts it as the model deployment
(``apps/model_server.py``); tests can drive it directly without Ray.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from orch.config import ModelConfig
from orch.engine import Delta, Engine, EngineStats, GenerationRequest, VLLMEngine
from orch.models import resolve_model_source

log = logging.getLogger(__name__)


class ModelActor:
    """Hosts one engine serving ``config.name``.

    >>> actor = ModelActor(ModelConfig(name="smollm2-135m-instruct"), Path(".orch"))  # doctest: +SKIP
    >>> await actor.start()  # doctest: +SKIP
    """

    def __init__(self, config: ModelConfig, data_dir: Path, engine: Engine | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.engine: Engine = engine or VLLMEngine(
            resolve_model_source(config.source, data_dir), config.engine, stream_interval=config.stream_interval
        )

    async def start(self) -> None:
        await self.engine.start()

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self.engine.generate(request)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        await self.engine.check_health()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

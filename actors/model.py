"""ModelActor: one engine's lifecycle (start, health, stats, shutdown), its generate stream, or its
embeddings for a pooling model (``task: embed``).

A thin shell: the engine does the work. Serve hosts it as the model deployment
(``apps/model_server.py``); tests can drive it directly without Ray.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray

from orch.billing import PromptLimits
from orch.config import EngineConfig, ModelConfig
from orch.embeddings import Embedded, EmbeddingJob
from orch.engine import Delta, Engine, EngineStats, GenerationRequest, VLLMEngine
from orch.engine_guard import start_guard, stop_guard
from orch.models import cuda_available, resolve_model_source
from orch.startup import EngineStartError, describe, own_log_tail
from orch.tapspec import effective_tensor_parallel

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
def _bundle_gpu_ids() -> list[str]:
    return [str(i) for i in ray.get_gpu_ids()]


class ModelActor:
    """Hosts one engine serving ``config.name``.

    >>> actor = ModelActor(ModelConfig(name="smollm2-135m-instruct"), Path(".orch"))  # doctest: +SKIP
    >>> await actor.start()  # doctest: +SKIP
    """

    def __init__(self, config: ModelConfig, data_dir: Path, engine: Engine | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.note: str | None = None
        engine_config = config.engine
        if config.gpus:
            tp, self.note = effective_tensor_parallel(config.gpus, cuda_available())
            extra = {"distributed_executor_backend": "ray"} if tp > 1 else {}
            engine_config = engine_config.model_copy(
                update={"tensor_parallel_size": tp, "extra_args": {**extra, **engine_config.extra_args}}
            )
            if self.note:
                log.warning("%s: %s", config.name, self.note)
        self.engine_config = engine_config
        self.engine: Engine = engine or self._engine(resolve_model_source(config.source, data_dir), engine_config)
        self._guarded = engine is None  # vLLM's processes: ended by a guard if this process dies hard
        self._guard: subprocess.Popen[bytes] | None = None

    def _engine(self, path: str, engine_config: EngineConfig) -> Engine:
        if self.config.task == "embed":
            from orch.embeddings import VLLMEmbedder

            return VLLMEmbedder(path, engine_config)
        return VLLMEngine(path, engine_config, stream_interval=self.config.stream_interval)

    async def start(self) -> None:
        if self._guarded and self._guard is None:
            self._guard = start_guard()  # before the engine's processes exist: a kill while it starts ends them too
        try:
            await self.engine.start()
        except Exception as exc:  # one line with the root cause, for `up` and `tap` to print
            raise EngineStartError(self.config.name, describe(exc, own_log_tail())) from exc

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self.engine.generate(request)

    async def embed(self, job: EmbeddingJob) -> Embedded:
        return await self.engine.embed(job)  # type: ignore[no-any-return]

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        await self.engine.check_health()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def limits(self) -> PromptLimits:
        return self.engine.limits()

    def describe(self) -> dict[str, Any]:
        """Node, the GPU ids of this replica's group (asked of each bundle, as vLLM's workers would see
        them), and the engine's parallelism with the note when it differs from the group."""
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = get_current_placement_group()
        gpu_ids: list[list[str]] = []
        if self.config.gpus == 1:  # the replica holds its one GPU itself
            gpu_ids = [[str(i) for i in ray.get_gpu_ids()]]
        elif pg is not None:
            probes = [
                _bundle_gpu_ids.options(  # type: ignore[attr-defined]
                    num_cpus=0,
                    num_gpus=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                ).remote()
                for i in range(len(pg.bundle_specs))
            ]
            gpu_ids = ray.get(probes, timeout=60)
        return {
            "model": self.config.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "group_gpus": self.config.gpus,
            "gpu_ids": gpu_ids,
            "tensor_parallel_size": self.engine_config.tensor_parallel_size,
            "note": self.note,
        }

    def shutdown(self) -> None:
        self.engine.shutdown()
        stop_guard(self._guard)
        self._guard = None

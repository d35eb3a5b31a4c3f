"""The model deployment: a Serve replica hosting one :class:`ModelActor` (one vLLM engine).

Replica resources and ``autoscaling_config`` come from the model's config; :func:`model_deployment`
returns the bound deployment a tap's gateway calls through a streaming ``DeploymentHandle``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from actors.gpu_group import GPUGroup
from actors.model import ModelActor
from apps.reporting import keep_reporting
from orch.billing import PromptLimits
from orch.config import ModelConfig
from orch.embeddings import Embedded, EmbeddingJob
from orch.engine import Delta, GenerationRequest
from orch.routing import router_config

log = logging.getLogger("ray.serve")


class ModelHost:
    """The handle methods of a replica hosting one engine (also ``apps/tap_replica.py``'s)."""

    _actor: ModelActor
    RECENT = 256  # request ids this replica remembers having served (stats: which replica took a request)

    async def _start_engine(self, config: dict[str, Any], data_dir: str) -> None:
        self._recent: deque[str] = deque(maxlen=self.RECENT)
        self._actor = ModelActor(ModelConfig.model_validate(config), Path(data_dir))
        await self._actor.start()
        keep_reporting(self)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self._recent.append(request.request_id)
        async for delta in self._actor.generate(request):
            yield delta

    def record_routing_stats(self) -> dict[str, Any]:
        """What Serve passes to the model's router (``apps/router.py``): the engine's outstanding work."""
        s = self._actor.stats()
        return {"running": s.running, "waiting": s.waiting}

    async def embed(self, job: EmbeddingJob) -> Embedded:
        return await self._actor.embed(job)

    async def abort(self, request_id: str) -> None:
        await self._actor.abort(request_id)

    def stats(self, replica_id: str | None = None) -> dict[str, Any]:
        """The engine's counts, the request ids this replica served last, and which replica answered (a
        handle call reaches any of them; with ``routing`` set, ``replica_id`` picks one: ``apps/router.py``)."""
        replica = serve.get_replica_context().replica_id.unique_id
        return dataclasses.asdict(self._actor.stats()) | {"replica": replica, "recent_requests": list(self._recent)}

    def limits(self) -> PromptLimits:
        return self._actor.limits()

    def describe(self) -> dict[str, Any]:
        """Where this replica runs: node, GPU ids of its group (one per bundle), engine parallelism."""
        return self._actor.describe()

    async def check_health(self) -> None:
        await self._actor.check_health()

    def _stop_engine(self) -> None:
        actor = getattr(self, "_actor", None)  # None: the engine never started
        if actor is not None:
            actor.shutdown()


@serve.deployment(logging_config={"enable_access_log": False})
class ModelServer(ModelHost):
    async def __init__(self, config: dict[str, Any], data_dir: str) -> None:  # type: ignore[misc]  # Serve awaits it
        await self._start_engine(config, data_dir)

    def __del__(self) -> None:
        self._stop_engine()


def deployment_name(config: ModelConfig) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", config.name)


def model_options(config: ModelConfig, extra_cpus: float = 0.0) -> dict[str, Any]:
    """Serve options of a replica hosting ``config``'s engine: its resources (plus ``extra_cpus``) and
    autoscaling from config; with ``gpus`` each replica holds a GPU group of its own (see
    ``actors/gpu_group.py``)."""
    group: dict[str, Any] = {}
    if config.gpus:
        group = GPUGroup(config.gpus, config.num_cpus + extra_cpus).serve_options()
    options: dict[str, Any] = {"num_cpus": config.num_cpus + extra_cpus}
    if config.num_gpus:
        options["num_gpus"] = config.num_gpus
    routing = router_config(config.routing)
    return {
        "name": deployment_name(config),
        "ray_actor_options": group.pop("ray_actor_options", options),
        **group,
        "autoscaling_config": config.autoscaling.serve_dict(),
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 5,
        **({"request_router_config": routing} if routing is not None else {}),
    }


def model_deployment(config: ModelConfig, data_dir: Path) -> Application:
    """Binds the deployment of one model, which a gateway calls through its handle."""
    return ModelServer.options(**model_options(config)).bind(config.model_dump(), str(data_dir))  # type: ignore[attr-defined]

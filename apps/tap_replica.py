"""A single-model tap whose OpenAI front runs inside each model replica (``gateway.colocate: true``).

Each replica hosts one engine and the tap's routes: Serve's proxy routes HTTP across the replicas and
autoscales them on their ongoing requests, as it does for the model deployment alone, and a token goes
from the engine's output handler to the SSE writer in the same process: no Ray hop and no
serialisation per chunk (``apps/gateway.py``'s :class:`Gateway` pays one of each). Admission, leases and
settles are the gateway's, per replica. The deployment keeps the model deployment's name
(``model-<name>``) and handle methods, so ``describe``, ``stats`` and ``generate`` answer as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from apps.gateway import SHUTDOWN_DRAIN_S, OpenAIFront
from apps.model_port import LocalModel
from apps.model_server import ModelHost, model_options
from orch.config import TapConfig


@serve.deployment(logging_config={"enable_access_log": False})
class TapReplica(ModelHost, OpenAIFront):
    async def __init__(self, model: dict[str, Any], data_dir: str, config: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        await self._start_engine(model, data_dir)
        await self._open({self._actor.config.name: LocalModel(self._actor)}, config)

    async def __del__(self) -> None:
        try:
            await self._close()
        finally:
            self._stop_engine()


def tap_replica_deployment(config: TapConfig, data_dir: Path) -> Application:
    """Binds the tap's one model with its front inside: the model's resources plus the gateway's CPUs,
    the model's autoscaling, the gateway's shutdown drain."""
    (model,) = config.models
    options = model_options(model, extra_cpus=config.gateway.num_cpus)
    options["graceful_shutdown_timeout_s"] = SHUTDOWN_DRAIN_S + 10
    tap = config.model_dump(mode="json") | {"data_dir": str(data_dir)}
    return TapReplica.options(**options).bind(model.model_dump(), str(data_dir), tap)  # type: ignore[attr-defined]

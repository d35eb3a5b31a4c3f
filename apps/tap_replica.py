"""A tap whose OpenAI front runs inside each replica of its one generating model (``gateway.colocate``).

Each replica hosts one engine and the tap's routes: Serve's proxy routes HTTP across the replicas and
autoscales them on their ongoing requests, as it does for the model deployment alone, and a token goes
from the engine's output handler to the SSE writer in the same process: no Ray hop and no
serialisation per chunk (``apps/gateway.py``'s :class:`Gateway` pays one of each). Admission, leases and
settles are the gateway's, per replica. The deployment keeps the model deployment's name
(``model-<name>``) and handle methods, so ``describe``, ``stats`` and ``generate`` answer as before.
The tap's embedding models keep deployments of their own, reached through their handles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from apps.gateway import SHUTDOWN_DRAIN_S, OpenAIFront
from apps.model_port import HandleModel, LocalModel, ModelPort
from apps.model_server import ModelHost, model_deployment, model_options
from orch.admission import admission_settings
from orch.config import TapConfig


@serve.deployment(logging_config={"enable_access_log": False})
class TapReplica(ModelHost, OpenAIFront):
    async def __init__(  # type: ignore[misc]  # Serve awaits it
        self,
        model: dict[str, Any],
        data_dir: str,
        config: dict[str, Any],
        others: dict[str, DeploymentHandle] | None = None,
    ) -> None:
        """``others``: the tap's embedding models, deployments of their own reached through their handles."""
        await self._start_engine(model, data_dir)
        ports: dict[str, ModelPort] = {self._actor.config.name: LocalModel(self._actor)}
        ports |= {name: HandleModel(handle) for name, handle in (others or {}).items()}
        await self._open(ports, config)

    def stats(self, replica_id: str | None = None) -> dict[str, Any]:
        """The engine's counts and the admission queue's (``llama-orch status``)."""
        return ModelHost.stats(self) | {"admission": self.admission_stats()}

    async def __del__(self) -> None:
        try:
            await self._close()
        finally:
            self._stop_engine()


def tap_replica_deployment(config: TapConfig, data_dir: Path) -> Application:
    """Binds the tap's one model with its front inside: the model's resources plus the gateway's CPUs,
    the model's autoscaling, the gateway's shutdown drain."""
    (model,) = [m for m in config.models if m.task == "generate"]
    others = {m.name: model_deployment(m, data_dir) for m in config.models if m is not model}
    options = model_options(model, extra_cpus=config.gateway.num_cpus)
    options["graceful_shutdown_timeout_s"] = SHUTDOWN_DRAIN_S + 10
    # Serve must hand the replica every request its admission queue may hold (and the account routes'),
    # or they wait in Serve's own FIFO, where fair share and 429s can't reach them.
    gate = admission_settings(config, model)
    options["max_ongoing_requests"] = max(model.max_ongoing_requests, gate.max_running + gate.max_queue + 64)
    tap = config.model_dump(mode="json") | {"data_dir": str(data_dir)}
    return TapReplica.options(**options).bind(model.model_dump(), str(data_dir), tap, others)  # type: ignore[attr-defined]

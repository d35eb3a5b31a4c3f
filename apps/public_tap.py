"""The public tap application: one gateway over one model deployment per configured model, or (with
``gateway.colocate``) its one model's replicas each serving the front themselves.

``serve run configs/local.yaml`` calls :func:`build` with the file's ``args``; so does
``serve.run(build(args))`` in code.
"""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application

from apps.gateway import Gateway
from apps.model_server import model_deployment
from apps.tap_replica import tap_replica_deployment
from orch.config import TapConfig, data_dir, load_args


def build(args: dict[str, Any]) -> Application:
    """Builds the tap from validated args; a bad field fails with one line naming it."""
    config: TapConfig = load_args(TapConfig, args)
    root = data_dir(config.data_dir)
    if config.colocated:
        return tap_replica_deployment(config, root)
    models = {m.name: model_deployment(m, root) for m in config.models}
    return Gateway.options(  # type: ignore[attr-defined]
        num_replicas=config.gateway.num_replicas,
        ray_actor_options={"num_cpus": config.gateway.num_cpus},
        max_ongoing_requests=config.gateway.max_ongoing_requests,
    ).bind(models, config.model_dump(mode="json") | {"data_dir": str(root)})

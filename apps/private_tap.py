"""A private tap: one client's model on GPU groups of its own, its own keys, its own route.

``serve deploy configs/private_tap.example.yaml`` and ``llama-orch tap create`` both call :func:`build`
with a :class:`orch.tapspec.TapSpec` (``args:``). The app is ``private-<client>``, served at
``/private/<client>/v1`` by a gateway of its own that accepts only keys issued for this tap. With
``colocate: true`` the routes run inside each model replica instead (``apps/tap_replica.py``). With
``openai_gateway: false`` the app is the model deployment alone, reachable in the cluster only::

    handle = serve.get_deployment_handle("model-<name>", app_name="private-<client>")
    async for delta in handle.options(stream=True).generate.remote(GenerationRequest(...)): ...
"""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application

from apps.gateway import Gateway
from apps.model_server import model_deployment
from apps.tap_replica import tap_replica_deployment
from orch.config import GatewayConfig, ModelConfig, TapConfig, data_dir, load_args
from orch.tapspec import TapSpec


def tap_config(spec: TapSpec) -> TapConfig:
    """The tap config a private tap runs: one model on ``spec.gpus``-GPU groups, scaled by Serve."""
    model = ModelConfig(
        name=spec.model_name(),
        source=spec.model,
        engine=spec.engine,
        gpus=spec.gpus,
        num_cpus=spec.num_cpus,
        autoscaling=spec.autoscaling,
        price=spec.price,
        routing=spec.routing,
        max_ongoing_requests=spec.max_ongoing_requests,
        stream_interval=spec.stream_interval,
    )
    colocate = spec.colocate and spec.openai_gateway and spec.routing != "prefix" and spec.gateway_replicas == 1
    return TapConfig(
        tap=spec.app_name(),
        models=[model],
        gateway=GatewayConfig(
            colocate=colocate, num_replicas=1 if colocate else spec.gateway_replicas, admin_from=spec.admin_from
        ),
        billing=spec.billing,
        admission=spec.admission,
        hooks=spec.hooks,
        ledger_shards=spec.ledger_shards or 1,
        ledger_nodes=spec.ledger_nodes,
        data_dir=spec.data_dir,
    )


def build(args: dict[str, Any]) -> Application:
    """Builds the private tap from validated args; a bad field fails with one line naming it."""
    spec: TapSpec = load_args(TapSpec, args)
    config = tap_config(spec)
    root = data_dir(config.data_dir)
    if config.colocated:
        return tap_replica_deployment(config, root)
    model = model_deployment(config.models[0], root)
    if not spec.openai_gateway:
        return model
    return Gateway.options(  # type: ignore[attr-defined]
        num_replicas=config.gateway.num_replicas,
        ray_actor_options={"num_cpus": config.gateway.num_cpus},
        max_ongoing_requests=config.gateway.max_ongoing_requests,
    ).bind({config.models[0].name: model}, config.model_dump(mode="json") | {"data_dir": str(root)})

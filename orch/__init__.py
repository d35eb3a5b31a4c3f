"""llama-orch: an LLM serving orchestrator on Ray Serve and vLLM.

The public surface is pinned here; everything else is an implementation module
(``tests/unit/test_public_api.py`` asserts this list, so a change to it is a deliberate diff).
The SDK (:mod:`orch.sdk`: ``Client``, ``AsyncClient``, ``AdminClient`` and the typed errors a caller
catches, ``InsufficientCredits`` and ``RateLimited``) loads on first use, with the ``openai`` package;
the server's own errors of those names are in :mod:`orch.errors`.
"""

from typing import Any

from orch.config import (
    AutoscalingConfig,
    ConfigError,
    EngineConfig,
    GatewayConfig,
    ModelConfig,
    TapConfig,
)
from orch.engine import Delta, Engine, EngineStats, GenerationRequest, VLLMEngine
from orch.errors import APIError, EngineUnavailable, InvalidRequest, NotFound
from orch.models import DEFAULT_MODEL_NAME, materialise_default_model, resolve_model_source
from orch.serve_config import load_serve_config

__all__ = [
    "DEFAULT_MODEL_NAME",
    "APIError",
    "AdminClient",
    "AsyncClient",
    "Client",
    "AutoscalingConfig",
    "ConfigError",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "EngineUnavailable",
    "GatewayConfig",
    "GenerationRequest",
    "InsufficientCredits",
    "InvalidRequest",
    "ModelConfig",
    "NotFound",
    "RateLimited",
    "TapConfig",
    "VLLMEngine",
    "load_serve_config",
    "materialise_default_model",
    "resolve_model_source",
]

_SDK = {"AdminClient", "AsyncClient", "Client", "InsufficientCredits", "RateLimited"}


def __getattr__(name: str) -> Any:
    if name in _SDK:
        from orch import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'orch' has no attribute {name!r}")

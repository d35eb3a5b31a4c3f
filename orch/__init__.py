"""llama-orch: an LLM serving orchestrator on Ray Serve and vLLM.

The public surface is pinned here; everything else is an implementation module
(``tests/unit/test_public_api.py`` asserts this list, so a change to it is a deliberate diff).
"""

from orch.config import (
    AutoscalingConfig,
    ConfigError,
    EngineConfig,
    GatewayConfig,
    ModelConfig,
    TapConfig,
)
from orch.engine import Delta, Engine, EngineStats, GenerationRequest, VLLMEngine
from orch.errors import APIError, EngineUnavailable, InsufficientCredits, InvalidRequest, NotFound, RateLimited
from orch.models import DEFAULT_MODEL_NAME, materialise_default_model, resolve_model_source
from orch.serve_config import load_serve_config

__all__ = [
    "DEFAULT_MODEL_NAME",
    "APIError",
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

import orch


def test_public_surface_is_pinned() -> None:
    assert sorted(orch.__all__) == sorted(
        [
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
    )
    for name in orch.__all__:
        assert hasattr(orch, name), name


def test_importing_orch_does_not_import_the_engine() -> None:
    import subprocess
    import sys

    code = "import sys, orch; print('vllm' in sys.modules, 'ray' in sys.modules, 'torch' in sys.modules)"
    code += "; print('openai' in sys.modules); orch.Client; print('openai' in sys.modules)"  # the SDK, on use
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False", "False", "True"]

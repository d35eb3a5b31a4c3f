from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orch.config import CPU_KV_CACHE_BYTES, ConfigError, EngineConfig, TapConfig, load_args
from orch.serve_config import load_serve_config

REPO = Path(__file__).resolve().parents[2]


def test_local_yaml_validates() -> None:
    config = load_serve_config(REPO / "configs" / "local.yaml")
    args = config["applications"][0]["args"]
    tap = TapConfig.model_validate(args)
    assert tap.models[0].name == "smollm2-135m-instruct"
    assert config["http_options"]["port"] == 8000


def test_typo_fails_with_one_line_naming_the_field(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["applications"][0]["args"]["models"][0]["autoscalling"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as err:
        load_serve_config(bad)
    message = str(err.value)
    assert "\n" not in message
    assert "applications[0].args.models[0].autoscalling" in message and "unknown field" in message


def test_wrong_type_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"args\.models\[0\]\.num_cpus"):
        load_args(TapConfig, {"models": [{"name": "m", "num_cpus": "lots"}]})


def test_min_replicas_above_max_is_refused() -> None:
    with pytest.raises(ConfigError, match="min_replicas"):
        load_args(TapConfig, {"models": [{"name": "m", "autoscaling": {"min_replicas": 2, "max_replicas": 1}}]})


def test_duplicate_model_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        load_args(TapConfig, {"models": [{"name": "m"}, {"name": "m"}]})


def test_engine_kwargs_pass_extra_args_through() -> None:
    kwargs = EngineConfig(max_model_len=512, extra_args={"block_size": 32}).engine_kwargs()
    assert kwargs["max_model_len"] == 512 and kwargs["block_size"] == 32


def test_cpu_engine_without_a_kv_size_gets_a_bounded_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orch.config._cuda_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert EngineConfig().engine_kwargs()["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert EngineConfig(kv_cache_memory_bytes=1 << 26).engine_kwargs()["kv_cache_memory_bytes"] == 1 << 26
    assert "kv_cache_memory_bytes" not in EngineConfig(env={"VLLM_CPU_KVCACHE_SPACE": "2"}).engine_kwargs()


def test_gpu_engine_keeps_vllms_own_kv_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("orch.config._cuda_available", lambda: True)
    assert "kv_cache_memory_bytes" not in EngineConfig().engine_kwargs()


def test_autoscaling_maps_to_serve() -> None:
    tap = TapConfig.model_validate({"models": [{"name": "m", "autoscaling": {"min_replicas": 0, "max_replicas": 3}}]})
    assert tap.models[0].autoscaling.serve_dict()["min_replicas"] == 0


def test_colocate_serves_one_model_per_tap() -> None:
    one = {"models": [{"name": "a"}], "gateway": {"colocate": True}}
    assert TapConfig.model_validate(one).gateway.colocate
    with pytest.raises(ConfigError, match="gateway.colocate runs the front inside one generating model's"):
        load_args(TapConfig, {**one, "models": [{"name": "a"}, {"name": "b"}]})
    with_embeddings = {**one, "models": [{"name": "a"}, {"name": "e", "task": "embed"}]}
    assert TapConfig.model_validate(with_embeddings).colocated  # embedding models are reached by handle
    with pytest.raises(ConfigError, match="gateway.num_replicas does not apply with gateway.colocate"):
        load_args(TapConfig, {**one, "gateway": {"colocate": True, "num_replicas": 2}})
    # Unset, it is the fast shape wherever that shape can serve the tap.
    assert TapConfig.model_validate({"models": [{"name": "a"}]}).colocated
    assert not TapConfig.model_validate({"models": [{"name": "a"}, {"name": "b"}]}).colocated
    assert not TapConfig.model_validate({"models": [{"name": "a"}], "gateway": {"colocate": False}}).colocated


def test_a_colocated_tap_is_one_deployment_with_the_models_resources_and_the_fronts_cpus() -> None:
    """What the builders bind (no Ray started): the tap replica carries the model's name and autoscaling."""
    from apps import private_tap, public_tap

    args = {"models": [{"name": "m", "num_cpus": 1, "autoscaling": {"max_replicas": 3}}], "gateway": {"colocate": True}}
    deployment = public_tap.build(args)._bound_deployment
    assert deployment.name == "model-m" and deployment.func_or_class.__name__ == "TapReplica"
    assert deployment.ray_actor_options["num_cpus"] == 1.5  # the model's 1 and the front's 0.5
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    split = public_tap.build({**args, "gateway": {"colocate": False}})._bound_deployment
    assert split.func_or_class.__name__ == "Gateway"
    private = private_tap.build({"client": "acme", "model": "m", "gpus": 1})._bound_deployment  # colocated unless told
    assert private.func_or_class.__name__ == "TapReplica" and private.name == "model-m"
    fronted = private_tap.build({"client": "acme", "model": "m", "gpus": 1, "colocate": False})._bound_deployment
    assert fronted.func_or_class.__name__ == "Gateway"
    embeds = {"models": [*args["models"], {"name": "e", "task": "embed"}]}
    both = public_tap.build(embeds)._bound_deployment
    assert both.func_or_class.__name__ == "TapReplica" and both.name == "model-m"
    others = both.init_args[3]  # the embedding model: a deployment of its own, bound for its handle
    assert {name: app._bound_deployment.name for name, app in others.items()} == {"e": "model-e"}
    bare = private_tap.build({"client": "acme", "model": "m", "gpus": 1, "openai_gateway": False})
    assert bare._bound_deployment.func_or_class.__name__ == "ModelServer"  # no routes at all: colocate is moot

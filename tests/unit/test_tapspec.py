from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from orch.config import ConfigError, EngineConfig, load_args
from orch.models import cuda_available
from orch.tapspec import TapSpec, effective_tensor_parallel


def spec(**fields: object) -> TapSpec:
    return TapSpec.model_validate(
        {"client": "acme", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "gpus": 2} | fields
    )


def test_defaults_serve_one_replica_under_contract() -> None:
    tap = spec()
    assert (tap.autoscaling.min_replicas, tap.autoscaling.max_replicas, tap.num_cpus) == (1, 1, 1.0)
    assert tap.openai_gateway is True and tap.billing == "contract"
    assert tap.engine == EngineConfig()


def test_app_name_and_route_prefix_carry_the_client() -> None:
    tap = spec(client="acme-research-2")
    assert tap.app_name() == "private-acme-research-2"
    assert tap.route_prefix() == "/private/acme-research-2"


@pytest.mark.parametrize("client", ["Acme", "-acme", "acme_corp", "acme/x", "", "a" * 41])
def test_bad_client_names_are_refused(client: str) -> None:
    with pytest.raises(ValidationError, match="client"):
        spec(client=client)


def test_forty_character_client_is_accepted() -> None:
    assert spec(client="a" * 40).client == "a" * 40


@pytest.mark.parametrize("gpus", [0, 3, 5, 16, "two"])
def test_gpus_must_be_1_2_4_or_8(gpus: object) -> None:
    with pytest.raises(ValidationError, match="gpus"):
        spec(gpus=gpus)


def test_min_replicas_above_max_is_refused() -> None:
    with pytest.raises(ValidationError, match="min_replicas must be <= max_replicas"):
        spec(min_replicas=3, max_replicas=2)


def test_scale_to_zero_is_allowed_but_max_is_at_least_one() -> None:
    assert spec(min_replicas=0).autoscaling.min_replicas == 0
    with pytest.raises(ValidationError, match="max_replicas"):
        spec(min_replicas=0, max_replicas=0)


def test_unknown_billing_is_refused() -> None:
    with pytest.raises(ValidationError, match="billing"):
        spec(billing="free")


def test_typo_names_the_field_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_args(TapSpec, {"client": "acme", "model": "m", "gpus": 1, "max_replica": 2}, where="tap")
    assert "unknown field 'tap.max_replica'" in str(err.value) and "max_replicas" in str(err.value)


def test_spec_is_frozen() -> None:
    with pytest.raises(ValidationError):
        spec().gpus = 4  # type: ignore[misc]


def test_engine_settings_validate_as_engine_config() -> None:
    assert spec(engine={"max_model_len": 2048}).engine.max_model_len == 2048
    with pytest.raises(ValidationError, match="engine"):
        spec(engine={"max_model_length": 2048})


def test_every_field_is_described() -> None:
    assert all(field.description for field in TapSpec.model_fields.values())


def test_tensor_parallel_spans_the_group_on_cuda() -> None:
    assert effective_tensor_parallel(8, cuda_available=True) == (8, None)


def test_without_cuda_the_engine_runs_on_one_cpu_engine_and_says_so() -> None:
    assert effective_tensor_parallel(4, cuda_available=False) == (
        1,
        "no CUDA on this node: the engine runs on the CPU with tensor_parallel_size=1; the group still reserves 4 GPUs",
    )
    note = effective_tensor_parallel(1, cuda_available=False)[1]
    assert note is not None and note.endswith("reserves 1 GPU")


def test_cuda_available_is_false_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    assert cuda_available() is False


def test_ledger_shards_is_optional_and_bounded() -> None:
    assert spec().ledger_shards is None
    assert spec(ledger_shards=4).ledger_shards == 4
    with pytest.raises(ValidationError):
        spec(ledger_shards=0)


def test_a_taps_json_entry_written_with_flat_autoscaling_fields_still_loads() -> None:
    old = {"client": "acme", "model": "m", "gpus": 2, "min_replicas": 0, "max_replicas": 3, "downscale_delay_s": 5.0}
    tap = TapSpec.model_validate(old)
    assert (tap.autoscaling.min_replicas, tap.autoscaling.max_replicas, tap.autoscaling.downscale_delay_s) == (0, 3, 5)
    assert TapSpec.model_validate(tap.model_dump(mode="json")) == tap  # written back nested, read the same
    scaled = TapSpec.model_validate(tap.model_dump() | {"max_replicas": 1, "min_replicas": 1})  # `tap scale`
    assert (scaled.autoscaling.min_replicas, scaled.autoscaling.max_replicas) == (1, 1)
    assert scaled.autoscaling.downscale_delay_s == 5

"""Tests for orch/models.py: model source resolution and the build-once publishing of model folders."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from orch import models
from orch.models import (
    DEFAULT_MODEL_NAME,
    build_tiny_llama,
    default_data_dir,
    materialise_default_model,
    resolve_model_source,
)


def test_resolve_model_source_returns_hf_id_unchanged(tmp_path: Path) -> None:
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_resolve_model_source_makes_existing_relative_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_source("my-model") == str(tmp_path / "my-model")


def test_resolve_model_source_maps_default_names_to_the_materialised_folder(tmp_path: Path) -> None:
    folder = _fake_complete_default_model(tmp_path)
    assert resolve_model_source("default", tmp_path) == str(folder)
    assert resolve_model_source(DEFAULT_MODEL_NAME, tmp_path) == str(folder)


def test_default_data_dir_prefers_env_then_dot_orch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_ORCH_DATA_DIR", str(tmp_path / "data"))
    assert default_data_dir() == tmp_path / "data"
    monkeypatch.delenv("LLAMA_ORCH_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == tmp_path / ".orch"


def test_materialise_returns_complete_folder_without_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _fake_complete_default_model(tmp_path)
    monkeypatch.setattr(models, "_convert_gguf", _must_not_convert)
    assert materialise_default_model(tmp_path) == folder


def test_materialise_publishes_folder_with_marker_written_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_convert(out: Path, *, progress: bool) -> dict[str, Any]:
        (out / "config.json").write_text("{}")
        return {"source": "fake"}

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    folder = materialise_default_model(tmp_path, progress=False)
    assert folder == tmp_path / "models" / DEFAULT_MODEL_NAME
    assert json.loads((folder / ".complete").read_text()) == {"source": "fake"}
    assert (folder / "config.json").read_text() == "{}"
    assert _leftovers(tmp_path) == []


def test_materialise_failure_leaves_no_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_convert(out: Path, *, progress: bool) -> dict[str, Any]:
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", failing_convert)
    with pytest.raises(OSError, match="disk full"):
        materialise_default_model(tmp_path, progress=False)
    assert not (tmp_path / "models" / DEFAULT_MODEL_NAME).exists()
    assert _leftovers(tmp_path) == []


def test_materialise_replaces_an_incomplete_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "models" / DEFAULT_MODEL_NAME
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("stale")
    monkeypatch.setattr(models, "_convert_gguf", lambda out, *, progress: {"source": "fake"})
    folder = materialise_default_model(tmp_path, progress=False)
    assert not (folder / "config.json").exists()
    assert (folder / ".complete").is_file()


def test_materialise_removes_temporary_folders_of_killed_builders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "models" / f".{DEFAULT_MODEL_NAME}.killed.tmp"
    stale.mkdir(parents=True)
    monkeypatch.setattr(models, "_convert_gguf", lambda out, *, progress: {"source": "fake"})
    materialise_default_model(tmp_path, progress=False)
    assert _leftovers(tmp_path) == []


@pytest.mark.integration
def test_materialise_converts_gguf_into_a_loadable_folder_once(tmp_path: Path) -> None:
    folder = materialise_default_model(tmp_path, progress=False)

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", ".complete"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert (config["dtype"], config["eos_token_id"], config["bos_token_id"]) == ("bfloat16", 2, 1)
    assert "quantization_config" not in config
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
    assert 200e6 < (folder / "model.safetensors").stat().st_size < 300e6  # bf16, not fp32

    marker_mtime = (folder / ".complete").stat().st_mtime_ns
    started = time.monotonic()
    assert materialise_default_model(tmp_path, progress=False) == folder
    assert time.monotonic() - started < 1.0
    assert (folder / ".complete").stat().st_mtime_ns == marker_mtime


@pytest.mark.integration
def test_tiny_llama_shares_the_default_tokenizer(tmp_path: Path) -> None:
    folder = build_tiny_llama(tmp_path / "tiny", data_dir=tmp_path)

    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"], config["num_hidden_layers"]) == (64, 32, 2)
    default_folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert (folder / "tokenizer.json").read_bytes() == (default_folder / "tokenizer.json").read_bytes()
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 2048
    assert build_tiny_llama(tmp_path / "tiny", data_dir=tmp_path) == folder


def _fake_complete_default_model(data_dir: Path) -> Path:
    folder = data_dir / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / ".complete").write_text("{}")
    return folder


def _must_not_convert(out: Path, *, progress: bool) -> dict[str, Any]:
    raise AssertionError("a complete folder must not be converted again")


def _leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "models").iterdir() if p.name.endswith(".tmp"))

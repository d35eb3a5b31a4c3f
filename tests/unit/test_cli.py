from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_up_with_a_typo_fails_fast_with_one_line(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["applications"][0]["args"]["modles"] = config["applications"][0]["args"].pop("models")
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "orch.control.cli", "--data-dir", str(tmp_path), "up", "--config", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "applications[0].args.modles" in lines[0]
    assert not (tmp_path / "cluster.json").exists()  # nothing was started


def test_status_without_a_cluster(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orch.control.cli", "--data-dir", str(tmp_path), "status"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 1 and "no llama-orch cluster" in proc.stdout


def test_module_entry_point_parses_every_command() -> None:
    import subprocess
    import sys

    for args in (["--help"], ["tap", "create", "--help"], ["credits", "grant", "--help"], ["usage", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "orch.control.cli", *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert "usage: llama-orch" in done.stdout


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if k not in ("LLAMA_ORCH_ADMIN_KEY", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-m", "orch.control.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )


def test_up_with_a_config_that_does_not_exist_fails_in_one_line(tmp_path: Path) -> None:
    proc = run_cli("--data-dir", str(tmp_path), "up", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"llama-orch: config error: {tmp_path / 'nope.yaml'}: no such file"]
    assert not (tmp_path / "cluster.json").exists()


def test_up_refuses_a_short_admin_key_from_the_environment_before_starting_anything(tmp_path: Path) -> None:
    proc = run_cli("--data-dir", str(tmp_path), "up", "--config", str(REPO / "configs" / "local.yaml"),
                   env={"LLAMA_ORCH_ADMIN_KEY": "hunter2"})  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LLAMA_ORCH_ADMIN_KEY must be at least 32 characters" in lines[0], proc.stderr
    assert "hunter2" not in proc.stderr
    assert not (tmp_path / "cluster.json").exists() and not (tmp_path / "models").exists()


def test_down_with_nothing_up_says_so_in_one_line(tmp_path: Path) -> None:
    proc = run_cli("--data-dir", str(tmp_path), "down")
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines() == [f"nothing to stop: no llama-orch stack runs for data dir {tmp_path}"]


def test_engine_start_failure_is_found_in_serves_status_message() -> None:
    from types import SimpleNamespace

    from orch.startup import EngineStartError, app_start_failure, describe

    log = (
        "(EngineCore pid=1) ERROR 11-27 05:06:56 [core.py:1510] ValueError: No available memory for the cache blocks.\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    )
    wrapper = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    error = EngineStartError("m", describe(wrapper, log))
    message = (
        "A replica failed to start with exception. Retrying 2 more time(s). Error:\nTraceback...\n"
        f"orch.startup.EngineStartError: {error}"
    )
    app = SimpleNamespace(message="Deploying", deployments={"model-m": SimpleNamespace(message=message)})
    cause = app_start_failure(app)
    assert cause is not None and cause.startswith("model m: the engine failed to start: ValueError: No available")
    assert "Fix: size the KV cache" in cause
    assert app_start_failure(SimpleNamespace(message="", deployments={"g": SimpleNamespace(message="")})) is None


def test_a_port_is_refused_unless_this_stacks_own_head_serves_it(tmp_path: Path) -> None:
    import os
    import socket

    import pytest

    from orch.control.cli import _check_port
    from orch.control.cluster import ClusterState

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        config = {"http_options": {"port": listener.getsockname()[1]}}
        with pytest.raises(RuntimeError, match=rf"already served by pid {os.getpid()}, not by this stack"):
            _check_port(config, None, tmp_path)  # no head of ours: whoever listens is someone else
        ours = ClusterState(gcs_address="127.0.0.1:1", pid=os.getpid(), num_cpus=8, num_gpus=0, auth_token_path="")
        _check_port(config, ours, tmp_path)  # the listener descends from our head daemon (here: is it)
    _check_port(config, None, tmp_path)  # nobody listens any more

"""One real stack per test session: a Ray head of our own, Serve, the vLLM CPU engine, via `llama-orch up`.

The stack is started from a copy of configs/local.yaml with a free port and the default model's
folder; the session stops exactly what it started (`llama-orch down`), never `ray stop`.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from orch.control.cluster import read_state, use_cluster
from orch.models import DEFAULT_MODEL_NAME, materialise_default_model
from orch.serve_config import is_tap

REPO = Path(__file__).resolve().parents[2]
MODEL = DEFAULT_MODEL_NAME
NUM_GPUS = 8  # declared by the session's head (fake on this machine): private taps reserve them


def free_port() -> int:
    """A free port for a server a test starts later, outside the kernel's ephemeral range (32768+) and Ray's
    worker ports (10002-19999): an ephemeral one can be taken by any of Ray's processes before Serve binds it."""
    for _ in range(1000):
        port = random.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


TAP_REPLICAS = 2  # so every billing test runs with two replicas (each its engine and front) leasing one tenant's credit
LEASE_TTL_S = 10  # the least allowed: a killed replica's lease is back in the balance within seconds


def local_config(port: int, model_dir: Path, replicas: int = TAP_REPLICAS) -> dict[str, Any]:
    """configs/local.yaml as shipped, on another port, with the already materialised model folder,
    ``replicas`` chat model replicas (the front runs in each) and leases of :data:`LEASE_TTL_S`; the
    embedding model as shipped.

    ``LLAMA_ORCH_TEST_ENGINE=<dtype>:<compiled|eager>`` runs the session's engine with another setting
    (e.g. to show the golden-answer test failing on ``bfloat16:compiled``)."""
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    override = os.environ.get("LLAMA_ORCH_TEST_ENGINE")
    for app in config["applications"]:
        if not is_tap(app):  # the dashboard, as shipped
            continue
        app["args"]["lease_ttl_s"] = LEASE_TTL_S
        for model in app["args"]["models"]:
            if model.get("task") == "embed":  # the default embedding model, one replica, as shipped
                continue
            model["source"] = str(model_dir)
            model["autoscaling"] = {"min_replicas": replicas, "max_replicas": replicas}
            if override:
                dtype, _, mode = override.partition(":")
                model["engine"] |= {"dtype": dtype, "enforce_eager": mode == "eager"}
    return config


def cli(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orch.control.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@dataclass(frozen=True)
class Stack:
    base_url: str
    data_dir: Path
    gcs_address: str
    client_env: dict[str, str]
    config_path: Path
    key: str  # the demo tenant's key `up` created
    admin_key: str

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that restart the session's stack run last: a restart cuts every driver connected to it."""
    items.sort(key=lambda item: item.get_closest_marker("restarts_stack") is not None)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return materialise_default_model(REPO / ".orch", progress=False)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("orch-data")
    port = free_port()
    config_path = data / "local.yaml"
    config_path.write_text(yaml.safe_dump(local_config(port, model_dir)))
    env = {"RAY_ADDRESS": ""} if "RAY_ADDRESS" in os.environ else None
    up = cli("--data-dir", str(data), "up", "--config", str(config_path), "--num-gpus", str(NUM_GPUS), env=env)
    try:
        assert up.returncode == 0, f"llama-orch up failed:\n{up.stdout}\n{up.stderr[-4000:]}"
        assert f"http://127.0.0.1:{port}/v1" in up.stdout
        state = json.loads((data / "cluster.json").read_text())
        client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["auth_token_path"]}
        key = (data / "demo_key").read_text().strip()
        assert key in up.stdout  # shown once, on first start
        admin_key = (data / "admin_key").read_text().strip()
        yield Stack(f"http://127.0.0.1:{port}", data, state["gcs_address"], client_env, config_path, key, admin_key)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        down = cli("--data-dir", str(data), "down", timeout=120)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="session")
def ray_driver(stack: Stack) -> Iterator[None]:
    """A driver connected to the stack's cluster, for Serve handles (engine stats)."""
    import ray

    use_cluster(read_state(stack.data_dir))  # type: ignore[arg-type]
    ray.init(address=stack.gcs_address, namespace="serve", log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def kill_replica(actor_name: str, namespace: str = "serve") -> None:
    """Kills a Serve replica's actor (Serve replaces it) and checks that its engine guard
    (``orch.engine_guard``) ends the vLLM processes it had started: orphans would hold gigabytes (on a GPU,
    its memory) that the replacement then finds missing. Ends any left itself, so later tests are not hurt."""
    import psutil
    import ray
    from ray.serve.context import _get_global_client

    from orch.engine_guard import end

    details = _get_global_client().get_serve_details()
    pids = [r["pid"] for app in details["applications"].values() for d in app["deployments"].values()
            for r in d["replicas"] if r.get("actor_name") == actor_name and r.get("pid")]  # fmt: skip
    engines = []
    for pid in pids:
        try:
            engines += [
                p for p in psutil.Process(pid).children(recursive=True) if "engine_guard" not in " ".join(p.cmdline())
            ]
        except psutil.NoSuchProcess:
            pass
    ray.kill(ray.get_actor(actor_name, namespace=namespace), no_restart=True)
    _, left = psutil.wait_procs(engines, timeout=20)  # the guard's poll, its grace, SIGKILL
    if left:
        end({p.pid: p.create_time() for p in left if p.is_running()}, 0)
    assert engines and not left, f"the engine guard left {left} of {engines} running"

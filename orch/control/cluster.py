"""The local Ray head that ``llama-orch up`` starts, owns and stops.

The head runs in a daemon process of ours (``python -m orch.control.cluster``) that holds a
``ray.init(address="local")`` driver: SIGTERM to it shuts down exactly that cluster, nothing else
(never ``ray stop``, which kills every Ray on the machine). Its address lives in a state file.
Also here, shared by the CLI's commands: connecting a driver, deploying a Serve config, and the
record of what `up` deployed (``up.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ClusterState:
    gcs_address: str
    pid: int
    num_cpus: int
    num_gpus: int
    auth_token_path: str
    dashboard_url: str | None = None

    def client_env(self) -> dict[str, str]:
        """Environment a Ray client (driver, `ray`/`serve` CLI) needs to reach this cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.auth_token_path}


def use_cluster(state: ClusterState) -> None:
    """Points this process's Ray client at ``state``'s cluster (its auth token), even if ray is imported."""
    os.environ.update(state.client_env())
    if "ray" in sys.modules:
        from ray._raylet import Config  # type: ignore[attr-defined]  # Ray reads RAY_AUTH_MODE once; re-read it as Ray itself does.

        Config.initialize("")


def _auth_token(data_dir: Path) -> Path:
    """The cluster's token file (0600): Ray token auth on, without touching the user's ~/.ray."""
    path = data_dir / "ray_auth_token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(uuid.uuid4().hex)
    return path


def state_file(data_dir: Path) -> Path:
    return data_dir / "cluster.json"


def read_state(data_dir: Path) -> ClusterState | None:
    """The cluster this data dir's ``up`` started, if its daemon is still alive."""
    try:
        state = ClusterState(**json.loads(state_file(data_dir).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return state if _alive(state.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_head(data_dir: Path, *, num_cpus: int, num_gpus: int, timeout_s: float = 120) -> ClusterState:
    """Starts a head in a detached daemon and waits until it wrote its address."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = state_file(data_dir)
    path.unlink(missing_ok=True)
    log_path = data_dir / "cluster.log"
    env = {
        **os.environ,
        **head_env(data_dir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(_auth_token(data_dir)),
    }
    cmd = [sys.executable, "-m", "orch.control.cluster", "--state", str(path), "--num-cpus", str(num_cpus),
           "--num-gpus", str(num_gpus)]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray head exited with code {proc.returncode}; see {log_path}")
        state = read_state(data_dir)
        if state is not None:
            return state
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the Ray head did not start within {timeout_s:.0f} s; see {log_path}")


def head_env(data_dir: Path) -> dict[str, str]:
    """What every process of the head inherits, jobs' entrypoints included: this environment's
    ``python``/``serve``/``ray`` first on PATH (so `ray job submit -- serve deploy ...` runs in the project's
    venv, not the system Python) and the data dir (so apps deployed by a job share this stack's ledger)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {
        "PATH": bin_dir + (os.pathsep + path if path else ""),
        "VIRTUAL_ENV": str(Path(sys.prefix)),
        "LLAMA_ORCH_DATA_DIR": str(data_dir.resolve()),
    }


def job_address(state: ClusterState) -> str | None:
    """Where `ray job submit --address` reaches this head (its dashboard)."""
    if not state.dashboard_url:
        return None
    url = state.dashboard_url
    return url if "://" in url else f"http://{url}"


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` is ``ancestor`` or one of its descendants (Ray's processes descend from the
    head daemon: GCS and raylet are its children, workers the raylet's)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return pid == ancestor or any(p.pid == ancestor for p in proc.parents())
    except psutil.Error:
        return False


def listeners(port: int) -> set[int | None]:
    """PIDs of the processes listening on TCP ``port`` (None where the OS won't say)."""
    import psutil

    return {c.pid for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr
            and c.laddr.port == port}  # fmt: skip


def stop_head(state: ClusterState, timeout_s: float = 60) -> None:
    """SIGTERMs the daemon (it shuts its cluster down), waits for it and every process below it (GCS,
    raylet, workers, engines) to exit, and kills what is left: `down` leaves nothing of the stack running."""
    import psutil

    try:
        daemon = psutil.Process(state.pid)
        below = daemon.children(recursive=True)
        daemon.terminate()
        daemon.wait(timeout_s)  # reaps it too when this process started it (a failed `up`)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        os.killpg(state.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    _, left = psutil.wait_procs(below, timeout=max(5.0, deadline - time.monotonic()))
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=5)


def _run_head(state_path: Path, num_cpus: int, num_gpus: int) -> None:
    import ray

    stop = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    ctx = ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
    )
    state = ClusterState(
        gcs_address=ray.get_runtime_context().gcs_address,
        pid=os.getpid(),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        auth_token_path=os.environ["RAY_AUTH_TOKEN_PATH"],
        dashboard_url=ctx.dashboard_url or None,
    )
    # After ray.init, which installs a SIGTERM handler of its own that would skip the cleanup below.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, state_path)
    while not stop:
        time.sleep(0.5)
    state_path.unlink(missing_ok=True)
    ray.shutdown()


def connect(address: str | None, state: ClusterState | None) -> None:
    """Makes this process a driver of the cluster at ``address`` (this data dir's head when ``state`` is it)."""
    if state is not None and address == state.gcs_address:
        use_cluster(state)
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace="serve", log_to_driver=False, logging_level=logging.WARNING)


def deploy(config: dict[str, Any]) -> None:
    """Deploys a whole Serve config, as `serve deploy` does, without waiting: unchanged apps keep running."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)


def up_file(root: Path) -> Path:
    return root / "up.json"


def record_up(root: Path, config: dict[str, Any]) -> None:
    """``<data dir>/up.json``: what `up` deployed (apps, base URL, config), for `status`, `tap` and `down`."""
    from orch.files import write_json_atomic

    record = {"apps": [a["name"] for a in config["applications"]], "base_url": base_url(config), "config": config}
    write_json_atomic(up_file(root), record)


def read_up(root: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(up_file(root).read_text())
        return data
    except (OSError, ValueError):
        return None


def base_url(config: dict[str, Any]) -> str:
    """Where a Serve config's HTTP proxy answers on this machine."""
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{http.get('port', 8000)}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="llama-orch's local Ray head daemon")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--num-cpus", type=int, required=True)
    parser.add_argument("--num-gpus", type=int, default=0)
    ns = parser.parse_args()
    _run_head(ns.state, ns.num_cpus, ns.num_gpus)

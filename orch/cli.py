"""``llama-orch``: start, inspect and stop a local stack.

llama-orch up [--config configs/local.yaml]   # Ray head (if none), deploy, wait, print the URL
llama-orch status
llama-orch down                               # stop what `up` started
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from orch.cluster import ClusterState, read_state, start_head, state_file, stop_head, use_cluster
from orch.config import ConfigError, data_dir, load_serve_config

DEFAULT_CONFIG = "configs/local.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-orch", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--data-dir", help="state and weights (default $LLAMA_ORCH_DATA_DIR or ./.orch)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local Ray head if needed, deploy a config, wait until it answers")
    up.add_argument("--config", default=DEFAULT_CONFIG, help=f"Serve config file (default {DEFAULT_CONFIG})")
    up.add_argument("--num-cpus", type=int, default=max(8, os.cpu_count() or 1), help="logical CPUs of a new head")
    up.add_argument("--num-gpus", type=int, default=0, help="GPUs a new head declares (fake where none exist)")
    up.add_argument("--timeout", type=float, default=900, help="seconds to wait for the endpoint")
    sub.add_parser("status", help="show the cluster, apps and endpoint")
    sub.add_parser("down", help="stop what `up` started")
    args = parser.parse_args(argv)
    root = data_dir(args.data_dir)
    try:
        if args.command == "up":
            return cmd_up(root, Path(args.config), args.num_cpus, args.num_gpus, args.timeout)
        if args.command == "status":
            return cmd_status(root)
        return cmd_down(root)
    except (ConfigError, RuntimeError, TimeoutError) as exc:
        print(f"llama-orch: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_up(root: Path, config_path: Path, num_cpus: int, num_gpus: int, timeout_s: float) -> int:
    config = load_serve_config(config_path)
    config = _with_data_dir(config, root)
    _materialise_sources(config, root)

    state = read_state(root)
    address = os.environ.get("RAY_ADDRESS") or None
    started = False
    if address is None and state is None:
        _say(f"starting a local Ray head ({num_cpus} CPUs, {num_gpus} GPUs) ...")
        state = start_head(root, num_cpus=num_cpus, num_gpus=num_gpus)
        started = True
    address = address or (state.gcs_address if state else None)
    _connect(address, state)
    _deploy(config)
    _record_up(root, config, started)
    base = _base_url(config)
    _say(f"deploying {config_path} (first start loads the engine; ~1 min on a laptop CPU) ...")
    _wait_running(config, timeout_s)
    _wait_http(base + "/health", timeout_s)
    print(f"llama-orch is up: {base}/v1")
    return 0


def _with_data_dir(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """Pins the data dir to an absolute path: replicas do not share the caller's working directory."""
    config = copy.deepcopy(config)
    for app in config["applications"]:
        if str(app.get("import_path", "")).startswith("apps."):
            args = app.setdefault("args", {})
            args["data_dir"] = str(data_dir(args.get("data_dir") or str(root)))
    return config


def _materialise_sources(config: dict[str, Any], root: Path) -> None:
    """Converts the default model here, with a progress bar, instead of silently inside a replica."""
    from orch.models import DEFAULT_MODEL_NAME, materialise_default_model

    for app in config["applications"]:
        for model in (app.get("args") or {}).get("models", []):
            if model.get("source", "default") in ("default", DEFAULT_MODEL_NAME):
                materialise_default_model(Path(app["args"]["data_dir"]))
                return


def _connect(address: str | None, state: ClusterState | None) -> None:
    if state is not None and address == state.gcs_address:
        use_cluster(state)
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace="serve", log_to_driver=False, logging_level=logging.WARNING)


def _deploy(config: dict[str, Any]) -> None:
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


def _record_up(root: Path, config: dict[str, Any], started_head: bool) -> None:
    record = {"apps": [a["name"] for a in config["applications"]], "started_head": started_head,
              "base_url": _base_url(config)}  # fmt: skip
    (root / "up.json").write_text(json.dumps(record))


def _base_url(config: dict[str, Any]) -> str:
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{http.get('port', 8000)}"


def _wait_running(config: dict[str, Any], timeout_s: float) -> None:
    from ray import serve

    names = [a["name"] for a in config["applications"]]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        failed = [(n, apps[n].message) for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"]
        if failed:
            name, message = failed[0]
            raise RuntimeError(f"app '{name}' failed to deploy: {_last_line(message)}")
        if all(n in apps and apps[n].status == "RUNNING" for n in names):
            return
        time.sleep(1)
    raise TimeoutError(f"apps {names} not RUNNING after {timeout_s:.0f} s; see `llama-orch status`")


def _last_line(message: str) -> str:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "config error:" in line]
    return (errors or lines or ["(no message)"])[-1].strip()


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def cmd_status(root: Path) -> int:
    state = read_state(root)
    address = os.environ.get("RAY_ADDRESS") or (state.gcs_address if state else None)
    if address is None:
        print("no llama-orch cluster is running for data dir", root)
        return 1
    _connect(address, state)
    from ray import serve

    status = serve.status()
    print(f"ray: {address}" + (f" (started by up, pid {state.pid})" if state else ""))
    if state is not None:
        print("ray/serve CLI env: " + " ".join(f"{k}={v}" for k, v in state.client_env().items()))
    for name, app in status.applications.items():
        print(f"app {name}: {_word(app.status)}")
        for dep_name, dep in app.deployments.items():
            replicas = ", ".join(f"{k}={v}" for k, v in dep.replica_states.items())
            print(f"  {dep_name}: {_word(dep.status)} [{replicas}]")
    record = _read_up(root)
    if record:
        print(f"endpoint: {record['base_url']}/v1")
    return 0


def _word(status: object) -> str:
    return str(getattr(status, "value", status))


def _read_up(root: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((root / "up.json").read_text())
        return data
    except (OSError, ValueError):
        return None


def cmd_down(root: Path) -> int:
    state = read_state(root)
    record = _read_up(root)
    if state is not None and (record is None or record.get("started_head")):
        stop_head(state)
        print(f"stopped the Ray head started by up (pid {state.pid})")
    elif record is not None:
        _connect(os.environ.get("RAY_ADDRESS") or (state.gcs_address if state else None), state)
        from ray import serve

        for name in record["apps"]:
            serve.delete(name)
        print(f"deleted apps {record['apps']}; the Ray cluster was not started by up and keeps running")
    else:
        print("nothing to stop")
    (root / "up.json").unlink(missing_ok=True)
    state_file(root).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

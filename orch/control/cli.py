"""``llama-orch``: start, inspect and stop a local stack; manage tenants, keys and credits.

llama-orch up [--config configs/local.yaml]   # Ray head (if none), deploy, wait, print the URL
llama-orch status
llama-orch down                               # stop what `up` started
llama-orch tenants create NAME | tenants list | tenants set TENANT_ID [--priority --weight --rpm --tpm]
llama-orch keys create TENANT_ID [--priority --rpm --tpm] | keys revoke KEY_ID
llama-orch credits grant TENANT_ID MICRO_CREDITS
llama-orch account TENANT_ID | usage TENANT_ID [--since --until --group-by day|model]
llama-orch tap create CLIENT --model ID --gpus N [--min 1 --max 3] | tap list | tap scale | tap delete
llama-orch tools list                         # the toolkit's tools from installed plugins
llama-orch batch PROMPTS.jsonl --model M --out OUT.parquet [--cap MICRO_CREDITS]   # key: $LLAMA_ORCH_API_KEY
llama-orch backup DEST                        # the running stack's ledger shards and secrets, into a new folder
llama-orch restore SRC [--force]              # a backup into the data dir (the stack down)

The admin commands call the running stack's admin API with the admin key
($LLAMA_ORCH_ADMIN_KEY, else <data dir>/admin_key).
"""

from __future__ import annotations

import argparse
import copy
import errno
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from orch.config import ConfigError, data_dir
from orch.control import cli_admin, cli_tap, cli_toolkit
from orch.control.cli_admin import AdminClient, admin_key, admin_key_source
from orch.control.cluster import (
    ClusterState,
    base_url,
    connect,
    deploy,
    job_address,
    read_state,
    read_up,
    record_up,
    start_head,
    state_file,
    stop_head,
    up_file,
)
from orch.metrics import HUB_NAME, HUB_NAMESPACE, ReplicaReport
from orch.serve_config import DASHBOARD_IMPORT_PATH, is_tap, load_serve_config
from orch.startup import app_start_failure

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
    sub.add_parser("status", help="show the cluster, apps, ledger shards and endpoint")
    sub.add_parser("check", help="check every ledger shard's money invariants over its file (exit 1 on a violation)")
    sub.add_parser("down", help="stop what `up` started")
    cli_admin.add_parsers(sub)
    cli_tap.add_parsers(sub)
    cli_toolkit.add_parsers(sub)
    args = parser.parse_args(argv)
    root = data_dir(args.data_dir)
    try:
        if args.command == "up":
            return cmd_up(root, Path(args.config), args.num_cpus, args.num_gpus, args.timeout)
        if args.command == "status":
            return cmd_status(root)
        if args.command == "down":
            return cmd_down(root)
        if args.command == "check":
            return cmd_check(root)
        if args.command in cli_admin.DATA_DIR_COMMANDS:
            return cli_admin.run_data_dir(root, args)
        if args.command == "tap":
            return cli_tap.run(root, args)
        if args.command == "tools":
            return cli_toolkit.cmd_tools_list()
        record = read_up(root)
        if args.command == "batch":
            return cli_toolkit.cmd_batch(args, record["base_url"] if record else None)
        return cli_admin.run(root, args, record["base_url"] if record else None)
    except (ConfigError, RuntimeError, TimeoutError) as exc:
        print(f"llama-orch: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_up(root: Path, config_path: Path, num_cpus: int, num_gpus: int, timeout_s: float) -> int:
    config = load_serve_config(config_path)
    config = _with_data_dir(config, root)
    _check_admin_key()
    cli_toolkit.check_plugins(config)
    state = read_state(root)
    address = os.environ.get("RAY_ADDRESS") or None
    base = base_url(config)
    if address is None:  # on a cluster of the user's (RAY_ADDRESS), its own Serve proxy may hold the port already
        _check_port(config, state, root)
    _materialise_sources(config, root)
    started = False
    if address is None and state is None:
        _say(f"starting a local Ray head ({num_cpus} CPUs, {num_gpus} GPUs) ...")
        state = start_head(root, num_cpus=num_cpus, num_gpus=num_gpus)
        started = True
    try:
        address = address or (state.gcs_address if state else None)
        connect(address, state)
        from orch.control.tapctl import desired_config, load_taps

        deploy(desired_config(config, load_taps(root)))  # private taps created earlier come back too
        record_up(root, config)
        _say(f"deploying {config_path} (first start loads the engine; ~1 min on a laptop CPU) ...")
        _wait_running(config, timeout_s)
        _wait_http(base + "/health", timeout_s)
        if not os.environ.get("RAY_ADDRESS"):
            _check_port(config, state, root)  # the answer came from this stack
    except BaseException:
        if started and state is not None:  # nothing half-started stays behind
            _leave_cluster()
            stop_head(state)
            up_file(root).unlink(missing_ok=True)
            state_file(root).unlink(missing_ok=True)
        raise
    cli_toolkit.report_broken_plugins()
    print(f"llama-orch is up: {base}/v1")
    for app in config["applications"]:
        if app.get("import_path") == DASHBOARD_IMPORT_PATH and app.get("route_prefix"):
            print(f"dashboard: {base}{app['route_prefix'].rstrip('/')}/  (sign in with a tenant key or the admin key)")
    if state is not None and (jobs := job_address(state)):
        print(f"ray jobs: {jobs}  (see `llama-orch status` for the client environment)")
    if any(is_tap(a) for a in config["applications"]):
        _ensure_demo(root, base)
    return 0


def _check_admin_key() -> None:
    """A secret set in the environment must be one the server accepts: refused here, before anything starts."""
    from orch.keys import ADMIN_KEY_ENV, validate_admin_key

    raw = os.environ.get(ADMIN_KEY_ENV, "")
    if raw.strip():
        try:
            validate_admin_key(raw)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _check_port(config: dict[str, Any], own: ClusterState | None, root: Path) -> None:
    """Refuses a port that a process outside this stack's own Ray head listens on: Ray's proxies set
    SO_REUSEPORT, so two stacks on one port would split connections between their tenants and ledgers."""
    import psutil

    from orch.control.cluster import descends_from, listeners

    port = int((config.get("http_options") or {}).get("port", 8000))
    # A listener gone meanwhile (Serve's HAProxy mode replaces its haproxy process on every reload) holds nothing.
    foreign = [pid for pid in listeners(port) if pid is None or own is None
               or (not descends_from(pid, own.pid) and psutil.pid_exists(pid))]  # fmt: skip
    if foreign:
        who = f"pid {foreign[0]}" if foreign[0] is not None else "another process"
        raise RuntimeError(
            f"port {port} is already served by {who}, not by this stack (data dir {root}); stop that server "
            "(`llama-orch down` in its folder) or set http_options.port in the config"
        )


def _leave_cluster() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


DEMO_GRANT = 10_000_000  # 10 credits


def _ensure_demo(root: Path, base: str) -> None:
    """First start: a `demo` tenant with 10 credits and a key saved in <data dir>/demo_key (0600), so
    the README's examples work as printed. Idempotent: a rerun finds the same tenant and grant."""
    key_file = root / "demo_key"
    if key_file.exists():
        print(f"demo key: {key_file}")
        return
    client = AdminClient(base, admin_key(root))
    tenant = client.request("POST", "/admin/tenants", {"name": "demo", "idempotency_key": "demo"})["tenant_id"]
    client.request(
        "POST", f"/admin/tenants/{tenant}/grants", {"micro_credits": DEMO_GRANT, "idempotency_key": "demo-welcome"}
    )
    key = client.request("POST", f"/admin/tenants/{tenant}/keys", {})["key"]
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    print(f"demo tenant {tenant}: {DEMO_GRANT:,} micro-credits; its key (shown once, saved in {key_file}):")
    print(f"  {key}")
    print(f"admin key: {admin_key_source(root)}")


def _with_data_dir(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """Pins the data dir to an absolute path: replicas do not share the caller's working directory."""
    config = copy.deepcopy(config)
    for app in config["applications"]:
        if is_tap(app):
            args = app.setdefault("args", {})
            args["data_dir"] = str(data_dir(args.get("data_dir") or str(root)))
    return config


def _materialise_sources(config: dict[str, Any], root: Path) -> None:
    """Converts the default model (with a progress bar) and unzips the default embedding model here,
    instead of silently inside a replica; too little disk for either is one line."""
    from orch.models import (
        DEFAULT_EMBEDDING_MODEL_NAME,
        DEFAULT_MODEL_NAME,
        materialise_default_embedding_model,
        materialise_default_model,
    )

    sources = [
        (Path((app.get("args") or {}).get("data_dir") or root), model.get("source", "default"))
        for app in config["applications"]
        for model in (app.get("args") or {}).get("models", [])
    ]
    for where, source in sources:
        if source in ("default", DEFAULT_MODEL_NAME):
            _check_room_for_the_default_model(where)
            _within_room(where, "convert the default model", materialise_default_model)
            break
    for where, source in sources:
        if source in ("default-embedding", DEFAULT_EMBEDDING_MODEL_NAME):
            _within_room(where, "unzip the default embedding model", materialise_default_embedding_model)
            break


def _within_room(where: Path, what: str, build: Any) -> None:
    try:
        build(where)
    except Exception as exc:  # torch/safetensors/zipfile wrap ENOSPC in errors of their own
        if "No space left" not in str(exc) and getattr(exc, "errno", None) != errno.ENOSPC:
            raise
        raise RuntimeError(_no_room(where, "No space left on device", what)) from None


DEFAULT_MODEL_ROOM = 700 * 2**20  # the converted folder (~260 MB), transformers' fp32 copy on the way, MiniLM (~90 MB)


def _check_room_for_the_default_model(where: Path) -> None:
    from orch.models import default_model_ready

    if default_model_ready(where):
        return
    where.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(where).free < DEFAULT_MODEL_ROOM:
        raise RuntimeError(_no_room(where, "not enough disk space"))


def _no_room(where: Path, why: str, what: str = "convert the default model") -> str:
    free = shutil.disk_usage(where).free // 2**20
    return (
        f"cannot {what} into {where / 'models'}: {why} ({free} MiB free there; the models need about "
        f"{DEFAULT_MODEL_ROOM // 2**20} MiB); free some space or pick another --data-dir"
    )


def _wait_running(config: dict[str, Any], timeout_s: float) -> None:
    from ray import serve

    names = [a["name"] for a in config["applications"]]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        for name in names:
            if cause := app_start_failure(apps.get(name)):
                raise RuntimeError(f"app '{name}': {cause}")
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
    connect(address, state)
    from ray import serve

    status = serve.status()
    print(f"ray: {address}" + (f" (started by up, pid {state.pid})" if state else ""))
    if state is not None:
        print("ray/serve CLI env: " + " ".join(f"{k}={v}" for k, v in state.client_env().items()))
        if jobs := job_address(state):
            print(f"ray jobs: {jobs}")
    reports = _replica_reports()
    for name, app in status.applications.items():
        print(f"app {name}: {_word(app.status)}")
        for dep_name, dep in app.deployments.items():
            replicas = ", ".join(f"{k}={v}" for k, v in dep.replica_states.items())
            print(f"  {dep_name}: {_word(dep.status)} [{replicas}]")
            for line in _replica_lines(reports.get((name, dep_name), [])):
                print("    " + line)
    record = read_up(root)
    for line in _ledger_lines(record["config"] if record else None):
        print(line)
    if record:
        print(f"endpoint: {record['base_url']}/v1")
    return 0


def cmd_check(root: Path) -> int:
    """``orch.invariants.check_invariants`` on each shard of the running stack, over its own file (a full
    replay on the shard's loop: seconds per million ops, while the shard answers nothing else)."""
    import asyncio

    ledger = cli_admin.running_ledger(root, "check reads a running stack's ledger", deadline_s=600)
    failed = 0
    for shard in range(ledger.shards):
        try:
            f = asyncio.run(ledger.call(shard, "check_invariants"))
        except Exception as exc:  # an AssertionError from the shard names the invariant
            print(f"ledger shard {shard}: VIOLATION {exc}")
            failed += 1
            continue
        print(f"ledger shard {shard}: ok, {f['ops']:,} ops, {f['tenants']} tenants, granted {f['granted']:,}, "
              f"debited {f['debited']:,}, held {f['held']:,} µc, {f['usage_rows']:,} usage rows")  # fmt: skip
    return 1 if failed else 0


def _ledger_lines(config: dict[str, Any] | None) -> list[str]:
    """Where each ledger shard runs (``ledger_nodes`` places shards off the head); a shard not started yet
    is said so, never created here."""
    import ray

    from actors.ledger import NAMESPACE, shard_name
    from orch.control.tapctl import stack_ledger_layout

    shards, nodes = stack_ledger_layout(config) if config else (1, {})
    lines = []
    for shard in range(shards):
        where = f" (resource {nodes[shard]})" if shard in nodes else " (head)"
        try:
            actor = ray.get_actor(shard_name(shard), namespace=NAMESPACE)
            placed: Any = ray.get(actor.placement.remote(), timeout=10)
            lines.append(f"ledger shard {shard}: node {placed['node_id'][:12]}{where}")
        except Exception as exc:  # not created yet, or waiting for its node
            lines.append(f"ledger shard {shard}: not running{where} ({type(exc).__name__})")
    return lines


def _replica_reports() -> dict[tuple[str, str], list[ReplicaReport]]:
    """Each replica's last report to the metrics hub (``orch/metrics.py``), by (app, deployment)."""
    import ray

    try:
        hub = ray.get_actor(HUB_NAME, namespace=HUB_NAMESPACE)
        reports: list[ReplicaReport] = ray.get(hub.reports.remote(), timeout=10)
    except Exception:  # no replica reported yet
        return {}
    found: dict[tuple[str, str], list[ReplicaReport]] = {}
    for report in sorted(reports, key=lambda r: r.replica):
        found.setdefault((report.app, report.deployment), []).append(report)
    return found


def _replica_lines(reports: list[ReplicaReport]) -> list[str]:
    """Per replica: its engine's batch and KV cache, and its front's admission queues (each gates its own
    engine)."""
    lines = []
    for r in reports:
        parts = []
        if r.engine is not None:
            e = r.engine
            parts.append(f"engine {e['running']:.0f} running, {e['waiting']:.0f} waiting, "
                         f"KV cache {e['kv_cache_usage']:.0%}")  # fmt: skip
        lines.append(f"replica {r.replica}: " + ("; ".join(parts) or "front"))
        for model, q in sorted(r.queues.items()):
            who = ", ".join(f"{tenant} {n}" for tenant, n in sorted(q["queued"].items())) or "none"
            lines.append(
                f"  queue {model}: {q['running']}/{q['max']} running, {q['waiting']} waiting (by tenant: {who})"
            )
    return lines


def _word(status: object) -> str:
    return str(getattr(status, "value", status))


def cmd_down(root: Path) -> int:
    """Stops this data dir's own Ray head whenever one runs (however many `up`s used it); on a cluster
    `up` did not start (RAY_ADDRESS), deletes the apps it deployed and leaves the cluster running."""
    state = read_state(root)
    record = read_up(root)
    if state is not None:
        stop_head(state)
        print(f"stopped the Ray head started by up (pid {state.pid})")
    elif record is not None and os.environ.get("RAY_ADDRESS"):
        connect(os.environ["RAY_ADDRESS"], None)
        from ray import serve

        for name in record["apps"]:
            serve.delete(name)
        print(f"deleted apps {record['apps']}; the Ray cluster was not started by up and keeps running")
    else:
        print(f"nothing to stop: no llama-orch stack runs for data dir {root}")
    up_file(root).unlink(missing_ok=True)
    state_file(root).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``llama-orch``: start, inspect and stop a local stack; manage tenants, keys and credits.

llama-orch up [--config configs/local.yaml]   # Ray head (if none), deploy, wait, print the URL
llama-orch status
llama-orch down                               # stop what `up` started
llama-orch tenants create NAME | tenants list
llama-orch keys create TENANT_ID | keys revoke KEY_ID
llama-orch credits grant TENANT_ID MICRO_CREDITS
llama-orch account TENANT_ID | usage TENANT_ID [--since --until --group-by day|model]
llama-orch tap create CLIENT --model ID --gpus N [--min 1 --max 3] | tap list | tap scale | tap delete

The admin commands call the running stack's admin API with the admin key
($LLAMA_ORCH_ADMIN_KEY, else <data dir>/admin_key).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from orch.cluster import ClusterState, job_address, read_state, start_head, state_file, stop_head, use_cluster
from orch.config import ConfigError, data_dir, load_serve_config
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
    sub.add_parser("status", help="show the cluster, apps and endpoint")
    sub.add_parser("down", help="stop what `up` started")
    _admin_parsers(sub)
    _tap_parsers(sub)
    args = parser.parse_args(argv)
    root = data_dir(args.data_dir)
    try:
        if args.command == "up":
            return cmd_up(root, Path(args.config), args.num_cpus, args.num_gpus, args.timeout)
        if args.command == "status":
            return cmd_status(root)
        if args.command == "down":
            return cmd_down(root)
        if args.command == "tap":
            return cmd_tap(root, args)
        return cmd_admin(root, args)
    except (ConfigError, RuntimeError, TimeoutError) as exc:
        print(f"llama-orch: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_up(root: Path, config_path: Path, num_cpus: int, num_gpus: int, timeout_s: float) -> int:
    config = load_serve_config(config_path)
    config = _with_data_dir(config, root)
    _check_admin_key()
    state = read_state(root)
    address = os.environ.get("RAY_ADDRESS") or None
    base = _base_url(config)
    _check_port(config, None if address else state, root)
    _materialise_sources(config, root)
    started = False
    if address is None and state is None:
        _say(f"starting a local Ray head ({num_cpus} CPUs, {num_gpus} GPUs) ...")
        state = start_head(root, num_cpus=num_cpus, num_gpus=num_gpus)
        started = True
    try:
        address = address or (state.gcs_address if state else None)
        _connect(address, state)
        from orch.tapctl import desired_config, load_taps

        _deploy(desired_config(config, load_taps(root)))  # private taps created earlier come back too
        _record_up(root, config)
        _say(f"deploying {config_path} (first start loads the engine; ~1 min on a laptop CPU) ...")
        _wait_running(config, timeout_s)
        _wait_http(base + "/health", timeout_s)
        _check_port(config, None if os.environ.get("RAY_ADDRESS") else state, root)  # the answer was ours
    except BaseException:
        if started and state is not None:  # nothing half-started stays behind
            _leave_cluster()
            stop_head(state)
            (root / "up.json").unlink(missing_ok=True)
            state_file(root).unlink(missing_ok=True)
        raise
    print(f"llama-orch is up: {base}/v1")
    if state is not None and (jobs := job_address(state)):
        print(f"ray jobs: {jobs}  (see `llama-orch status` for the client environment)")
    if any(str(a.get("import_path", "")).startswith("apps.") for a in config["applications"]):
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
    from orch.cluster import descends_from, listeners

    port = int((config.get("http_options") or {}).get("port", 8000))
    foreign = [pid for pid in listeners(port) if pid is None or own is None or not descends_from(pid, own.pid)]
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
    client = AdminClient(base, _admin_key(root))
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
    print(f"admin key: {_admin_key_source(root)}")


def _admin_key(root: Path) -> str:
    from orch.keys import load_or_create_admin_key

    return load_or_create_admin_key(root)


def _admin_key_source(root: Path) -> str:
    from orch.keys import ADMIN_KEY_ENV, ADMIN_KEY_FILE

    return f"${ADMIN_KEY_ENV}" if os.environ.get(ADMIN_KEY_ENV) else str(root / ADMIN_KEY_FILE)


class AdminClient:
    """The admin API over HTTP (stdlib only). A connection refused is retried; a request that may
    have arrived is not (grants and tenants carry idempotency keys, so rerunning the command is safe)."""

    def __init__(self, base_url: str, admin_key: str, timeout_s: float = 60) -> None:
        self.base_url = base_url.rstrip("/")
        self.admin_key = admin_key
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, str] | None = None) -> Any:  # fmt: skip
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.admin_key}", "Content-Type": "application/json"}
        for attempt in range(5):
            req = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                try:
                    message = json.loads(exc.read())["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = exc.reason
                raise RuntimeError(f"{exc.code}: {message}") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt == 4 or not isinstance(reason, ConnectionRefusedError):
                    # Retried only when the request surely never arrived: a timeout may have applied it.
                    raise RuntimeError(f"cannot reach {self.base_url} ({reason}); is the stack up?") from None
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")


def _admin_parsers(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help="create or list tenants").add_subparsers(dest="action", required=True)
    create = tenants.add_parser("create", help="create a tenant; prints its id")
    create.add_argument("name")
    create.add_argument("--idempotency-key", help="a retry with the same key returns the same tenant")
    tenants.add_parser("list", help="tenants with their balances")
    keys = sub.add_parser("keys", help="create or revoke API keys").add_subparsers(dest="action", required=True)
    kc = keys.add_parser("create", help="a new key for a tenant (printed once)")
    kc.add_argument("tenant_id")
    kc.add_argument("--tap", help="the tap the key is for (default: the tap serving the call)")
    kr = keys.add_parser("revoke", help="revoke a key (refused everywhere within 5 s)")
    kr.add_argument("key_id")
    credits = sub.add_parser("credits", help="grant prepaid credits").add_subparsers(dest="action", required=True)
    grant = credits.add_parser("grant", help="add a grant, valid 12 months")
    grant.add_argument("tenant_id")
    grant.add_argument("micro_credits", type=int, help="1 credit = 1,000,000 micro-credits")
    grant.add_argument("--idempotency-key", help="repeat a grant safely: the same key never grants twice")
    account = sub.add_parser("account", help="a tenant's balance, open holds and grants")
    account.add_argument("tenant_id")
    usage = sub.add_parser("usage", help="a tenant's usage: totals and rows")
    usage.add_argument("tenant_id")
    usage.add_argument("--since", help="ISO date or time (UTC), inclusive")
    usage.add_argument("--until", help="ISO date or time (UTC), exclusive")
    usage.add_argument("--group-by", choices=["day", "model"])
    for p in (create, kc, kr, grant, account, usage, tenants.choices["list"]):
        p.add_argument("--url", help="the stack's base URL (default: the one `up` recorded)")
        p.add_argument("--json", action="store_true", help="print the API's JSON")


def cmd_admin(root: Path, args: argparse.Namespace) -> int:
    record = _read_up(root)
    base = args.url or (record["base_url"] if record else None)
    if base is None:
        raise RuntimeError(f"no stack recorded in {root}; run `llama-orch up` or pass --url")
    client = AdminClient(base, _admin_key(root))
    action = getattr(args, "action", None)
    if args.command == "tenants" and action == "create":
        key = args.idempotency_key or f"cli-{uuid.uuid4().hex}"
        out = client.request("POST", "/admin/tenants", {"name": args.name, "idempotency_key": key})
        text = out["tenant_id"]
    elif args.command == "tenants":
        out = client.request("GET", "/admin/tenants")
        text = "\n".join(f"{t['tenant_id']}  {t['balance_micro_credits']:>15,} µc  {t['name']}" for t in out["data"])
    elif args.command == "keys" and action == "create":
        out = client.request("POST", f"/admin/tenants/{args.tenant_id}/keys", {"tap": args.tap} if args.tap else {})
        text = out["key"]
        _say(f"key {out['key_id']} for tenant {out['tenant_id']} on tap {out['tap']}; it is shown only this once")
    elif args.command == "keys":
        out = client.request("DELETE", f"/admin/keys/{args.key_id}")
        text = f"revoked {out['key_id']}"
    elif args.command == "credits":
        key = args.idempotency_key or f"cli-{uuid.uuid4().hex}"
        body = {"micro_credits": args.micro_credits, "idempotency_key": key}
        out = client.request("POST", f"/admin/tenants/{args.tenant_id}/grants", body)
        again = " (already applied: nothing changed)" if out["replayed"] else ""
        text = f"granted {out['micro_credits']:,} µc to {out['tenant_id']}, expires {out['expires_at']}{again}"
        _say(f"idempotency key: {key}")
    elif args.command == "account":
        out = client.request("GET", f"/admin/tenants/{args.tenant_id}/account")
        text = _account_text(out)
    else:
        query = {"since": args.since, "until": args.until, "group_by": args.group_by}
        out = client.request("GET", f"/admin/tenants/{args.tenant_id}/usage", query=query)
        text = _usage_text(out)
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


def _account_text(a: dict[str, Any]) -> str:
    lines = [
        f"tenant {a['tenant_id']} ({a['name']})",
        f"balance {a['balance_micro_credits']:,} µc, held {a['held_micro_credits']:,} µc, "
        f"spent {a['spent_micro_credits']:,} µc",
    ]
    for g in a["grants"]:
        state = "expired" if g["expired"] else f"expires {g['expires_at']}"
        lines.append(
            f"  grant {g['grant_id']}: {g['remaining_micro_credits']:,} of {g['micro_credits']:,} µc left, {state}"
        )
    return "\n".join(lines)


def _usage_text(u: dict[str, Any]) -> str:
    t = u["totals"]
    lines = [f"{t['requests']} requests, {t['prompt_tokens']:,} prompt + {t['completion_tokens']:,} completion "
             f"tokens, {t['cost_micro_credits']:,} µc"]  # fmt: skip
    for r in u["data"]:
        head = r.get("key") or f"{r['ts']} {r['model']} {r['status']}"
        lines.append(f"  {head}: {r['prompt_tokens']} + {r['completion_tokens']} tokens, {r['cost_micro']:,} µc")
    return "\n".join(lines)


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
                where = Path(app["args"]["data_dir"])
                _check_room_for_the_default_model(where)
                try:
                    materialise_default_model(where)
                except Exception as exc:  # torch/safetensors wrap ENOSPC in errors of their own
                    if "No space left" not in str(exc) and getattr(exc, "errno", None) != errno.ENOSPC:
                        raise
                    raise RuntimeError(_no_room(where, "No space left on device")) from None
                return


DEFAULT_MODEL_ROOM = 600 * 2**20  # the converted folder (~260 MB) plus transformers' fp32 copy on the way


def _check_room_for_the_default_model(where: Path) -> None:
    from orch.models import DEFAULT_MODEL_NAME

    if (where / "models" / DEFAULT_MODEL_NAME / ".complete").is_file():
        return
    where.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(where).free < DEFAULT_MODEL_ROOM:
        raise RuntimeError(_no_room(where, "not enough disk space"))


def _no_room(where: Path, why: str) -> str:
    free = shutil.disk_usage(where).free // 2**20
    return (
        f"cannot convert the default model into {where / 'models'}: {why} ({free} MiB free there; it needs about "
        f"{DEFAULT_MODEL_ROOM // 2**20} MiB); free some space or pick another --data-dir"
    )


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


def _record_up(root: Path, config: dict[str, Any]) -> None:
    from orch.files import write_json_atomic

    record = {"apps": [a["name"] for a in config["applications"]], "base_url": _base_url(config), "config": config}
    write_json_atomic(root / "up.json", record)


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
    _connect(address, state)
    from ray import serve

    status = serve.status()
    print(f"ray: {address}" + (f" (started by up, pid {state.pid})" if state else ""))
    if state is not None:
        print("ray/serve CLI env: " + " ".join(f"{k}={v}" for k, v in state.client_env().items()))
        if jobs := job_address(state):
            print(f"ray jobs: {jobs}")
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
    """Stops this data dir's own Ray head whenever one runs (however many `up`s used it); on a cluster
    `up` did not start (RAY_ADDRESS), deletes the apps it deployed and leaves the cluster running."""
    state = read_state(root)
    record = _read_up(root)
    if state is not None:
        stop_head(state)
        print(f"stopped the Ray head started by up (pid {state.pid})")
    elif record is not None and os.environ.get("RAY_ADDRESS"):
        _connect(os.environ["RAY_ADDRESS"], None)
        from ray import serve

        for name in record["apps"]:
            serve.delete(name)
        print(f"deleted apps {record['apps']}; the Ray cluster was not started by up and keeps running")
    else:
        print(f"nothing to stop: no llama-orch stack runs for data dir {root}")
    (root / "up.json").unlink(missing_ok=True)
    state_file(root).unlink(missing_ok=True)
    return 0


def _tap_parsers(sub: Any) -> None:
    tap = sub.add_parser("tap", help="private taps: dedicated apps on GPU groups")
    actions = tap.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="deploy a private tap and print its first key")
    create.add_argument("client", help="client name: lowercase letters, digits, '-'")
    create.add_argument("--model", required=True, help="HF id, a local folder, or 'default'")
    create.add_argument("--gpus", type=int, required=True, choices=[1, 2, 4, 8], help="GPUs per replica")
    create.add_argument("--min", type=int, default=1, dest="min_replicas", help="fewest replicas (0: scale to zero)")
    create.add_argument("--max", type=int, default=1, dest="max_replicas", help="most replicas")
    create.add_argument("--billing", choices=["contract", "credits"], default="contract")
    create.add_argument("--no-gateway", action="store_true", help="no HTTP: reachable by Serve handle only")
    create.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine setting, e.g. max_model_len=2048 (repeatable)")  # fmt: skip
    create.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other tap field, e.g. downscale_delay_s=30 (repeatable)")  # fmt: skip
    actions.add_parser("list", help="taps, their GPUs and replicas, and each node's free GPUs")
    scale = actions.add_parser("scale", help="change a tap's replica range")
    scale.add_argument("client")
    scale.add_argument("--min", type=int, dest="min_replicas")
    scale.add_argument("--max", type=int, dest="max_replicas")
    delete = actions.add_parser("delete", help="delete a tap and free its GPUs")
    delete.add_argument("client")
    for p in (create, scale, delete):
        p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the tap")


def _pairs(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"config error: expected KEY=VALUE, got '{item}'")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_tap(root: Path, args: argparse.Namespace) -> int:
    from orch.tapctl import list_text, load_taps

    record = _read_up(root)
    if record is None or "config" not in record:
        raise RuntimeError(f"no stack recorded in {root}; run `llama-orch up` first")
    state = read_state(root)
    _connect(os.environ.get("RAY_ADDRESS") or (state.gcs_address if state else None), state)
    if args.action == "list":
        print(list_text(load_taps(root)))
        return 0
    from orch.tapctl import taps_lock

    with taps_lock(root):  # one tap change at a time: a concurrent run never drops this one's change
        return _change_tap(root, args, record)


def _change_tap(root: Path, args: argparse.Namespace, record: dict[str, Any]) -> int:
    from orch.capacity import InsufficientGPUs, snapshot
    from orch.config import load_args
    from orch.tapctl import check_capacity, desired_config, load_taps, save_taps, wait_app
    from orch.tapspec import TapSpec

    taps = load_taps(root)
    name = f"private-{args.client}"
    if args.action == "delete":
        if taps.pop(args.client, None) is None:
            raise RuntimeError(f"no tap '{args.client}'")
        save_taps(root, taps)
        _deploy(desired_config(record["config"], taps))
        wait_app(name, args.timeout, gone=True)
        # Keys are per tap name: a tap created again under this name must not accept the old ones.
        revoked = AdminClient(record["base_url"], _admin_key(root)).request("DELETE", f"/admin/taps/{name}/keys")
        print(f"deleted {name}; its GPUs are free and its {revoked['revoked']} key(s) revoked")
        return 0
    if args.action == "create":
        if args.client in taps:
            raise RuntimeError(f"tap '{args.client}' exists; use `tap scale` or `tap delete`")
        fields = {
            "client": args.client, "model": args.model, "gpus": args.gpus, "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas, "billing": args.billing, "openai_gateway": not args.no_gateway,
            "engine": _pairs(args.engine), "data_dir": str(root), **_pairs(args.set),
        }  # fmt: skip
        spec: TapSpec = load_args(TapSpec, fields, where="tap")
        held = 0
    else:
        if args.client not in taps:
            raise RuntimeError(f"no tap '{args.client}'")
        old = TapSpec.model_validate(taps[args.client]["spec"])
        update = {
            k: v for k, v in (("min_replicas", args.min_replicas), ("max_replicas", args.max_replicas)) if v is not None
        }
        spec = load_args(TapSpec, old.model_dump() | update, where="tap")
        from orch.tapctl import groups_by_app

        held = len([g for g in groups_by_app().get(name, []) if g["state"] == "CREATED"])
    try:
        max_replicas, note = check_capacity(spec, snapshot(), held)
    except InsufficientGPUs as exc:
        raise RuntimeError(f"tap {args.client} {exc}") from None
    if note:
        _say(f"tap {args.client}: {note}")
    taps[args.client] = {
        "spec": spec.model_copy(update={"max_replicas": max_replicas}).model_dump(mode="json"),
        "asked_max_replicas": spec.max_replicas,
    }
    previous = load_taps(root)
    save_taps(root, taps)
    _deploy(desired_config(record["config"], taps))
    try:
        wait_app(name, args.timeout)
    except (RuntimeError, TimeoutError):
        if args.action == "create":  # nothing half-made stays behind
            save_taps(root, previous)
            _deploy(desired_config(record["config"], previous))
            with contextlib.suppress(RuntimeError, TimeoutError):
                wait_app(name, 120, gone=True)
        raise
    where = f"{record['base_url']}{spec.route_prefix()}/v1" if spec.openai_gateway else "in-cluster handle only"
    print(f"tap {name}: {spec.gpus} GPUs per replica, replicas {spec.min_replicas}..{max_replicas}, {where}")
    if args.action == "create" and spec.openai_gateway:
        client = AdminClient(record["base_url"], _admin_key(root))
        body = {"name": args.client, "idempotency_key": f"tap-{args.client}"}
        tenant = client.request("POST", "/admin/tenants", body)["tenant_id"]
        key = client.request("POST", f"/admin/tenants/{tenant}/keys", {"tap": name})
        print(f"tenant {tenant}; key {key['key_id']} for {name} (shown once):")
        print(f"  {key['key']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

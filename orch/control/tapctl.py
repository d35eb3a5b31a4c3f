"""``llama-orch tap create|list|scale|delete``: private taps on the running stack.

The stack's desired state is the Serve config ``up`` deployed (recorded in ``<data dir>/up.json``)
plus one application per private tap (``<data dir>/taps.json``). Every change deploys that whole
state declaratively, as ``serve deploy`` does: apps whose config did not change keep running untouched.
Before deploying, the GPUs a tap needs are checked against what the cluster has free, node by node,
so an impossible tap fails at once with one line instead of waiting forever for GPUs.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from orch.capacity import Capacity, InsufficientGPUs, snapshot
from orch.files import locked, write_json_atomic
from orch.serve_config import PRIVATE_TAP_IMPORT_PATH as PRIVATE_IMPORT_PATH
from orch.serve_config import is_tap
from orch.startup import app_start_failure
from orch.tapspec import TapSpec

TAPS_FILE = "taps.json"


def gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def load_taps(root: Path) -> dict[str, dict[str, Any]]:
    """The registered taps; a file that exists but does not parse stops everything (never read as none)."""
    path = root / TAPS_FILE
    if not path.exists():
        return {}
    try:
        taps: dict[str, dict[str, Any]] = json.loads(path.read_text())
    except ValueError as exc:
        raise RuntimeError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
    return taps


def taps_lock(root: Path) -> AbstractContextManager[None]:
    """Hold it from :func:`load_taps` to :func:`save_taps`: two CLI runs at once then never drop a tap.

    >>> with taps_lock(root):  # doctest: +SKIP
    ...     taps = load_taps(root); taps["acme"] = entry; save_taps(root, taps)
    """
    return locked(root / TAPS_FILE)


def save_taps(root: Path, taps: dict[str, dict[str, Any]]) -> None:
    """Writes the registered taps whole (atomic and fsync'd); under :func:`taps_lock` with the load."""
    write_json_atomic(root / TAPS_FILE, taps)


def tap_application(spec: TapSpec) -> dict[str, Any]:
    """The Serve config entry of a private tap (what ``configs/private_tap.example.yaml`` spells out)."""
    return {
        "name": spec.app_name(),
        "route_prefix": spec.route_prefix() if spec.openai_gateway else None,
        "import_path": PRIVATE_IMPORT_PATH,
        "args": spec.model_dump(mode="json", exclude_defaults=True) | {"gpus": spec.gpus},
    }


def stack_ledger_layout(base: dict[str, Any]) -> tuple[int, dict[int, str]]:
    """The ledger shard count and shard -> node resource map of the stack's other apps (one per stack: a
    tenant's shard is its id's hash modulo the count, so every gateway must use the same count and nodes)."""
    layouts = {
        (int(args.get("ledger_shards", 1)), tuple(sorted((int(k), v) for k, v in args.get("ledger_nodes", {}).items())))
        for a in base["applications"]
        if is_tap(a) and a.get("import_path") != PRIVATE_IMPORT_PATH
        for args in [a.get("args", {})]
    }
    if len(layouts) > 1:
        raise ValueError(f"the stack's apps disagree on ledger_shards / ledger_nodes: {sorted(layouts)}")
    shards, nodes = layouts.pop() if layouts else (1, ())
    return shards, dict(nodes)


def desired_config(base: dict[str, Any], taps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``up``'s config with its private apps replaced by the registered taps (``{client: {"spec": ...}}``);
    each tap routes tenants to the stack's ledger shards."""
    shards, nodes = stack_ledger_layout(base)
    apps = [a for a in base["applications"] if a.get("import_path") != PRIVATE_IMPORT_PATH]
    for _, entry in sorted(taps.items()):
        spec = TapSpec.model_validate(entry["spec"])
        if spec.ledger_shards not in (None, shards):
            raise ValueError(f"tap '{spec.client}' has ledger_shards {spec.ledger_shards}; the stack runs {shards}")
        apps.append(tap_application(spec.model_copy(update={"ledger_shards": shards, "ledger_nodes": nodes})))
    return {**base, "applications": apps}


def check_capacity(spec: TapSpec, capacity: Capacity, held_by_tap: int = 0) -> tuple[int, str | None]:
    """How many replicas of ``spec`` can run: raises :class:`InsufficientGPUs` when ``min_replicas`` (at
    least one) groups don't fit; else returns the ``max_replicas`` to deploy, clamped to what fits, with a
    note when clamped. ``held_by_tap`` is how many groups the tap already holds (a scale keeps them)."""
    fit = capacity.max_replicas_that_fit(spec.gpus) + held_by_tap
    need = max(1, spec.autoscaling.min_replicas)
    if fit < need:
        if need == 1 or capacity.max_replicas_that_fit(spec.gpus) == 0:
            raise InsufficientGPUs(capacity.shortfall_message(spec.gpus))
        raise InsufficientGPUs(
            f"needs {need} groups of {gpus(spec.gpus)}, {fit} fit ({capacity.free} free of {capacity.total})"
        )
    if spec.autoscaling.max_replicas <= fit:
        return spec.autoscaling.max_replicas, None
    return fit, f"max_replicas {spec.autoscaling.max_replicas} -> {fit}: only {fit} groups of {gpus(spec.gpus)} fit now"


def wait_app(name: str, timeout_s: float, *, gone: bool = False) -> None:
    """Waits until app ``name`` is RUNNING (or gone); fails fast with Serve's message on DEPLOY_FAILED."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        apps = serve.status().applications
        app = apps.get(name)
        if gone and app is None:
            return
        if app is not None and not gone:
            if app.status == "RUNNING":
                return
            if cause := app_start_failure(app):
                raise RuntimeError(f"tap app '{name}': {cause}")
            if app.status == "DEPLOY_FAILED":
                lines = [ln.strip() for ln in app.message.strip().splitlines() if ln.strip()]
                raise RuntimeError(f"tap app '{name}' failed to deploy: {(lines or ['?'])[-1]}")
            last = app.message.strip().splitlines()[-1] if app.message.strip() else str(app.status)
        time.sleep(1)
    raise TimeoutError(f"app '{name}' not {'gone' if gone else 'RUNNING'} after {timeout_s:.0f} s: {last}")


def groups_by_app() -> dict[str, list[dict[str, Any]]]:
    """Serve's placement groups that hold GPUs, per app: ``[{node_id, gpus, state}]`` per replica group."""
    import ray.util

    out: dict[str, list[dict[str, Any]]] = {}
    for pg in ray.util.placement_group_table().values():
        name = pg.get("name") or ""
        if pg.get("state") == "REMOVED" or not name.startswith("SERVE_REPLICA::"):
            continue
        app = name.removeprefix("SERVE_REPLICA::").split("#", 1)[0]
        gpus = sum(int(b.get("GPU", 0)) for b in pg.get("bundles", {}).values())
        if gpus:
            nodes = sorted(set(pg.get("bundles_to_node_id", {}).values()))
            out.setdefault(app, []).append({"node_id": ",".join(nodes), "gpus": gpus, "state": pg.get("state")})
    return out


def stack_overview() -> dict[str, Any]:
    """``GET /admin/taps`` (the dashboard's admin view): every Serve app of the stack with its status, each
    deployment's replicas by state and the GPU groups its replicas hold; and each node's GPUs, total and free."""
    from ray import serve

    groups = groups_by_app()
    out = []
    for name, app in sorted(serve.status().applications.items()):
        held = [g for g in groups.get(name, []) if g["state"] == "CREATED"]
        deployments = [
            {"name": dep_name, "status": _word(dep.status),
             "replicas": {_word(state): n for state, n in dep.replica_states.items()}}
            for dep_name, dep in sorted(app.deployments.items())
        ]  # fmt: skip
        out.append({
            "object": "app", "name": name, "kind": _kind(name), "status": _word(app.status),
            "deployments": deployments, "gpu_groups": held, "gpus_reserved": sum(g["gpus"] for g in held),
        })  # fmt: skip
    nodes = [
        {"node_id": n.node_id, "address": n.address, "gpus_total": n.total, "gpus_free": n.free}
        for n in snapshot().nodes
    ]
    return {"object": "list", "data": out, "nodes": nodes}


def _kind(app: str) -> str:
    return "private tap" if app.startswith("private-") else "public tap" if app == "public" else "app"


def _word(status: object) -> str:
    return str(getattr(status, "value", status))


def list_text(taps: dict[str, dict[str, Any]]) -> str:
    """``tap list``: each tap's GPUs reserved and replicas, then each node's GPUs total and free."""
    from ray import serve

    apps = serve.status().applications
    groups = groups_by_app()
    capacity = snapshot()
    names = sorted({*(f"private-{c}" for c in taps), *(a for a in apps if a.startswith("private-"))})
    lines = []
    for name in names:
        client = name.removeprefix("private-")
        entry = taps.get(client, {})
        spec = entry.get("spec", {})
        app = apps.get(name)
        status = str(getattr(app.status, "value", app.status)) if app else "NOT DEPLOYED"
        held = [g for g in groups.get(name, []) if g["state"] == "CREATED"]
        reserved = sum(g["gpus"] for g in held)
        nodes = ", ".join(sorted({g["node_id"][:12] for g in held})) or "-"
        scaling = TapSpec.model_validate(spec).autoscaling if spec else None
        least, most = (scaling.min_replicas, scaling.max_replicas) if scaling else ("?", "?")
        asked = entry.get("asked_max_replicas")
        cap_note = f" (asked {asked}; capped by capacity)" if asked and asked != most else ""
        lines.append(
            f"{name}: {status}, {gpus(spec['gpus']) if 'gpus' in spec else '? GPUs'} per replica, replicas {len(held)} "
            f"(min {least}, max {most}{cap_note}), "
            f"{reserved} GPUs reserved on node {nodes}, model {spec.get('model', '?')}"
        )
    for node in capacity.nodes:
        lines.append(f"node {node.node_id[:12]} ({node.address}): {node.free} of {node.total} GPUs free")
    return "\n".join(lines) if lines else "no private taps"

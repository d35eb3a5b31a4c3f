"""``llama-orch tap create|list|scale|delete``: private taps on the running stack (see ``orch/control/tapctl.py``).

Every change runs under the taps lock, deploys the stack's whole desired state, and waits for the tap;
a tap that fails to start is rolled back, and a deleted tap's keys are revoked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from orch.config import ConfigError
from orch.control.cli_admin import AdminClient, admin_key
from orch.control.cluster import connect, deploy, read_state, read_up


def add_parsers(sub: Any) -> None:
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
    create.add_argument("--separate-gateway", action="store_true",
                        help="a gateway deployment in front of the model, not the routes in each replica")  # fmt: skip
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


def run(root: Path, args: argparse.Namespace) -> int:
    from orch.control.tapctl import list_text, load_taps

    record = read_up(root)
    if record is None or "config" not in record:
        raise RuntimeError(f"no stack recorded in {root}; run `llama-orch up` first")
    state = read_state(root)
    connect(os.environ.get("RAY_ADDRESS") or (state.gcs_address if state else None), state)
    if args.action == "list":
        print(list_text(load_taps(root)))
        return 0
    from orch.control.tapctl import taps_lock

    with taps_lock(root):  # one tap change at a time: a concurrent run never drops this one's change
        return _change_tap(root, args, record)


def _change_tap(root: Path, args: argparse.Namespace, record: dict[str, Any]) -> int:
    from orch.capacity import InsufficientGPUs, snapshot
    from orch.config import load_args
    from orch.control.tapctl import check_capacity, desired_config, load_taps, save_taps, wait_app
    from orch.tapspec import TapSpec

    taps = load_taps(root)
    name = f"private-{args.client}"
    if args.action == "delete":
        if taps.pop(args.client, None) is None:
            raise RuntimeError(f"no tap '{args.client}'")
        save_taps(root, taps)
        deploy(desired_config(record["config"], taps))
        wait_app(name, args.timeout, gone=True)
        # Keys are per tap name: a tap created again under this name must not accept the old ones.
        revoked = AdminClient(record["base_url"], admin_key(root)).request("DELETE", f"/admin/taps/{name}/keys")
        print(f"deleted {name}; its GPUs are free and its {revoked['revoked']} key(s) revoked")
        return 0
    if args.action == "create":
        if args.client in taps:
            raise RuntimeError(f"tap '{args.client}' exists; use `tap scale` or `tap delete`")
        fields = {
            "client": args.client, "model": args.model, "gpus": args.gpus, "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas, "billing": args.billing, "openai_gateway": not args.no_gateway,
            "colocate": not args.separate_gateway, "engine": _pairs(args.engine), "data_dir": str(root),
            **_pairs(args.set),
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
        from orch.control.tapctl import groups_by_app

        held = len([g for g in groups_by_app().get(name, []) if g["state"] == "CREATED"])
    try:
        max_replicas, note = check_capacity(spec, snapshot(), held)
    except InsufficientGPUs as exc:
        raise RuntimeError(f"tap {args.client} {exc}") from None
    if note:
        print(f"tap {args.client}: {note}", file=sys.stderr, flush=True)
    taps[args.client] = {
        "spec": spec.model_copy(
            update={"autoscaling": spec.autoscaling.model_copy(update={"max_replicas": max_replicas})}
        ).model_dump(mode="json"),
        "asked_max_replicas": spec.autoscaling.max_replicas,
    }
    previous = load_taps(root)
    save_taps(root, taps)
    deploy(desired_config(record["config"], taps))
    try:
        wait_app(name, args.timeout)
    except (RuntimeError, TimeoutError):
        if args.action == "create":  # nothing half-made stays behind
            save_taps(root, previous)
            deploy(desired_config(record["config"], previous))
            with contextlib.suppress(RuntimeError, TimeoutError):
                wait_app(name, 120, gone=True)
        raise
    where = f"{record['base_url']}{spec.route_prefix()}/v1" if spec.openai_gateway else "in-cluster handle only"
    print(
        f"tap {name}: {spec.gpus} GPUs per replica, replicas {spec.autoscaling.min_replicas}..{max_replicas}, {where}"
    )
    if args.action == "create" and spec.openai_gateway:
        client = AdminClient(record["base_url"], admin_key(root))
        body = {"name": args.client, "idempotency_key": f"tap-{args.client}"}
        tenant = client.request("POST", "/admin/tenants", body)["tenant_id"]
        key = client.request("POST", f"/admin/tenants/{tenant}/keys", {"tap": name})
        print(f"tenant {tenant}; key {key['key_id']} for {name} (shown once):")
        print(f"  {key['key']}")
    return 0

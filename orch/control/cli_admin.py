"""``llama-orch tenants|keys|credits|account|usage``: thin clients of the running stack's admin API; and
``backup|restore`` of the data dir's money state (:mod:`orch.backup`).

They call it over HTTP with the admin key (``$LLAMA_ORCH_ADMIN_KEY``, else ``<data dir>/admin_key``);
:class:`AdminClient` retries only a refused connection, so a request that may have arrived is never
sent twice (grants and tenants carry idempotency keys, so rerunning a command is safe). ``backup`` asks
each ledger shard's actor over Ray for a copy of its file; ``restore`` needs the stack down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

COMMANDS = ("tenants", "keys", "credits", "account", "usage")
DATA_DIR_COMMANDS = ("backup", "restore")


def admin_key(root: Path) -> str:
    from orch.keys import load_or_create_admin_key

    return load_or_create_admin_key(root)


def admin_key_source(root: Path) -> str:
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
                query: dict[str, str] | None = None, raw: bool = False) -> Any:  # fmt: skip
        """The answer's JSON (``raw``: its bytes); an error answer raises RuntimeError with its message."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.admin_key}", "Content-Type": "application/json"}
        for attempt in range(5):
            req = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return resp.read() if raw else json.loads(resp.read())
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


def add_parsers(sub: Any) -> None:
    tenants = sub.add_parser("tenants", help="create or list tenants").add_subparsers(dest="action", required=True)
    create = tenants.add_parser("create", help="create a tenant; prints its id")
    create.add_argument("name")
    create.add_argument("--idempotency-key", help="a retry with the same key returns the same tenant")
    tenants.add_parser("list", help="tenants with their balances")
    ts = tenants.add_parser("set", help="a tenant's priority, fair-share weight and rate limits (PATCH)")
    ts.add_argument("tenant_id")
    ts.add_argument("--priority", choices=["interactive", "batch"])
    ts.add_argument("--weight", type=float, help="fair-share weight when a model is saturated (default 1)")
    ts.add_argument("--rpm", type=int, help="requests per minute, all the tenant's keys (0: no limit)")
    ts.add_argument("--tpm", type=int, help="tokens per minute, all the tenant's keys (0: no limit)")
    keys = sub.add_parser("keys", help="create or revoke API keys").add_subparsers(dest="action", required=True)
    kc = keys.add_parser("create", help="a new key for a tenant (printed once)")
    kc.add_argument("tenant_id")
    kc.add_argument("--tap", help="the tap the key is for (default: the tap serving the call)")
    kc.add_argument("--priority", choices=["interactive", "batch"], help="its requests' class (default: the tenant's)")
    kc.add_argument("--rpm", type=int, help="requests per minute of this key")
    kc.add_argument("--tpm", type=int, help="tokens per minute of this key")
    kr = keys.add_parser("revoke", help="revoke a key (refused everywhere within 5 s)")
    kr.add_argument("key_id")
    credits = sub.add_parser("credits", help="grant prepaid credits").add_subparsers(dest="action", required=True)
    grant = credits.add_parser("grant", help="add a grant, valid 12 months")
    grant.add_argument("tenant_id")
    grant.add_argument("micro_credits", type=int, help="1 credit = 1,000,000 micro-credits")
    grant.add_argument("--idempotency-key", help="repeat a grant safely: the same key never grants twice")
    account = sub.add_parser("account", help="a tenant's balance, open holds and grants")
    account.add_argument("tenant_id")
    usage = sub.add_parser(
        "usage",
        help="usage reports and the Parquet export",
        description="`usage TENANT_ID`: a tenant's totals and rows (or groups); `usage all`: every tenant's; "
        "`usage export OUT.parquet [--tenant T]`: every row in [since, until) as Parquet",
    )
    usage.add_argument("target", metavar="TENANT_ID|all|export")
    usage.add_argument("out", nargs="?", type=Path, help="export: the Parquet file to write")
    usage.add_argument("--tenant", help="export: only this tenant's rows")
    usage.add_argument("--since", help="ISO date or time (UTC), inclusive")
    usage.add_argument("--until", help="ISO date or time (UTC), exclusive")
    usage.add_argument("--group-by", choices=["day", "model", "user", "tenant", "day_model"])
    for p in (create, ts, kc, kr, grant, account, usage, tenants.choices["list"]):
        p.add_argument("--url", help="the stack's base URL (default: the one `up` recorded)")
        p.add_argument("--json", action="store_true", help="print the API's JSON")
    backup = sub.add_parser("backup", help="copy the running stack's ledger shards and secrets into a new folder")
    backup.add_argument("dest", type=Path, help="a new or empty folder")
    restore = sub.add_parser("restore", help="restore a backup into the data dir (the stack must be down)")
    restore.add_argument("src", type=Path, help="a folder `llama-orch backup` wrote")
    restore.add_argument("--force", action="store_true", help="replace the data dir's ledger files and secrets")


def run(root: Path, args: argparse.Namespace, recorded_base_url: str | None) -> int:
    base = args.url or recorded_base_url
    if base is None:
        raise RuntimeError(f"no stack recorded in {root}; run `llama-orch up` or pass --url")
    client = AdminClient(base, admin_key(root))
    action = getattr(args, "action", None)
    if args.command == "tenants" and action == "create":
        key = args.idempotency_key or f"cli-{uuid.uuid4().hex}"
        out = client.request("POST", "/admin/tenants", {"name": args.name, "idempotency_key": key})
        text = out["tenant_id"]
    elif args.command == "tenants" and action == "set":
        body = {f: getattr(args, f) for f in ("priority", "weight", "rpm", "tpm") if getattr(args, f) is not None}
        body |= {f: None for f in ("rpm", "tpm") if body.get(f) == 0}  # 0: no limit
        out = client.request("PATCH", f"/admin/tenants/{args.tenant_id}", body)
        text = ", ".join(f"{f} {out[f]}" for f in ("priority", "weight", "rpm", "tpm"))
    elif args.command == "tenants":
        out = client.request("GET", "/admin/tenants")
        text = "\n".join(f"{t['tenant_id']}  {t['balance_micro_credits']:>15,} µc  {t['name']}" for t in out["data"])
    elif args.command == "keys" and action == "create":
        fields = {f: getattr(args, f) for f in ("tap", "priority", "rpm", "tpm")}
        out = client.request("POST", f"/admin/tenants/{args.tenant_id}/keys", {k: v for k, v in fields.items() if v})
        text = out["key"]
        print(f"key {out['key_id']} for tenant {out['tenant_id']} on tap {out['tap']}; it is shown only this once",
              file=sys.stderr)  # fmt: skip
    elif args.command == "keys":
        out = client.request("DELETE", f"/admin/keys/{args.key_id}")
        text = f"revoked {out['key_id']}"
    elif args.command == "credits":
        key = args.idempotency_key or f"cli-{uuid.uuid4().hex}"
        body = {"micro_credits": args.micro_credits, "idempotency_key": key}
        out = client.request("POST", f"/admin/tenants/{args.tenant_id}/grants", body)
        again = " (already applied: nothing changed)" if out["replayed"] else ""
        text = f"granted {out['micro_credits']:,} µc to {out['tenant_id']}, expires {out['expires_at']}{again}"
        print(f"idempotency key: {key}", file=sys.stderr)
    elif args.command == "account":
        out = client.request("GET", f"/admin/tenants/{args.tenant_id}/account")
        text = _account_text(out)
    elif args.target == "export":
        if args.out is None:
            raise RuntimeError("usage export needs the file to write, e.g. `llama-orch usage export usage.parquet`")
        query = {"since": args.since, "until": args.until, "tenant": args.tenant}
        data = client.request("GET", "/admin/usage/export", query=query, raw=True)
        tmp = args.out.with_name(args.out.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(args.out)  # a reader never sees half a file
        out = {"path": str(args.out), "bytes": len(data)}
        text = f"wrote {args.out} ({len(data):,} bytes)"
    else:
        query = {"since": args.since, "until": args.until, "group_by": args.group_by}
        path = "/admin/usage" if args.target == "all" else f"/admin/tenants/{args.target}/usage"
        out = client.request("GET", path, query=query)
        text = _usage_text(out)
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


def running_ledger(root: Path, why: str, deadline_s: float = 60.0) -> Any:
    """A :class:`actors.ledger_client.LedgerClient` of the running stack's shards (where ``ledger_nodes`` puts
    them), with this process connected to its cluster; RuntimeError (``why`` a stack is needed) when none runs."""
    from actors.ledger_client import LedgerClient
    from orch.control.cluster import connect, read_state, read_up
    from orch.control.tapctl import stack_ledger_layout

    record, state = read_up(root), read_state(root)
    if record is None or "config" not in record or (state is None and not os.environ.get("RAY_ADDRESS")):
        raise RuntimeError(f"no stack runs for data dir {root}; {why} (`up` first)")
    connect(os.environ.get("RAY_ADDRESS") or (state.gcs_address if state else None), state)
    shards, nodes = stack_ledger_layout(record["config"])
    return LedgerClient(root, shards, deadline_s=deadline_s, nodes=nodes)


def run_data_dir(root: Path, args: argparse.Namespace) -> int:
    """``backup DEST``: each ledger shard of the running stack copies its own file (one consistent read while
    it goes on committing) into ``DEST``, with the data dir's secrets and a manifest. ``restore SRC``: the
    backup, checked against its manifest, into the data dir of a stopped stack."""
    try:
        return _backup_or_restore(root, args)
    except OSError as exc:  # a folder not writable, a disk full: one line, not a traceback
        raise RuntimeError(f"{args.command}: {exc.strerror or exc}: {exc.filename}") from None


def _backup_or_restore(root: Path, args: argparse.Namespace) -> int:
    from orch.backup import backup, ledger_file, restore
    from orch.keys import PEPPER_ENV, PEPPER_FILE

    if args.command == "restore":
        manifest = restore(args.src, root, force=args.force)
        print(f"restored the backup of {manifest['created_at']} into {root}: {', '.join(manifest['files'])}")
        print(f"start it with ledger_shards: {manifest['shards']} (`llama-orch up`)")
        return 0
    import asyncio

    ledger = running_ledger(root, "backup copies a running stack's ledger")
    shards, nodes = ledger.shards, ledger.nodes
    manifest = asyncio.run(backup(root, args.dest, shards, ledger.call))
    for name, f in manifest["files"].items():
        copied = f"{f['ops']:,} ops (to seq {f['seq']}), " if "seq" in f else ""
        print(f"{name}: {copied}{f['bytes']:,} bytes" + (f", {f['seconds']:.2f} s" if "seconds" in f else ""))
    for shard, node in sorted(nodes.items()):
        if manifest["files"][ledger_file(shard)].get("elsewhere"):
            print(f"{ledger_file(shard)} was written on the node of resource {node}: copy it into {args.dest} here")
    if PEPPER_FILE not in manifest["files"] and os.environ.get(PEPPER_ENV):
        print(f"the key pepper is ${PEPPER_ENV}'s, not a file: keep it with the backup", file=sys.stderr)
    print(f"backup of {shards} ledger shard(s) in {args.dest.resolve()}")
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
        head = (r["key"] or "(no user)") if "key" in r else f"{r['ts']} {r['model']} {r['status']}"
        lines.append(f"  {head}: {r['prompt_tokens']} + {r['completion_tokens']} tokens, {r['cost_micro']:,} µc")
    return "\n".join(lines)

"""``llama-orch tools list`` (the toolkit's tools from installed plugins) and ``llama-orch batch`` (the
batch runner of :mod:`orch.toolkit.batch` over a JSON-lines file of prompts)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from orch.config import ConfigError


def add_parsers(sub: Any) -> None:
    tools = sub.add_parser("tools", help="the toolkit's tools that installed plugins declare")
    tools.add_subparsers(dest="action", required=True).add_parser("list", help="each tool with its package")
    batch = sub.add_parser("batch", help="run a JSON-lines file of prompts through a tap, under a credit cap")
    batch.add_argument("prompts", type=Path, help="one prompt per line: a JSON string, or an object with "
                       "messages (or prompt) and optionally id, max_tokens, ...")  # fmt: skip
    batch.add_argument("--model", required=True)
    batch.add_argument("--out", type=Path, required=True, help="results (Parquet); OUT.journal makes it resumable")
    batch.add_argument("--cap", type=int, default=None, help="credit cap in micro-credits (never exceeded)")
    batch.add_argument("--concurrency", type=int, default=4)
    batch.add_argument("--max-tokens", type=int, default=256)
    batch.add_argument("--tap", default=None, help="a private tap's client name (default: the public tap)")
    batch.add_argument("--base-url", default=None, help="default: the stack `up` started")
    batch.add_argument("--no-progress", action="store_true")


def cmd_tools_list() -> int:
    from orch.plugins import TOOLS, discover, members

    plugins = discover(TOOLS)
    if not plugins:
        print("no tools: install a package with llama_orch.tools entry points")
    for p in plugins:
        if p.error is not None:
            print(f"{p.name:<24} {p.package} {p.version}  BROKEN: {p.error}")
            continue
        for t in members(p):
            print(f"{t.name:<24} {p.package} {p.version}  {t.description}")
    return 0


def cmd_batch(args: argparse.Namespace, base_url: str | None) -> int:
    from orch.sdk import AsyncClient
    from orch.toolkit import run_batch

    key = os.environ.get("LLAMA_ORCH_API_KEY")
    if not key:
        raise ConfigError("set LLAMA_ORCH_API_KEY to the tenant key the batch runs (and pays) with")
    base = args.base_url or base_url
    if base is None:
        raise ConfigError("no stack is up here: give --base-url")
    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    client = AsyncClient(base, key, tap=args.tap)
    report = run_batch(client, args.model, prompts, args.out, credit_cap=args.cap, concurrency=args.concurrency,
                       max_tokens=args.max_tokens, progress=not args.no_progress)  # fmt: skip
    print(json.dumps(dataclasses.asdict(report), default=str))
    return 0 if report.left == 0 else 3


def check_plugins(config: dict[str, Any]) -> None:
    """For ``up``, before it deploys: a tap that names a hook that is missing or fails to load is a config
    error (a tap must not run without a guardrail it was configured with)."""
    from orch.hooks import hook_spec
    from orch.plugins import HOOKS, load
    from orch.serve_config import is_tap

    for app in filter(is_tap, config["applications"]):
        for spec in (app.get("args") or {}).get("hooks") or []:
            try:
                load(HOOKS, hook_spec(spec)[0])
            except (LookupError, ImportError) as exc:
                raise ConfigError(f"application {app.get('name')!r}: {exc}") from None


def report_broken_plugins() -> None:
    """For ``up``, once the stack answers: each installed plugin that fails to load, on stderr (the stack
    runs without it)."""
    from orch.plugins import broken

    for p in broken():
        print(f"plugin {p.group}:{p.name} of {p.package} {p.version} failed to load (left out): {p.error}",
              file=sys.stderr)  # fmt: skip

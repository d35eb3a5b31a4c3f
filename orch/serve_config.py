"""Serve config files with llama-orch apps: read, and every app's ``args`` validated by its own model.

Kept apart from ``orch/config.py`` because private taps' args are :class:`orch.tapspec.TapSpec`, which
builds on the config models: here both are known without an import circle.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from orch.config import ConfigError, DashboardConfig, StrictModel, TapConfig, load_args
from orch.tapspec import TapSpec

PUBLIC_TAP_IMPORT_PATH = "apps.public_tap:build"
PRIVATE_TAP_IMPORT_PATH = "apps.private_tap:build"
DASHBOARD_IMPORT_PATH = "apps.dashboard:build"
ARGS: dict[str, type[StrictModel]] = {
    PUBLIC_TAP_IMPORT_PATH: TapConfig, PRIVATE_TAP_IMPORT_PATH: TapSpec, DASHBOARD_IMPORT_PATH: DashboardConfig
}  # fmt: skip  # each llama-orch app's args model


def is_tap(app: dict[str, Any]) -> bool:
    """Whether a Serve config entry is a tap (public or private): an app with models, a data dir, a ledger."""
    return app.get("import_path") in (PUBLIC_TAP_IMPORT_PATH, PRIVATE_TAP_IMPORT_PATH)


def load_serve_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a Serve config file and validates every llama-orch application's ``args``."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config error: {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict) or not config.get("applications"):
        raise ConfigError(f"config error: {path} has no 'applications'")
    for i, app in enumerate(config["applications"]):
        import_path = str(app.get("import_path", ""))
        if import_path in ARGS:
            load_args(ARGS[import_path], app.get("args") or {}, where=f"applications[{i}].args")
    return config

"""Plugins: pip-installed packages extend llama-orch through entry points, without a fork.

- ``llama_orch.tools``: each entry point names a toolkit tool (an :class:`orch.toolkit.Tool`, what
  ``@tool`` makes) or a list of them; ``llama-orch tools list`` shows them with their package.
- ``llama_orch.hooks``: each names a gateway hook class (:mod:`orch.hooks`); a tap's ``hooks:`` config
  names the ones it runs.

A plugin that fails to import is reported (``llama-orch up`` prints it), never fatal to the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

TOOLS = "llama_orch.tools"
HOOKS = "llama_orch.hooks"


@dataclass(frozen=True, slots=True)
class Plugin:
    """One entry point: its name, the package that declares it, and what it loaded (or why it failed)."""

    group: str
    name: str
    package: str
    version: str
    value: Any = None
    error: str | None = None


def members(plugin: Plugin) -> list[Any]:
    """What a loaded entry point names, as a list (a tools entry point may name one tool or a list)."""
    return list(plugin.value) if isinstance(plugin.value, list | tuple) else [plugin.value]


def _package(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    return (dist.name, dist.version) if dist is not None else ("?", "?")


def discover(group: str) -> list[Plugin]:
    """Every entry point of ``group``, loaded; one that raises on import is returned with its ``error``."""
    found = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        package, version = _package(ep)
        try:
            found.append(Plugin(group, ep.name, package, version, ep.load()))
        except Exception as exc:  # a broken plugin is reported, not fatal
            found.append(Plugin(group, ep.name, package, version, error=f"{type(exc).__name__}: {exc}"))
    return found


def load(group: str, name: str) -> Plugin:
    """The entry point ``name`` of ``group``; ``LookupError`` (saying which exist) when none has that name,
    ``ImportError`` when it fails to load."""
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        known = sorted(ep.name for ep in entry_points(group=group))
        raise LookupError(f"no {group} plugin named {name!r} is installed (installed: {', '.join(known) or 'none'})")
    package, version = _package(matches[0])
    try:
        value = matches[0].load()
    except Exception as exc:
        raise ImportError(
            f"the {group} plugin {name!r} of {package} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    return Plugin(group, name, package, version, value)


def broken() -> list[Plugin]:
    """The installed plugins of both groups that fail to load (for ``llama-orch up`` to report)."""
    return [p for group in (TOOLS, HOOKS) for p in discover(group) if p.error is not None]

"""Gateway hooks: custom features in a tap's request path (a guardrail, a prompt rewrite, an audit sink),
from pip-installed packages through the ``llama_orch.hooks`` entry points, named per tap in its config::

    hooks:
      - banned-words                          # an entry point's name
      - {name: audit, options: {path: /var/log/audit.jsonl}}

A hook is a :class:`Hook` subclass; it overrides either method or both:

- ``pre_call(call, body)``: before the request is parsed, queued or holds anything. It returns the body
  (changed or not) or None (unchanged); :class:`Refuse` refuses the request with an OpenAI-shaped error
  (400 by default) that holds nothing. Hooks run in their config order, each on the body the last gave.
- ``post_call(call, usage)``: after the request is settled, in a task of its own, with its usage row
  (tokens, cost, status, finish reason): the money and the row are committed by then whatever it does.

A hook that raises in ``pre_call`` fails the request cleanly (500, ``hook_failed``, nothing held); one that
raises in ``post_call`` is logged and counted. A tap with no hooks runs none of this: the gateway checks
one attribute.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any

from orch.errors import APIError, InvalidRequest
from orch.store import UsageRow

log = logging.getLogger("orch.hooks")


@dataclass(frozen=True, slots=True)
class Call:
    """What a hook knows of the request: who sent it, where, which route."""

    tenant_id: str
    key_id: str | None
    tap: str
    route: str  # chat | completions | embeddings


class Refuse(InvalidRequest):
    """Raised by ``pre_call`` to refuse the request: an OpenAI-shaped 400 (``code`` as given)."""

    def __init__(self, message: str, code: str = "refused_by_policy") -> None:
        super().__init__(message, code=code)


class HookFailed(APIError):
    status = 500
    type = "server_error"


class Hook:
    """The base of a gateway hook; ``options`` come from the tap's config."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    async def pre_call(self, call: Call, body: dict[str, Any]) -> dict[str, Any] | None:
        return None

    async def post_call(self, call: Call, usage: UsageRow) -> None:
        return None


class Hooks:
    """A tap's hooks, in order. Build with :func:`load_hooks`."""

    def __init__(self, hooks: list[tuple[str, Hook]]) -> None:
        self._pre = [(n, h) for n, h in hooks if type(h).pre_call is not Hook.pre_call]
        self._post = [(n, h) for n, h in hooks if type(h).post_call is not Hook.post_call]
        self.names = [n for n, _ in hooks]
        self.post_failures = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def has_post(self) -> bool:
        return bool(self._post)

    async def pre_call(self, call: Call, body: dict[str, Any]) -> dict[str, Any]:
        for name, hook in self._pre:
            try:
                changed = await hook.pre_call(call, body)
            except APIError:
                raise  # Refuse, or another OpenAI-shaped error of the hook's choosing
            except Exception as exc:
                log.error("hook %s failed in pre_call: %s", name, type(exc).__name__)
                raise HookFailed(f"The tap's hook {name!r} failed; nothing was charged.", code="hook_failed") from exc
            if changed is not None:
                if not isinstance(changed, dict):
                    raise HookFailed(f"The tap's hook {name!r} returned a {type(changed).__name__}, not a body.",
                                     code="hook_failed")  # fmt: skip
                body = changed
        return body

    def post_call(self, call: Call, usage: UsageRow) -> None:
        """Runs each ``post_call`` in a task of its own: the request path never waits for them."""
        for name, hook in self._post:
            task = asyncio.ensure_future(self._post_one(name, hook, call, usage))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post_one(self, name: str, hook: Hook, call: Call, usage: UsageRow) -> None:
        try:
            await hook.post_call(call, usage)
        except Exception:
            self.post_failures += 1
            log.exception("hook %s failed in post_call of %s", name, usage.request_id)


def hook_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """(name, options) of one ``hooks:`` entry: a name, a ``{name, options}`` dict (a config not yet
    validated) or a ``HookSpec`` (a validated TapConfig's)."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        return spec["name"], dict(spec.get("options") or {})
    return spec.name, dict(spec.options)


def load_hooks(specs: list[Any]) -> Hooks | None:
    """The hooks a tap's config names (entry point names, ``{name, options}`` dicts or ``HookSpec``s);
    None for none.
    A hook that fails to load raises: a tap must not run without a guardrail it was configured with."""
    from orch.plugins import HOOKS, load

    if not specs:
        return None
    hooks = []
    for spec in specs:
        name, options = hook_spec(spec)
        cls = load(HOOKS, name).value
        if not (inspect.isclass(cls) and issubclass(cls, Hook)):
            raise TypeError(f"the hook plugin {name!r} is not a subclass of orch.hooks.Hook: {cls!r}")
        hooks.append((name, cls(**options)))
    return Hooks(hooks)

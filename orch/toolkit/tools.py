"""``@tool``: a Python function as an OpenAI tool, its JSON schema derived from its type hints (pydantic),
its description from its docstring; and :class:`Registry`, the tools an agent may call.

>>> @tool
... def add(a: int, b: int = 1) -> int:
...     '''Adds two numbers.
...
...     Args:
...         a: the first number
...         b: the second one
...     '''
...     return a + b
>>> add.spec()["function"]["parameters"]["properties"]["a"]
{'description': 'the first number', 'type': 'integer'}
>>> add.call('{"a": 2, "b": "3"}'), add(2)  # arguments are validated (and coerced) as pydantic does
(5, 3)
>>> Registry([add]).specs()[0]["function"]["name"]
'add'
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

_ARG_LINE = re.compile(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$")


class ToolError(Exception):
    """A tool call that could not run: unknown tool, arguments that are not JSON or fail its schema."""


def _docstring(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The description (the docstring up to ``Args:``) and each argument's line under ``Args:``."""
    doc = inspect.getdoc(fn) or ""
    parts = re.split(r"^(?:Args|Arguments|Parameters):\s*$", doc, maxsplit=1, flags=re.M)
    head, args = parts[0], parts[1] if len(parts) > 1 else ""
    described = {}
    for line in args.splitlines():
        if m := _ARG_LINE.match(line):
            described[m.group(1)] = m.group(2).strip()
    return " ".join(head.split()), described


class Tool:
    """A function the model may call: ``name``, ``description``, ``parameters`` (JSON schema), and the
    function itself (sync or async). Calling the Tool calls the function."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise ValueError(f"a tool name is 1-64 letters, digits, _ or -: {self.name!r}")
        doc, described = _docstring(fn)
        self.description = description if description is not None else doc
        hints = get_type_hints(fn, include_extras=True)
        fields: dict[str, Any] = {}
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"tool {self.name}: *args and **kwargs have no schema; name each parameter")
            if param.name not in hints:
                raise TypeError(f"tool {self.name}: parameter {param.name!r} needs a type hint (its schema)")
            default = ... if param.default is param.empty else param.default
            fields[param.name] = (hints[param.name], Field(default, description=described.get(param.name)))
        self.arguments: type[BaseModel] = create_model(  # type: ignore[call-overload]
            f"{self.name}_arguments", __config__=ConfigDict(extra="forbid"), **fields
        )

    @property
    def parameters(self) -> dict[str, Any]:
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return schema

    def spec(self) -> dict[str, Any]:
        """The tool as a chat request's ``tools`` entry."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}

    def _bind(self, arguments: str | dict[str, Any]) -> dict[str, Any]:
        try:
            raw = json.loads(arguments or "{}") if isinstance(arguments, str) else arguments
            if not isinstance(raw, dict):
                raise ToolError(f"{self.name}: arguments must be a JSON object, got {type(raw).__name__}")
            model = self.arguments.model_validate(raw)
        except json.JSONDecodeError as exc:
            raise ToolError(f"{self.name}: arguments are not JSON ({exc.msg})") from None
        except ValidationError as exc:
            raise ToolError(f"{self.name}: {exc.errors(include_url=False)}") from None
        return {name: getattr(model, name) for name in type(model).model_fields}

    def call(self, arguments: str | dict[str, Any]) -> Any:
        """Runs the tool on a call's ``arguments`` (JSON text or a dict), validated; an async tool runs to
        its end on a loop of its own."""
        if inspect.iscoroutinefunction(self.fn):
            return asyncio.run(self.fn(**self._bind(arguments)))
        return self.fn(**self._bind(arguments))

    async def acall(self, arguments: str | dict[str, Any]) -> Any:
        """:meth:`call` from a running loop: an async tool is awaited, a sync one runs in a thread."""
        bound = self._bind(arguments)
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(**bound)
        return await asyncio.to_thread(self.fn, **bound)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None) -> Any:
    """``@tool`` or ``@tool(name=..., description=...)``: the function as a :class:`Tool`."""
    if fn is None:
        return lambda f: Tool(f, name, description)
    return Tool(fn, name, description)


def result_text(result: Any) -> str:
    """A tool's result as the text a tool message carries: a string as is, anything else as JSON."""
    return result if isinstance(result, str) else json.dumps(result, default=str)


class Registry:
    """Tools by name. ``Registry.from_plugins()`` adds every tool that installed packages declare."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self.packages: dict[str, str] = {}  # tool name -> the package that declared it (plugins)
        for t in tools:
            self.add(t)

    def add(self, t: Tool, package: str | None = None) -> Tool:
        if not isinstance(t, Tool):
            raise TypeError(f"not a Tool (decorate the function with @tool): {t!r}")
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        if package is not None:
            self.packages[t.name] = package
        return t

    @classmethod
    def from_plugins(cls, *tools: Tool) -> Registry:
        """``tools`` and every tool of the ``llama_orch.tools`` entry points that loads (one that fails is
        left out: ``llama-orch tools list`` says why)."""
        from orch.plugins import TOOLS, discover, members

        registry = cls(tools)
        for plugin in discover(TOOLS):
            if plugin.error is None:
                for t in members(plugin):
                    registry.add(t, f"{plugin.package} {plugin.version}")
        return registry

    def __getitem__(self, name: str) -> Tool:
        found = self._tools.get(name)
        if found is None:
            raise ToolError(f"no tool named {name!r} (tools: {', '.join(self._tools) or 'none'})")
        return found

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        """Every tool as a chat request's ``tools``."""
        return [t.spec() for t in self._tools.values()]

"""An agent loop over OpenAI tool calls: the model asks for calls, the tools run, their results go back
as ``tool`` messages, until the model answers in text (or the turns run out: the last turn allows no
tool).

``tool_choice`` is the first turn's (``"auto"``, ``"required"``, or a tool's name), ``then`` the later
turns'. On a small model ``tool_choice="required"`` and ``then="none"`` make a reliable two-step agent:
the tap's guided decoding makes the call valid against the tool's schema, and the answer is written from
the result. ``client`` is any OpenAI-compatible client: :class:`orch.Client`, ``openai.OpenAI`` (use
:meth:`Agent.arun` with :class:`orch.AsyncClient` or ``openai.AsyncOpenAI``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orch.toolkit.tools import Registry, Tool, result_text


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str
    result: str  # what the model was told: the tool's result, or "error: ..." when it could not run
    ok: bool


@dataclass(slots=True)
class AgentResult:
    answer: str
    messages: list[dict[str, Any]]  # the whole conversation, the answer last
    calls: list[ToolCall] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    turns: int = 0


def _choice(value: str) -> str | dict[str, Any]:
    return value if value in ("auto", "required", "none") else {"type": "function", "function": {"name": value}}


class Agent:
    """``Agent(client, model, tools).run("...")``: see the module's text."""

    def __init__(
        self,
        client: Any,
        model: str,
        tools: Registry | Iterable[Tool],
        *,
        system: str | None = None,
        tool_choice: str = "auto",
        then: str = "auto",
        max_turns: int = 4,
        **request: Any,  # more chat request fields: temperature, max_tokens, ...
    ) -> None:
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self.client, self.model, self.system = client, model, system
        self.tools = tools if isinstance(tools, Registry) else Registry(tools)
        self.tool_choice, self.then, self.max_turns = tool_choice, then, max_turns
        self.request = {"temperature": 0} | request

    def _start(self, prompt: str | list[dict[str, Any]]) -> AgentResult:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return AgentResult("", messages)

    def _body(self, run: AgentResult) -> dict[str, Any]:
        choice = self.tool_choice if run.turns == 0 else self.then
        if run.turns == self.max_turns - 1:
            choice = "none"  # the last turn answers
        body = {"model": self.model, "messages": run.messages, **self.request}
        if len(self.tools) and choice != "none":
            body |= {"tools": self.tools.specs(), "tool_choice": _choice(choice)}
        return body

    def _absorb(self, run: AgentResult, response: Any) -> list[Any]:
        """Adds the reply to the conversation; returns its tool calls (none: it is the answer)."""
        run.turns += 1
        if response.usage is not None:
            run.usage["prompt_tokens"] += response.usage.prompt_tokens
            run.usage["completion_tokens"] += response.usage.completion_tokens
        message = response.choices[0].message
        calls = list(message.tool_calls or [])
        entry: dict[str, Any] = {"role": "assistant", "content": message.content}
        if calls:
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in calls
            ]
        run.messages.append(entry)
        if not calls:
            run.answer = message.content or ""
        return calls

    def _told(self, run: AgentResult, call: Any, result: Any, error: Exception | None) -> None:
        text = f"error: {error}" if error is not None else result_text(result)
        run.calls.append(ToolCall(call.function.name, call.function.arguments, text, error is None))
        run.messages.append({"role": "tool", "tool_call_id": call.id, "content": text})

    def run(self, prompt: str | list[dict[str, Any]]) -> AgentResult:
        """Runs the loop with a sync client (``openai.OpenAI``, :class:`orch.Client`)."""
        run = self._start(prompt)
        while True:
            calls = self._absorb(run, self.client.chat.completions.create(**self._body(run)))
            if not calls:
                return run
            for call in calls:
                try:
                    self._told(run, call, self.tools[call.function.name].call(call.function.arguments), None)
                except Exception as exc:  # the model hears of it and may try again
                    self._told(run, call, None, exc)

    async def arun(self, prompt: str | list[dict[str, Any]]) -> AgentResult:
        """:meth:`run` with an async client (``openai.AsyncOpenAI``, :class:`orch.AsyncClient`)."""
        run = self._start(prompt)
        while True:
            calls = self._absorb(run, await self.client.chat.completions.create(**self._body(run)))
            if not calls:
                return run
            for call in calls:
                try:
                    self._told(run, call, await self.tools[call.function.name].acall(call.function.arguments), None)
                except Exception as exc:
                    self._told(run, call, None, exc)


def conversation(run: AgentResult) -> str:
    """The run as text, a line per message (for logs and notebooks)."""
    lines = []
    for m in run.messages:
        calls = m.get("tool_calls")
        said = json.dumps([c["function"] for c in calls]) if calls else m.get("content")
        lines.append(f"{m['role']}: {said}")
    return "\n".join(lines)

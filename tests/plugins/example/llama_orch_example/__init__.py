"""llama-orch-example: one toolkit tool and three gateway hooks, declared as entry points."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orch.hooks import Call, Hook, Refuse
from orch.store import UsageRow
from orch.toolkit import tool


@tool
def word_count(text: str) -> int:
    """Counts the words of a text.

    Args:
        text: the text whose words to count
    """
    return len(text.split())


def _prompt_text(body: dict[str, Any]) -> str:
    return json.dumps([body.get("messages"), body.get("prompt"), body.get("input")]).lower()


class BannedWords(Hook):
    """A guardrail: refuses (400, ``banned_word``) a request whose prompt has one of ``words``."""

    def __init__(self, words: list[str] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.words = [w.lower() for w in (words or ["forbidden"])]

    async def pre_call(self, call: Call, body: dict[str, Any]) -> dict[str, Any] | None:
        text = _prompt_text(body)
        for word in self.words:
            if word in text:
                raise Refuse(f"The prompt contains a banned word ({word!r}).", code="banned_word")
        return None


class Audit(Hook):
    """An audit sink: a JSON line per settled request (``path``), and a prompt rewrite: a ``user`` of
    ``shout`` gets its last message upper-cased."""

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(**options)
        self.path = Path(path)

    async def pre_call(self, call: Call, body: dict[str, Any]) -> dict[str, Any] | None:
        if body.get("user") == "shout" and body.get("messages"):
            last = dict(body["messages"][-1])
            last["content"] = str(last.get("content", "")).upper()
            return body | {"messages": [*body["messages"][:-1], last]}
        return None

    async def post_call(self, call: Call, usage: UsageRow) -> None:
        line = {"tap": call.tap, "route": call.route, "tenant_id": usage.tenant_id, "request_id": usage.request_id,
                "status": usage.status, "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens, "cost_micro": usage.cost_micro}  # fmt: skip
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


class Faulty(Hook):
    """Raises where a request's ``user`` says so: ``raise-in-pre`` or ``raise-in-post``."""

    async def pre_call(self, call: Call, body: dict[str, Any]) -> dict[str, Any] | None:
        if body.get("user") == "raise-in-pre":
            raise RuntimeError("the faulty hook raised in pre_call")
        return None

    async def post_call(self, call: Call, usage: UsageRow) -> None:
        if usage.end_user == "raise-in-post":
            raise RuntimeError("the faulty hook raised in post_call")

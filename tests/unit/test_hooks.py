"""Gateway hooks and plugin discovery without a stack: the example plugin (tests/plugins/example, installed
by scripts/check) is loaded through its real entry points; the gateway's use of them is tested against
the real stack in ``tests/integration/test_plugins.py``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orch.config import ConfigError, TapConfig
from orch.control.cli_toolkit import check_plugins, report_broken_plugins
from orch.errors import APIError
from orch.hooks import Call, Hook, Hooks, load_hooks
from orch.plugins import HOOKS, TOOLS, broken, discover, load
from orch.store import UsageRow

CALL = Call("t-1", "k-1", "public", "chat")
ROW = UsageRow("chatcmpl-1", datetime.now(UTC), "t-1", "k-1", "public", "m", 3, 4, 5, 6, 7, "ok", "stop",
               "raise-in-post", None)  # fmt: skip


def test_the_example_plugins_entry_points_load_and_the_broken_one_is_reported() -> None:
    tools = {p.name: p for p in discover(TOOLS)}
    assert tools["word_count"].error is None and tools["word_count"].package == "llama-orch-example"
    assert "ModuleNotFoundError" in (tools["broken-example"].error or "")
    assert {p.name for p in broken()} >= {"broken-example"}
    assert {p.name for p in discover(HOOKS)} >= {"banned-words", "audit", "faulty"}
    with pytest.raises(LookupError, match="no llama_orch.hooks plugin named 'nope'.*banned-words"):
        load(HOOKS, "nope")


def test_pre_call_hooks_chain_change_or_refuse(tmp_path: Path) -> None:
    config = {"models": [{"name": "m"}], "hooks": [{"name": "audit", "options": {"path": str(tmp_path / "a.jsonl")}},
                                                    "banned-words"]}  # fmt: skip
    hooks = load_hooks(TapConfig.model_validate(config).hooks)  # as the gateway gets them: validated
    assert hooks is not None and hooks.names == ["audit", "banned-words"]
    body = {"model": "m", "user": "shout", "messages": [{"role": "user", "content": "hi"}]}
    assert asyncio.run(hooks.pre_call(CALL, body))["messages"][-1]["content"] == "HI"  # the audit hook's rewrite
    with pytest.raises(APIError) as refused:
        asyncio.run(hooks.pre_call(CALL, {"messages": [{"role": "user", "content": "a Forbidden word"}]}))
    assert refused.value.status == 400 and refused.value.body()["error"]["code"] == "banned_word"
    assert load_hooks([]) is None  # no hooks: the gateway holds None and checks only that


def test_a_hook_that_raises_fails_the_request_cleanly_and_post_call_failures_are_counted() -> None:
    hooks = load_hooks(["faulty"])
    assert hooks is not None and hooks.has_post
    with pytest.raises(APIError) as failed:
        asyncio.run(hooks.pre_call(CALL, {"user": "raise-in-pre"}))
    error = failed.value.body()["error"]
    assert failed.value.status == 500 and error["code"] == "hook_failed" and "faulty" in error["message"]

    async def post() -> int:
        hooks.post_call(CALL, ROW)  # in a task: the caller does not wait, nor hear of the failure
        await asyncio.sleep(0.01)
        return hooks.post_failures

    assert asyncio.run(post()) == 1


def test_a_hook_that_returns_no_body_is_a_clean_failure() -> None:
    class Bad(Hook):
        async def pre_call(self, call: Call, body: dict[str, Any]) -> Any:
            return ["not", "a", "body"]

    with pytest.raises(APIError, match="returned a list"):
        asyncio.run(Hooks([("bad", Bad())]).pre_call(CALL, {}))
    assert not Hooks([("bad", Bad())]).has_post  # only overridden methods run


def test_up_refuses_a_tap_naming_a_missing_hook_and_reports_broken_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    tap = {"import_path": "apps.public_tap:build", "name": "public", "args": {"hooks": ["banned-words", "nope"]}}
    with pytest.raises(ConfigError, match="'public'.*no llama_orch.hooks plugin named 'nope'"):
        check_plugins({"applications": [tap]})
    assert capsys.readouterr().err == ""  # broken plugins are reported once the stack is up, not here
    report_broken_plugins()
    assert "broken-example" in capsys.readouterr().err
    check_plugins({"applications": [tap | {"args": {"hooks": ["banned-words"]}}]})
    assert TapConfig.model_validate({"models": [{"name": "m"}], "hooks": ["a", {"name": "b"}]}).hooks[1].name == "b"

"""The example plugin (tests/plugins/example, pip-installed by scripts/check) extending a real tap: a private
tap of the tiny Llama, billed in credits, whose config names three of its hooks: ``banned-words`` (a
guardrail), ``audit`` (a prompt rewrite and a JSON-lines sink of every settled request) and ``faulty``
(raises where a request's ``user`` says so). Its tool is listed by ``llama-orch tools list`` and called by
the agent loop in ``test_toolkit.py``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Stack, cli
from tests.integration.test_private_tap import ENGINE, TINY, tap, tiny  # noqa: F401  (tiny: a fixture)
from tests.integration.test_tap_billing import account, admin, usage

pytestmark = pytest.mark.integration

CLIENT = "hooked"
PRICE = {"input_per_m": 1_000_000, "output_per_m": 2_000_000}


@pytest.fixture(scope="module")
def hooked(stack: Stack, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:  # noqa: F811
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    hooks = ["banned-words", {"name": "audit", "options": {"path": str(audit)}}, "faulty"]
    done = tap(stack, "create", CLIENT, "--model", str(tiny), "--gpus", "1", "--billing", "credits", *ENGINE,
               "--set", f"price={json.dumps(PRICE)}", "--set", f"hooks={json.dumps(hooks)}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        yield f"{stack.base_url}/private/{CLIENT}/v1/chat/completions", audit
    finally:
        tap(stack, "delete", CLIENT, timeout=300)


def test_tools_list_shows_the_plugins_tool_with_its_package_and_the_broken_one(stack: Stack) -> None:
    listed = cli("tools", "list")
    assert listed.returncode == 0, listed.stderr
    assert "word_count" in listed.stdout and "llama-orch-example 0.1.0  Counts the words" in listed.stdout
    assert "broken-example" in listed.stdout and "BROKEN: ModuleNotFoundError" in listed.stdout


def _send(url: str, key: str, content: str, user: str = "test") -> httpx.Response:
    body = {"model": TINY, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "user": user}
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _error(resp: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) >= {"message", "type", "code"}, error  # OpenAI-shaped
    return error


def test_hooks_refuse_rewrite_audit_and_a_raising_hook_loses_nothing(stack: Stack, hooked: tuple[str, Path]) -> None:
    url, audit = hooked
    tenant = admin(stack, "POST", "/admin/tenants", {"name": f"hooked-{time.monotonic_ns() % 10**7}"})["tenant_id"]
    admin(stack, "POST", f"/admin/tenants/{tenant}/grants", {"micro_credits": 10_000_000, "idempotency_key": tenant})
    key = admin(stack, "POST", f"/admin/tenants/{tenant}/keys", {"tap": f"private-{CLIENT}"})["key"]
    fresh = account(stack, tenant)

    banned = _send(url, key, "Tell me the FORBIDDEN recipe.")
    assert banned.status_code == 400 and _error(banned)["code"] == "banned_word", banned.text
    raised = _send(url, key, "Hello", user="raise-in-pre")
    assert raised.status_code == 500 and _error(raised)["code"] == "hook_failed", raised.text
    assert "nothing was charged" in _error(raised)["message"]
    money = ("balance_micro_credits", "held_micro_credits", "spent_micro_credits")
    refused = account(stack, tenant, settled=False)
    assert [refused[k] for k in money] == [fresh[k] for k in money], (fresh, refused)  # nothing held nor charged
    assert usage(stack, tenant)["data"] == []

    served = [_send(url, key, "hello there my friend", user=u) for u in ("raise-in-post", "shout", "test")]
    assert [r.status_code for r in served] == [200, 200, 200], [r.text for r in served]
    settled = account(stack, tenant)
    rows = usage(stack, tenant)["data"]
    assert len(rows) == 3 and settled["spent_micro_credits"] == sum(r["cost_micro"] for r in rows) > 0
    assert settled["balance_micro_credits"] == fresh["balance_micro_credits"] - settled["spent_micro_credits"]
    # post_call: the audit sink saw each settled request with its usage, the faulty hook's raise notwithstanding.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []
        seen = {x["request_id"]: x for x in lines if x["tenant_id"] == tenant}
        if len(seen) == 3:
            break
        time.sleep(0.2)
    assert {r["request_id"]: r["cost_micro"] for r in rows} == {i: x["cost_micro"] for i, x in seen.items()}
    assert {x["route"] for x in seen.values()} == {"chat"} and {x["tap"] for x in seen.values()} == {
        f"private-{CLIENT}"
    }
    shouted = next(r for r in rows if r["end_user"] == "shout")
    plain = next(r for r in rows if r["end_user"] == "test")
    assert shouted["prompt_tokens"] > plain["prompt_tokens"]  # the rewrite: capitals cost more tokens

"""The SDK (``orch.sdk``) against the session's stack: its docstring's examples, inference through the
official client it configures, the account, usage as rows and as a table, keys, the admin flow, and the
typed errors of a 402 and a 429."""

from __future__ import annotations

import asyncio
import doctest
import uuid

import pytest

import orch.sdk
from orch.sdk import AdminClient, AsyncClient, Client, InsufficientCredits, RateLimited
from tests.integration.conftest import MODEL, Stack
from tests.integration.test_tap_billing import account

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_docstring_examples_run_against_the_stack(stack: Stack) -> None:
    """The unit run skips them (no stack there); here they run, every one."""
    globs = {"BASE": stack.base_url, "ADMIN_KEY": stack.admin_key}
    test = doctest.DocTestParser().get_doctest(orch.sdk.__doc__ or "", globs, "orch.sdk", orch.sdk.__file__, 0)
    for example in test.examples:
        example.options.pop(doctest.SKIP, None)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=print)
    assert len(test.examples) >= 8 and runner.failures == 0, runner.summarize()


def test_a_tenants_whole_flow_through_the_sdk(stack: Stack) -> None:
    admin = AdminClient(stack.base_url, stack.admin_key, max_retries=0)
    tenant = admin.create_tenant("sdk", idempotency_key=uuid.uuid4().hex)["tenant_id"]
    assert admin.grant(tenant, 2_000_000, idempotency_key=f"{tenant}-1")["micro_credits"] == 2_000_000
    assert admin.grant(tenant, 2_000_000, idempotency_key=f"{tenant}-1")["replayed"] is True  # applied once
    assert tenant in {t["tenant_id"] for t in admin.tenants()}
    assert "public" in {a["name"] for a in admin.taps()["data"]}
    key = admin.create_key(tenant)["key"]

    with Client(stack.base_url, key, max_retries=0) as tap:
        assert MODEL in {m.id for m in tap.models.list().data}
        reply = tap.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
        assert "Paris" in (reply.choices[0].message.content or "")
        chunks = list(tap.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()

        settled = account(stack, tenant)  # once the replicas' leases came back
        assert tap.account()["balance_micro_credits"] == settled["balance_micro_credits"]
        rows = tap.usage()
        table = tap.usage(as_table=True)
        assert rows["totals"]["requests"] == table.num_rows == 2
        assert (
            sum(table.column("cost_micro").to_pylist())
            == settled["spent_micro_credits"]
            == 2_000_000 - (settled["balance_micro_credits"])
        )
        assert {r.as_py() for r in table.column("request_id")} == {reply.id, chunks[0].id}
        assert admin.usage(tenant, group_by="model")["totals"] == rows["totals"]

        created = tap.create_key(rpm=5)
        assert created["key"].startswith("sk-orch-") and created["rpm"] == 5
        assert [k["key_id"] for k in tap.keys()][-1] == created["key_id"]
        assert tap.revoke_key(created["key_id"])["revoked"] is True
        assert [k["revoked_at"] is not None for k in admin.keys(tenant)] == [False, True]


def test_a_402_and_a_429_are_typed_and_carry_what_to_do(stack: Stack) -> None:
    admin = AdminClient(stack.base_url, stack.admin_key)
    tenant = admin.create_tenant("sdk-errors")["tenant_id"]
    admin.grant(tenant, 100, idempotency_key=f"{tenant}-1")  # less than one request's worst case
    tap = Client(stack.base_url, admin.create_key(tenant, rpm=1)["key"], max_retries=0)
    with pytest.raises(InsufficientCredits) as poor:
        tap.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=64)
    assert poor.value.status_code == 402 and poor.value.code == "insufficient_credits"
    assert poor.value.hold_micro_credits is not None and poor.value.balance_micro_credits is not None
    assert poor.value.hold_micro_credits > poor.value.balance_micro_credits == 100
    # The key allows one request a minute: the refused one counted, so the next is a 429 with Retry-After.
    with pytest.raises(RateLimited) as limited:
        tap.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)
    assert limited.value.status_code == 429 and limited.value.retry_after is not None
    assert 1 <= limited.value.retry_after <= 60
    tap.close()


def test_the_async_client(stack: Stack) -> None:
    admin = AdminClient(stack.base_url, stack.admin_key)
    tenant = admin.create_tenant("sdk-async")["tenant_id"]
    admin.grant(tenant, 1_000_000, idempotency_key=f"{tenant}-1")
    key = admin.create_key(tenant)["key"]

    async def scenario() -> tuple[str, int, int]:
        async with AsyncClient(stack.base_url, key, max_retries=0) as tap:
            replies = await asyncio.gather(
                *(tap.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4) for _ in range(3))
            )
            for _ in range(300):  # settled within a moment (each replica's lease flushes within 50 ms)
                usage = await tap.usage()
                if usage["totals"]["requests"] >= 3:
                    break
                await asyncio.sleep(0.1)
            return replies[0].object, usage["totals"]["requests"], len(await tap.keys())

    assert asyncio.run(scenario()) == ("chat.completion", 3, 1)

"""Bad input against the session's real stack: every refusal is an OpenAI-shaped 4xx naming what is
wrong, never a 500 or a 503; oversized bodies are 413; a flood of unknown keys costs the ledger at most
the client's miss budget."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from orch.billing import MissBudget
from orch.keys import generate_key
from tests.integration.conftest import MODEL, TAP_REPLICAS, Stack

pytestmark = pytest.mark.integration

CONTRACT_APP = "contract-bad-input"


def admin(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    resp = httpx.request(method, stack.base_url + path, json=body, headers=stack.admin_headers, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def new_key(stack: Stack, tap: str = "public", micro_credits: int = 10_000_000) -> tuple[str, str]:
    tenant = admin(stack, "POST", "/admin/tenants", {"name": f"bad-input-{uuid.uuid4().hex[:6]}"})["tenant_id"]
    grant = {"micro_credits": micro_credits, "idempotency_key": f"{tenant}-first"}
    admin(stack, "POST", f"/admin/tenants/{tenant}/grants", grant)
    return tenant, admin(stack, "POST", f"/admin/tenants/{tenant}/keys", {"tap": tap})["key"]


def refused(resp: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    """The OpenAI error body of ``resp``, after checking its status and the parameter it names."""
    assert resp.status_code == status, resp.text[:500]
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return new_key(stack)[1]


def post(stack: Stack, key: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        return httpx.post(stack.v1 + path, json=body, headers=headers, timeout=120, **kwargs)
    return httpx.post(stack.v1 + path, content=body, headers=headers, timeout=120, **kwargs)


def test_a_deeply_nested_body_is_a_400(stack: Stack, key: str) -> None:
    error = refused(post(stack, key, "/chat/completions", b"[" * 100_000), 400, None)
    assert error["code"] == "invalid_json"


def test_an_empty_stop_sequence_is_a_400_naming_stop(stack: Stack, key: str) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stop": ""}
    refused(post(stack, key, "/completions", body), 400, "stop")


def test_a_seed_past_int64_is_a_400_naming_seed(stack: Stack, key: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 2**70}
    refused(post(stack, key, "/chat/completions", body), 400, "seed")


def test_a_usage_time_past_year_9999_in_utc_is_a_400_naming_since(stack: Stack, key: str) -> None:
    resp = httpx.get(
        stack.v1 + "/usage",
        params={"since": "9999-12-31T23:00:00-01:00"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    refused(resp, 400, "since")


def test_bodies_over_the_limit_are_413_with_or_without_a_content_length(stack: Stack, key: str) -> None:
    prompt = "x" * (20 << 20)
    body = b'{"model": "' + MODEL.encode() + b'", "max_tokens": 1, "prompt": "' + prompt.encode() + b'"}'
    assert refused(post(stack, key, "/completions", body), 413, None)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    assert refused(post(stack, key, "/completions", chunks()), 413, None)["code"] == "request_too_large"


def test_a_prompt_that_cannot_fit_is_a_400_naming_prompt(stack: Stack, key: str) -> None:
    body = {"model": MODEL, "prompt": "word " * 400_000, "max_tokens": 1}  # 2 MB: under the body limit
    error = refused(post(stack, key, "/completions", body), 400, "prompt")
    assert error["code"] == "context_length_exceeded"


@pytest.fixture(scope="module")
def contract_tap(stack: Stack, ray_driver: None) -> Iterator[str]:
    """A contract-billed gateway over the public tap's model deployment (no second engine); its base URL."""
    from ray import serve

    from apps.gateway import Gateway

    args = yaml.safe_load(stack.config_path.read_text())["applications"][0]["args"]
    config = {**args, "tap": CONTRACT_APP, "billing": "contract", "data_dir": str(stack.data_dir)}
    config.pop("gateway", None)
    model = serve.get_deployment_handle(f"model-{MODEL}", app_name="public")
    app = Gateway.options(ray_actor_options={"num_cpus": 0}).bind({MODEL: model}, config)  # type: ignore[attr-defined]
    serve.run(app, name=CONTRACT_APP, route_prefix=f"/{CONTRACT_APP}")
    try:
        yield f"{stack.base_url}/{CONTRACT_APP}/v1"
    finally:
        serve.delete(CONTRACT_APP)


def test_a_lone_surrogate_under_contract_billing_is_a_400_naming_messages(stack: Stack, contract_tap: str) -> None:
    _, key = new_key(stack, tap=CONTRACT_APP)
    headers = {"Authorization": f"Bearer {key}"}
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    resp = httpx.post(contract_tap + "/chat/completions", json=ok, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text  # the contract tap serves
    bad = json.dumps({**ok, "messages": [{"role": "user", "content": "Hi \ud800"}]})  # ASCII: "\\ud800" escaped
    resp = httpx.post(contract_tap + "/chat/completions", content=bad, headers=headers, timeout=120)
    assert refused(resp, 400, "messages")["code"] == "invalid_unicode"


def key_caches(stack: Stack) -> dict[str, dict[str, int]]:
    """Each tap replica's key-cache counters, by replica (``/health`` answers from whichever one Serve picks)."""
    seen: dict[str, dict[str, int]] = {}
    deadline = time.monotonic() + 60
    while len(seen) < TAP_REPLICAS and time.monotonic() < deadline:
        health = httpx.get(stack.base_url + "/health", timeout=60)
        assert health.status_code == 200, health.text
        seen[health.json()["replica"]] = health.json()["key_cache"]
    assert len(seen) == TAP_REPLICAS, seen
    return seen


def test_a_flood_of_random_keys_from_one_client_costs_the_ledger_at_most_its_budget(stack: Stack) -> None:
    """The budget is per client and per tap replica: N replicas may look up N budgets' worth."""
    budget = MissBudget()
    before = key_caches(stack)
    started = time.monotonic()
    with httpx.Client(base_url=stack.v1, timeout=60) as client:
        for _ in range(300):
            resp = client.get("/models", headers={"Authorization": f"Bearer {generate_key()[1]}"})
            assert refused(resp, 401, None)["code"] == "invalid_api_key"
    elapsed = time.monotonic() - started
    after = key_caches(stack)

    def total(counter: str) -> int:
        return sum(after[r][counter] - before[r][counter] for r in after)

    looked_up = total("lookups")
    # The bucket refills while the flood runs: burst + rate × its duration (+1 for a refill in flight).
    allowed = TAP_REPLICAS * (budget.burst + math.ceil(budget.per_s * elapsed) + 1)
    assert looked_up <= allowed, (looked_up, allowed)
    assert total("refused") >= 300 - looked_up
    time.sleep(budget.burst / budget.per_s)  # let this client's budget refill for the tests after this one


def test_revoking_a_taps_keys_refuses_them_at_once(stack: Stack, contract_tap: str) -> None:
    tap_keys = [new_key(stack, tap=CONTRACT_APP)[1] for _ in range(2)]
    public_key = new_key(stack)[1]
    for k in tap_keys:
        assert httpx.get(contract_tap + "/models", headers={"Authorization": f"Bearer {k}"}).status_code == 200
    # Through the contract tap's own gateway: its key cache drops the keys at once, not after the ttl.
    resp = httpx.delete(f"{stack.base_url}/{CONTRACT_APP}/admin/taps/{CONTRACT_APP}/keys", headers=stack.admin_headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["object"], body["tap"]) == ("tap_keys", CONTRACT_APP) and body["revoked"] >= 2
    for k in tap_keys:
        resp = httpx.get(contract_tap + "/models", headers={"Authorization": f"Bearer {k}"})
        assert refused(resp, 401, None)["code"] == "invalid_api_key"
    assert httpx.get(stack.v1 + "/models", headers={"Authorization": f"Bearer {public_key}"}).status_code == 200
    # A tap no gateway serves (deleted): exactly its keys are counted.
    gone = f"gone-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        new_key(stack, tap=gone)
    assert admin(stack, "DELETE", f"/admin/taps/{gone}/keys")["revoked"] == 3
    assert admin(stack, "DELETE", f"/admin/taps/{gone}/keys")["revoked"] == 0

"""Security of the running stack (issue 14, item 4): the admin API answers only from the addresses the tap
allows (configs/local.yaml: this machine's 127.0.0.1 and ::1), and no key, prompt or completion text reaches
a log at the default level. Keys at rest, constant-time checks, revocation and tenant separation are
tested in test_tap_billing, test_ledger_actor and tests/unit."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL, Stack
from tests.integration.test_tap_billing import new_tenant

pytestmark = pytest.mark.integration

ELSEWHERE = "127.0.0.2"  # a loopback address outside configs/local.yaml's admin_from (127.0.0.1/32, ::1/128)


def _from(address: str) -> httpx.Client:
    """A client whose connections leave from ``address`` (the proxy sees it as the caller)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=120)


def test_the_admin_api_answers_only_from_its_allowed_addresses(stack: Stack) -> None:
    with _from("127.0.0.1") as here, _from(ELSEWHERE) as there:
        assert here.get(stack.base_url + "/admin/tenants", headers=stack.admin_headers).status_code == 200
        refused = there.get(stack.base_url + "/admin/tenants", headers=stack.admin_headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_not_from_here", refused.text
        # Refused before the key is looked at: a wrong key from there gets the same answer, not a 401.
        guess = there.get(stack.base_url + "/admin/tenants", headers={"Authorization": "Bearer sk-orch-admin-guess"})
        assert guess.status_code == 403, guess.text
        # Tenant routes answer from anywhere the proxy listens.
        assert there.get(stack.v1 + "/models", headers=stack.headers).status_code == 200
        assert there.get(stack.v1 + "/account", headers=stack.headers).status_code == 200


def _session_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"  # type: ignore[attr-defined]


def _files_containing(files: list[Path], needles: dict[str, str]) -> dict[str, list[str]]:
    """For each needle's name, the files that contain it."""
    found: dict[str, list[str]] = {name: [] for name in needles}
    for path in files:
        data = path.read_bytes()
        for name, needle in needles.items():
            if needle.encode() in data:
                found[name].append(str(path))
    return {name: paths for name, paths in found.items() if paths}


def test_no_key_prompt_or_completion_text_reaches_the_logs(stack: Stack, ray_driver: None) -> None:
    _, key = new_tenant(stack, 50_000_000)
    marker = f"zebra-{secrets.token_hex(6)}"  # in every prompt and bad field here, nowhere else
    auth = {"Authorization": f"Bearer {key}"}
    prompt = [{"role": "user", "content": f"Say something about {marker}."}]
    with httpx.Client(timeout=120) as client:
        answer = client.post(stack.v1 + "/chat/completions", headers=auth,
                             json={"model": MODEL, "messages": prompt, "max_tokens": 24, "temperature": 0})  # fmt: skip
        assert answer.status_code == 200, answer.text
        completion = answer.json()["choices"][0]["message"]["content"]
        streamed = {"model": MODEL, "prompt": marker, "max_tokens": 8, "stream": True}
        with client.stream("POST", stack.v1 + "/completions", headers=auth, json=streamed) as resp:
            assert resp.status_code == 200
            resp.read()
        refused = [
            client.post(stack.v1 + "/chat/completions", headers=auth,
                        json={"model": MODEL, "messages": [{"role": marker, "content": marker}]}),
            client.post(stack.v1 + "/chat/completions", headers=auth, json={"model": marker, "messages": prompt}),
            client.post(stack.v1 + "/chat/completions", headers=auth, content=b"{" + marker.encode()),
            client.get(stack.v1 + "/models", headers={"Authorization": f"Bearer sk-orch-{marker}-x"}),
        ]  # fmt: skip
        assert [r.status_code for r in refused] == [400, 404, 400, 401], [r.text for r in refused]
    time.sleep(3)  # Ray's log monitor and Serve's file handlers flush
    needles = {"tenant key": key, "demo key": stack.key, "admin key": stack.admin_key, "prompt text": marker}
    if len(completion) >= 16:  # long enough not to occur by chance
        needles["completion text"] = completion
    # Every log of the Ray session (workers, replicas, Serve, GCS, raylet) and the stack's own (the head daemon).
    logs = [p for p in _session_logs().rglob("*") if p.is_file()] + list(stack.data_dir.glob("*.log"))
    assert any("serve" in str(p) for p in logs) and any(p.name == "cluster.log" for p in logs), logs[:20]
    assert _files_containing(logs, {"model name": MODEL})  # the scan finds what the logs do name
    assert _files_containing(logs, needles) == {}

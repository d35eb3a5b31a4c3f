"""`serve run configs/local.yaml` serves the tap: Ray Serve's own CLI, our config file, no llama-orch CLI."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from orch.control.cluster import start_head, stop_head
from tests.integration.conftest import MODEL, REPO, free_port

pytestmark = pytest.mark.integration


def test_serve_run_local_yaml_answers(tmp_path: Path, model_dir: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # the shipped file, on a free port; model source stays "default"
    data = tmp_path / "data"  # its own ledger and admin key; the default model's folder is shared
    data.mkdir()
    (data / "models").symlink_to(model_dir.parent)
    # Replicas run in the cluster's workers, not in `serve run`'s process: the data dir goes in the args.
    config["applications"][0]["args"]["data_dir"] = str(data)
    config_path = tmp_path / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head = start_head(tmp_path / "ray", num_cpus=8, num_gpus=0)
    serve_cli = Path(sys.executable).parent / "serve"
    log = open(tmp_path / "serve-run.log", "wb")
    proc = subprocess.Popen(
        [str(serve_cli), "run", "--address", head.gcs_address, str(config_path)],
        cwd=REPO,
        env={**_env(), **head.client_env()},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve-run.log").read_text()[-3000:]
            try:
                if httpx.get(base.removesuffix("/v1") + "/health", timeout=15).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("serve run did not answer within 600 s")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
        assert httpx.post(base + "/chat/completions", json=body, timeout=60).status_code == 401
        key = _tenant_key(base.removesuffix("/v1"), (data / "admin_key").read_text().strip())
        reply = httpx.post(
            base + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        page = httpx.get(base.removesuffix("/v1") + "/dashboard", follow_redirects=True, timeout=30)  # its own app
        assert page.status_code == 200 and "llama-orch dashboard" in page.text, page.text[:300]
    finally:
        proc.send_signal(signal.SIGTERM)  # serve run ignores SIGINT without a terminal
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        stop_head(head)


def _tenant_key(base: str, admin_key: str) -> str:
    admin = {"Authorization": f"Bearer {admin_key}"}
    tenant = httpx.post(base + "/admin/tenants", json={"name": "serve-run"}, headers=admin).json()["tenant_id"]
    grant = {"micro_credits": 1_000_000, "idempotency_key": "serve-run-1"}
    assert httpx.post(f"{base}/admin/tenants/{tenant}/grants", json=grant, headers=admin).status_code == 200
    key: str = httpx.post(f"{base}/admin/tenants/{tenant}/keys", json={}, headers=admin).json()["key"]
    return key


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

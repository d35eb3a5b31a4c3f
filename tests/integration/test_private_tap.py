"""Private taps on the session's stack, whose Ray head declares 8 (fake) GPUs: GPU groups, capacity,
placement, isolation, autoscaling and scale-to-zero. Replicas serve a tiny random Llama on the real
vLLM CPU engine (eager mode, small KV cache) so several fit on this machine."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import REPO, Stack, cli

pytestmark = pytest.mark.integration

TINY = "tiny-llama"
ENGINE = [
    "--engine", "max_model_len=512", "--engine", "max_num_seqs=8", "--engine", "enforce_eager=true",
    "--engine", "kv_cache_memory_bytes=33554432",
    "--engine", "env={VLLM_HOST_IP: 127.0.0.1, VLLM_CPU_KVCACHE_SPACE: '1'}",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(model_dir: Path) -> Path:
    from orch.models import build_tiny_llama

    return build_tiny_llama(REPO / ".orch" / TINY, data_dir=REPO / ".orch")


def tap(stack: Stack, *args: str, timeout: float = 900) -> Any:
    return cli("--data-dir", str(stack.data_dir), "tap", *args, timeout=timeout)


def create(stack: Stack, tiny: Path, client: str, gpus: int, *extra: str) -> str:
    """Creates a tap of the tiny model; returns its first key."""
    done = tap(stack, "create", client, "--model", str(tiny), "--gpus", str(gpus), *ENGINE, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = re.findall(r"^\s+(sk-orch-\S+)$", done.stdout, re.M)
    return keys[0] if keys else ""


@pytest.fixture()
def taps(stack: Stack) -> Iterator[list[str]]:
    """Clients created by a test; each is deleted afterwards, so its engine and GPUs go away."""
    created: list[str] = []
    yield created
    for client in created:
        tap(stack, "delete", client, timeout=300)


def chat(base: str, key: str, **extra: Any) -> httpx.Response:
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    return httpx.post(base + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def describe(app: str) -> list[dict[str, Any]]:
    """``describe()`` of every replica of the app's model deployment (asked until all answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(f"model-{TINY}", app_name=app)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(20):
        d = handle.describe.remote().result(timeout_s=120)
        seen[str(d["gpu_ids"])] = d
    return list(seen.values())


def test_gpu_groups_fill_the_node_refuse_fast_and_free_on_delete(
    stack: Stack, tiny: Path, taps: list[str], ray_driver: None
) -> None:
    keys = {}
    for client, gpus in (("acme", 4), ("beta", 2), ("gamma", 2)):
        keys[client] = create(stack, tiny, client, gpus)
        taps.append(client)
    t0 = time.monotonic()
    refused = tap(stack, "create", "delta", "--model", str(tiny), "--gpus", "1", *ENGINE, timeout=120)
    assert refused.returncode == 1 and time.monotonic() - t0 < 30
    assert "needs 1 GPU, 0 free of 8 on 1 node" in refused.stderr, refused.stderr

    listing = tap(stack, "list").stdout
    assert re.search(r"private-acme: RUNNING, 4 GPUs per replica, replicas 1 .* 4 GPUs reserved", listing), listing
    assert "0 of 8 GPUs free" in listing, listing

    # Placement: one GPU id per bundle, distinct within a group and across taps; the engine's note says
    # it runs on the CPU while the group holds the GPUs.
    ids: list[str] = []
    for app, gpus in (("private-acme", 4), ("private-beta", 2), ("private-gamma", 2)):
        (replica,) = describe(app)
        group = [i for bundle in replica["gpu_ids"] for i in bundle]
        assert len(group) == gpus == len(set(group)), replica
        assert replica["tensor_parallel_size"] == 1 and "still reserves" in replica["note"]
        ids += group
    assert len(ids) == len(set(ids)) == 8

    # Isolation: a key reaches only its own tap; every refusal is OpenAI-shaped.
    acme, beta = f"{stack.base_url}/private/acme/v1", f"{stack.base_url}/private/beta/v1"
    ok = chat(acme, keys["acme"])
    assert ok.status_code == 200, ok.text
    for base, key in ((acme, stack.key), (beta, keys["acme"]), (stack.v1, keys["acme"])):
        refused_call = chat(base, key)
        assert refused_call.status_code == 403, (base, refused_call.text)
        assert set(refused_call.json()["error"]) == {"message", "type", "param", "code"}
    assert chat(acme, "sk-orch-nope").status_code == 401
    tenant = next(t for t in httpx.get(stack.base_url + "/admin/tenants", headers=stack.admin_headers).json()["data"]
                  if t["name"] == "acme")  # fmt: skip
    rows = httpx.get(f"{stack.base_url}/admin/tenants/{tenant['tenant_id']}/usage", headers=stack.admin_headers)
    assert [r["tap"] for r in rows.json()["data"]] == ["private-acme"]

    deleted = tap(stack, "delete", "beta", timeout=300)
    assert deleted.returncode == 0, deleted.stderr
    taps.remove("beta")
    create(stack, tiny, "delta", 1)
    taps.append("delta")
    assert "private-beta" not in tap(stack, "list").stdout


def replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[f"model-{TINY}"]
    return int(status.replica_states.get("RUNNING", 0))


def test_autoscaling_scales_up_under_load_and_down_when_idle(
    stack: Stack, tiny: Path, taps: list[str], ray_driver: None
) -> None:
    fast = [f"--set={k}" for k in ("upscale_delay_s=0", "downscale_delay_s=5", "target_ongoing_requests=1",
                                    "metrics_interval_s=0.5", "look_back_period_s=2")]  # fmt: skip
    key = create(stack, tiny, "auto", 1, "--min", "1", "--max", "3", *fast)
    taps.append("auto")
    base = f"{stack.base_url}/private/auto/v1"

    async def load(seconds: float) -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            deadline = time.monotonic() + seconds

            async def worker() -> None:
                body = {"model": TINY, "prompt": "a", "max_tokens": 256, "ignore_eos": True}
                while time.monotonic() < deadline:
                    await client.post(base + "/completions", json=body, headers={"Authorization": f"Bearer {key}"})

            await asyncio.gather(*(worker() for _ in range(6)))

    async def scale_up() -> float:
        t0 = time.monotonic()
        task = asyncio.create_task(load(600))
        while replicas("private-auto") < 2:
            assert time.monotonic() - t0 < 600, "no second replica under load within 600 s"
            await asyncio.sleep(1)
        took = time.monotonic() - t0
        task.cancel()
        return took

    scale_up_s = asyncio.run(scale_up())
    print(f"scale-up to 2 replicas under load: {scale_up_s:.0f} s")
    t0 = time.monotonic()
    while replicas("private-auto") > 1:
        assert time.monotonic() - t0 < 300, "did not scale back down when idle"
        time.sleep(1)
    assert replicas("private-auto") == 1


def test_scale_to_zero_cold_starts_on_first_request(
    stack: Stack, tiny: Path, taps: list[str], ray_driver: None
) -> None:
    key = create(stack, tiny, "cold", 1, "--min", "0", "--max", "1", "--set", "downscale_delay_s=5")
    taps.append("cold")
    assert replicas("private-cold") == 0
    t0 = time.monotonic()
    reply = chat(f"{stack.base_url}/private/cold/v1", key)
    cold_start_s = time.monotonic() - t0
    assert reply.status_code == 200, reply.text
    print(f"cold start (0 -> 1 replica, first answer): {cold_start_s:.0f} s")
    assert replicas("private-cold") == 1


def test_serve_deploy_of_a_config_with_a_private_tap(stack: Stack, tiny: Path, ray_driver: None) -> None:
    """`serve deploy` of the stack's config plus configs/private_tap.example.yaml's private app (on the tiny
    model): Ray's own CLI deploys the tap; keys, routing and `tap list` work as with `tap create`."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from orch.control.tapctl import wait_app

    record = json.loads((stack.data_dir / "up.json").read_text())
    example = yaml.safe_load((REPO / "configs" / "private_tap.example.yaml").read_text())
    private = next(a for a in example["applications"] if a["import_path"] == "apps.private_tap:build")
    engine = {"max_model_len": 512, "max_num_seqs": 8, "enforce_eager": True, "kv_cache_memory_bytes": 33554432,
              "env": {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}}  # fmt: skip
    private["args"] |= {"model": str(tiny), "data_dir": str(stack.data_dir), "engine": engine, "max_replicas": 1}
    base = record["config"]
    path = stack.data_dir / "with-private.yaml"
    path.write_text(yaml.safe_dump({**base, "applications": [*base["applications"], private]}))
    dashboard = json.loads((stack.data_dir / "cluster.json").read_text())["dashboard_url"]
    dashboard = dashboard if dashboard.startswith("http") else f"http://{dashboard}"
    serve_cli = str(Path(sys.executable).parent / "serve")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **stack.client_env}

    def deploy(file: Path) -> None:
        done = subprocess.run([serve_cli, "deploy", "--address", dashboard, str(file)], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]

    deploy(path)
    try:
        wait_app("private-acme", 600)
        admin = stack.admin_headers
        tenant = httpx.post(stack.base_url + "/admin/tenants", json={"name": "acme-deploy"}, headers=admin).json()
        key = httpx.post(
            f"{stack.base_url}/admin/tenants/{tenant['tenant_id']}/keys", json={"tap": "private-acme"}, headers=admin
        ).json()["key"]
        reply = chat(f"{stack.base_url}/private/acme/v1", key)
        assert reply.status_code == 200, reply.text
        assert chat(stack.v1, key).status_code == 403
        listing = tap(stack, "list").stdout
        assert re.search(r"private-acme: RUNNING, .* 2 GPUs reserved", listing), listing
    finally:
        base_path = stack.data_dir / "base.yaml"
        base_path.write_text(yaml.safe_dump(base))
        deploy(base_path)
        wait_app("private-acme", 300, gone=True)


def test_a_tap_without_gateway_is_reachable_only_by_handle_and_scales(
    stack: Stack, tiny: Path, taps: list[str], ray_driver: None
) -> None:
    from ray import serve

    from orch.engine import GenerationRequest

    assert create(stack, tiny, "lab", 1, "--no-gateway") == ""  # no HTTP, so no key is made
    taps.append("lab")
    handle = serve.get_deployment_handle(f"model-{TINY}", app_name="private-lab")
    request = GenerationRequest("lab-1", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, ignore_eos=True)
    deltas = list(handle.options(stream=True).generate.remote(request))
    assert deltas[-1].completion_tokens == 4 and deltas[-1].finish_reason == "length"
    assert httpx.get(f"{stack.base_url}/private/lab/v1/models", headers=stack.headers).status_code == 404

    scaled = tap(stack, "scale", "lab", "--max", "2")
    assert scaled.returncode == 0, scaled.stderr
    assert re.search(r"private-lab: RUNNING, 1 GPU per replica, replicas 1 \(min 1, max 2\)", tap(stack, "list").stdout)
    too_many = tap(stack, "scale", "lab", "--min", "9", "--max", "9", timeout=120)
    assert too_many.returncode == 1 and "needs 9 groups of 1 GPU, 8 fit" in too_many.stderr, too_many.stderr

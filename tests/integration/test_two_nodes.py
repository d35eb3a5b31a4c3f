"""Private taps on a cluster of two Ray nodes on this machine: a head without GPUs (ours, via
``orch.control.cluster``) and a second node joined with ``ray start --address=... --num-gpus=4 --block``.
``llama-orch up`` deploys onto that cluster (as with ``RAY_ADDRESS``) and ``tap create --gpus 4`` must
land on the node that has the GPUs. The stack runs 4 ledger shards, 1 and 3 on the second node (its
``ledger_nodes`` resource), and tenants on every shard are charged exactly. Everything runs in subprocesses:
this process may be a driver of the session's cluster. The second node is stopped by its process group,
never ``ray stop``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import pytest
import yaml

from orch.control.cluster import start_head, stop_head
from tests.integration.conftest import REPO, cli, free_port

pytestmark = pytest.mark.integration

LEDGER_NODE = "llama-orch-test-ledger"  # the custom resource the second node declares: it holds shards 1 and 3
SHARDS, REMOTE_SHARDS = 4, (1, 3)
ENGINE = {"max_model_len": 512, "max_num_seqs": 8, "enforce_eager": True, "kv_cache_memory_bytes": 33554432,
          "env": {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}}  # fmt: skip


def test_a_gpu_group_lands_on_the_node_with_the_gpus(tmp_path: Path, model_dir: Path) -> None:
    from orch.models import build_tiny_llama

    tiny = build_tiny_llama(REPO / ".orch" / "tiny-llama", data_dir=REPO / ".orch")
    data = tmp_path / "data"
    head = start_head(data, num_cpus=8, num_gpus=0)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | head.client_env()
    ray_cli = str(Path(sys.executable).parent / "ray")
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        [ray_cli, "start", "--address", head.gcs_address, "--num-cpus", "4", "--num-gpus", "4", "--block",
         "--disable-usage-stats", "--resources", f'{{"{LEDGER_NODE}": 1}}'],
        env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
        config["http_options"]["port"] = port = free_port()
        model = config["applications"][0]["args"]["models"][0]
        model["source"], model["engine"] = str(tiny), ENGINE
        config["applications"][0]["args"]["models"] = [model]  # the chat model only: GPU groups are the point
        config["applications"][0]["args"] |= {
            "ledger_shards": SHARDS,
            "ledger_nodes": dict.fromkeys(REMOTE_SHARDS, LEDGER_NODE),
        }
        (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))

        def orch(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
            return cli("--data-dir", str(data), *args, timeout=timeout, env={"RAY_ADDRESS": ""})

        up = orch("up", "--config", str(tmp_path / "two.yaml"))
        assert up.returncode == 0 and f":{port}/v1" in up.stdout, up.stderr[-3000:]
        deadline = time.monotonic() + 120
        while "of 4 GPUs free" not in (listing := orch("tap", "list", timeout=120)).stdout:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"the GPU node did not join:\n{listing.stdout}\n{listing.stderr}"
            time.sleep(2)

        too_big = orch("tap", "create", "huge", "--model", str(tiny), "--gpus", "8", timeout=120)
        assert too_big.returncode == 1
        assert "needs 8 GPUs on one node, most free on a node is 4 (4 free of 4 on 2 nodes)" in too_big.stderr

        created = orch("tap", "create", "packed", "--model", str(tiny), "--gpus", "4",
                       *(f"--engine={k}={v}" for k, v in ENGINE.items() if k != "env"),
                       "--engine=env={VLLM_HOST_IP: 127.0.0.1, VLLM_CPU_KVCACHE_SPACE: '1'}")  # fmt: skip
        assert created.returncode == 0, created.stderr[-3000:]
        listing = orch("tap", "list", timeout=120).stdout
        gpu_node = re.search(r"^node (\w+) \(.*\): 0 of 4 GPUs free$", listing, re.M)
        placed = re.search(r"private-packed: RUNNING, .* 4 GPUs reserved on node (\w+)", listing)
        assert gpu_node and placed and placed.group(1) == gpu_node.group(1), listing
        head_node = re.search(r"^node (\w+) \(.*\): 0 of 0 GPUs free$", listing, re.M)  # the head has none
        assert head_node, listing

        # Tenants on all 4 shards, each charged exactly; shards 1 and 3 run on the second node, 0 and 2 on the head.
        _charge_a_tenant_on_each_shard(f"http://127.0.0.1:{port}", (data / "admin_key").read_text().strip())
        status = orch("status", timeout=120).stdout
        for shard in range(SHARDS):
            node = gpu_node if shard in REMOTE_SHARDS else head_node
            assert f"ledger shard {shard}: node {node.group(1)}" in status, status
        checked = orch("check", timeout=600)
        assert checked.returncode == 0 and checked.stdout.count(": ok, ") == SHARDS, checked.stdout + checked.stderr
    finally:
        cli("--data-dir", str(data), "down", timeout=120, env={"RAY_ADDRESS": ""})
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        worker_log.close()
        stop_head(head)


def _charge_a_tenant_on_each_shard(base: str, admin_key: str) -> None:
    """Creates tenants until every shard has one (a tenant's shard: crc32 of its id modulo the count), grants
    each credit, serves it one request through the public tap, and checks its account against its usage."""
    auth = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base, timeout=120) as http:

        def admin(method: str, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
            resp = http.request(method, path, json=body, headers=auth)
            assert resp.status_code < 300, resp.text
            return resp.json()  # type: ignore[no-any-return]

        tenants: dict[int, str] = {}
        for i in range(64):
            tenant = str(admin("POST", "/admin/tenants", {"name": f"shard-probe-{i}"})["tenant_id"])
            tenants.setdefault(zlib.crc32(tenant.encode()) % SHARDS, tenant)
            if len(tenants) == SHARDS:
                break
        assert sorted(tenants) == list(range(SHARDS)), tenants
        for tenant in tenants.values():
            admin("POST", f"/admin/tenants/{tenant}/grants", {"micro_credits": 5_000_000, "idempotency_key": tenant})
            key = admin("POST", f"/admin/tenants/{tenant}/keys", {})["key"]
            body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            served = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert served.status_code == 200, served.text
            deadline = time.monotonic() + 60  # settled: the lease's hold goes back once the replica is idle
            while (account := admin("GET", f"/admin/tenants/{tenant}/account"))["held_micro_credits"]:
                assert time.monotonic() < deadline, account
                time.sleep(0.2)
            usage = admin("GET", f"/admin/tenants/{tenant}/usage")
            cost = usage["totals"]["cost_micro_credits"]  # type: ignore[index]
            assert usage["totals"]["requests"] == 1 and cost > 0, usage  # type: ignore[index]
            assert account["spent_micro_credits"] == cost == 5_000_000 - account["balance_micro_credits"], account

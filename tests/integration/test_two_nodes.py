"""Private taps on a cluster of two Ray nodes on this machine: a head without GPUs (ours, via
``orch.control.cluster``) and a second node joined with ``ray start --address=... --num-gpus=4 --block``.
``llama-orch up`` deploys onto that cluster (as with ``RAY_ADDRESS``) and ``tap create --gpus 4`` must
land on the node that has the GPUs. Everything runs in subprocesses: this process may be a driver of
the session's cluster. The second node is stopped by its process group, never ``ray stop``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orch.control.cluster import start_head, stop_head
from tests.integration.conftest import REPO, cli, free_port

pytestmark = pytest.mark.integration

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
         "--disable-usage-stats"],
        env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
        config["http_options"]["port"] = port = free_port()
        model = config["applications"][0]["args"]["models"][0]
        model["source"], model["engine"] = str(tiny), ENGINE
        config["applications"][0]["args"]["models"] = [model]  # the chat model only: GPU groups are the point
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
        assert re.search(r"^node \w+ \(.*\): 0 of 0 GPUs free$", listing, re.M), listing  # the head has none
    finally:
        cli("--data-dir", str(data), "down", timeout=120, env={"RAY_ADDRESS": ""})
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        worker_log.close()
        stop_head(head)

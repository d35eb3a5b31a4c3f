"""GPU groups on real Ray placement groups, with GPUs that Ray declares (no CUDA needed).

Each scenario runs in a subprocess (``tests/integration/gpu_scenarios.py``) on a cluster of its
own, in a Ray temp dir of its own: this process may already be a driver of the session's cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from actors.gpu_group import GPUGroup
from orch.tapspec import TapSpec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run_scenario(name: str, timeout_s: float = 120) -> dict[str, Any]:
    # A short temp dir: Ray's socket paths live under it and must stay under 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="orchgpu-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.integration.gpu_scenarios", name],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def one_node() -> dict[str, Any]:
    return run_scenario("one_node")


@pytest.fixture(scope="module")
def two_nodes() -> dict[str, Any]:
    return run_scenario("two_nodes")


def gpu_ids(bundles: list[dict[str, Any]]) -> list[str]:
    return [gpu for bundle in bundles for gpu in bundle["gpu_ids"]]


def test_groups_of_4_2_2_fill_an_8_gpu_node(one_node: dict[str, Any]) -> None:
    assert one_node["initial"]["free"] == 8
    assert all(r["ok"] for r in one_node["reserve"].values()), one_node["reserve"]
    assert one_node["after_reserve"]["free"] == 0


def test_fourth_group_is_refused_fast_with_the_shortfall(one_node: dict[str, Any]) -> None:
    refused = one_node["fourth_refused"]
    assert not refused["ok"]
    assert refused["error"] == "needs 1 GPU, 0 free of 8 on 1 node"
    assert refused["seconds"] < 5


def test_releasing_a_group_lets_the_next_one_reserve(one_node: dict[str, Any]) -> None:
    assert one_node["after_release"]["free"] == 2
    assert one_node["fourth_after_release"]["ok"], one_node["fourth_after_release"]
    assert one_node["after_all_released"]["free"] == 8


def test_each_bundle_gets_its_own_gpu_and_groups_share_none(one_node: dict[str, Any]) -> None:
    bundles = one_node["bundles"]
    two = bundles["two_a"]
    assert [len(b["gpu_ids"]) for b in two] == [1, 1]
    assert len(set(gpu_ids(two))) == 2
    held_together = [gpu for name in ("four", "two_a", "two_b") for gpu in gpu_ids(bundles[name])]
    assert sorted(held_together, key=int) == [str(i) for i in range(8)]
    # The 1-GPU group came after two_b was released, so it reuses one of two_b's GPUs, nobody else's.
    assert set(gpu_ids(bundles["one"])) <= set(gpu_ids(bundles["two_b"]))


def test_a_group_lands_on_the_node_with_the_gpus(two_nodes: dict[str, Any]) -> None:
    gpu_node = two_nodes["gpu_node_id"]
    assert two_nodes["reserve"]["ok"], two_nodes["reserve"]
    assert set(two_nodes["bundles_to_node_id"].values()) == {gpu_node}
    assert {b["node_id"] for b in two_nodes["bundles"]} == {gpu_node}
    assert len(set(gpu_ids(two_nodes["bundles"]))) == 4


def test_snapshot_sees_both_nodes(two_nodes: dict[str, Any]) -> None:
    nodes = {n["node_id"]: n for n in two_nodes["initial"]["nodes"]}
    assert set(nodes) == {two_nodes["head_node_id"], two_nodes["gpu_node_id"]}
    assert (nodes[two_nodes["head_node_id"]]["total"], nodes[two_nodes["gpu_node_id"]]["total"]) == (0, 4)
    assert two_nodes["after_reserve"]["free"] == 0


def test_refusals_on_two_nodes_name_the_largest_node(two_nodes: dict[str, Any]) -> None:
    assert two_nodes["eight_refused"]["error"] == (
        "needs 8 GPUs on one node, most free on a node is 4 (4 free of 4 on 2 nodes)"
    )
    assert two_nodes["one_refused"]["error"] == (
        "needs 1 GPU on one node, most free on a node is 0 (0 free of 4 on 2 nodes)"
    )
    assert two_nodes["one_refused"]["seconds"] < 5


def test_serve_replicas_hold_their_groups() -> None:
    result = run_scenario("serve_replicas")
    one = result["group-1"]
    assert [len(result[name]) for name in ("group-1", "group-2", "group-4")] == [2, 1, 1]  # replicas that answered
    assert all(len(r["own_gpu_ids"]) == 1 and r["child_gpu_ids"] == [] for r in one)
    assert len({r["own_gpu_ids"][0] for r in one}) == 2  # two replicas, two groups, two GPUs
    for name, gpus in (("group-2", 2), ("group-4", 4)):
        for reply in result[name]:
            assert reply["own_gpu_ids"] == []
            assert len(reply["bundle_specs"]) == gpus
            assert len({ids[0] for ids in reply["child_gpu_ids"]}) == gpus
    held = {ids[0] for name in ("group-2", "group-4") for ids in result[name][0]["child_gpu_ids"]}
    held |= {r["own_gpu_ids"][0] for r in one}
    assert len(held) == 8
    assert result["after_deploy"]["free"] == 0


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_serve_accepts_the_group_layout(gpus: int) -> None:
    # Deployment.options validates bundles against ray_actor_options; no cluster is involved.
    options = GPUGroup(gpus, num_cpus=2).serve_options()
    deployment = serve.deployment(name="probe")(lambda: None).options(**options)
    config = deployment._replica_config
    assert config.placement_group_bundles == [{"CPU": 2.0, "GPU": 1.0}] + [{"GPU": 1.0}] * (gpus - 1)
    assert config.placement_group_strategy == "STRICT_PACK"


def test_serve_refuses_a_replica_that_does_not_fit_bundle_0() -> None:
    with pytest.raises(ValueError, match="first bundle"):
        serve.deployment(name="probe")(lambda: None).options(
            placement_group_bundles=GPUGroup(2).bundles(), ray_actor_options={"num_cpus": 1, "num_gpus": 2}
        )


def test_group_for_a_tap_matches_its_spec() -> None:
    group = GPUGroup.for_tap(TapSpec(client="acme", model="m", gpus=4, num_cpus=2))
    assert (group.gpus, group.num_cpus, group.name) == (4, 2.0, "")
    assert group.replica_actor_options() == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert GPUGroup(1).replica_actor_options() == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert group.engine_args(cuda_available=True) == {"tensor_parallel_size": 4, "distributed_executor_backend": "ray"}
    assert group.engine_args(cuda_available=False) == {"tensor_parallel_size": 1}

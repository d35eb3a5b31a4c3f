"""GPU-group scenarios on a fake-GPU Ray cluster that this process starts, owns and shuts down.

Run as ``python -m tests.integration.gpu_scenarios <scenario>``; prints one JSON object on the last
line of stdout. The test process may already be a driver of the session's cluster, so every
scenario runs here, in a subprocess, on a fresh local cluster (``address="local"``, never an
existing one, never ``ray stop``). Ray declares the GPUs; no CUDA is needed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.gpu_group import GPUGroup
from orch.capacity import Capacity, InsufficientGPUs, snapshot


@ray.remote(num_cpus=0, num_gpus=1)
def gpu_ids_in_bundle() -> dict[str, Any]:
    return {"gpu_ids": [str(i) for i in ray.get_gpu_ids()], "node_id": ray.get_runtime_context().get_node_id()}


def bundle_view(pg: PlacementGroup) -> list[dict[str, Any]]:
    """Runs one task per bundle of ``pg`` and returns the GPU ids and node each one saw."""
    refs = [
        gpu_ids_in_bundle.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
        ).remote()
        for i in range(pg.bundle_count)
    ]
    return list(ray.get(refs, timeout=30))


def capacity_dict(capacity: Capacity) -> dict[str, Any]:
    return {"nodes": [node._asdict() for node in capacity.nodes], "total": capacity.total, "free": capacity.free}


def settled_view(free: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """The capacity view once it shows ``free`` GPUs (it trails changes by one raylet report, longer
    on a loaded machine), or as it stands after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    view = capacity_dict(snapshot())
    while view["free"] != free and time.monotonic() < deadline:
        time.sleep(0.1)
        view = capacity_dict(snapshot())
    return view


def try_reserve(group: GPUGroup, timeout_s: float) -> dict[str, Any]:
    start = time.monotonic()
    try:
        group.reserve(timeout_s=timeout_s)
    except InsufficientGPUs as exc:
        return {"ok": False, "error": str(exc), "seconds": time.monotonic() - start}
    return {"ok": True, "error": None, "seconds": time.monotonic() - start}


def one_node() -> dict[str, Any]:
    """One node of 8 GPUs: 4+2+2 reserve, a fourth group is refused, releasing one lets it in."""
    ray.init(address="local", num_cpus=8, num_gpus=8, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {"initial": capacity_dict(snapshot())}
    groups = {"four": GPUGroup(4), "two_a": GPUGroup(2), "two_b": GPUGroup(2)}
    out["reserve"] = {name: try_reserve(group, timeout_s=20) for name, group in groups.items()}
    out["after_reserve"] = settled_view(0)
    out["bundles"] = {name: bundle_view(g.placement_group) for name, g in groups.items() if g.placement_group}
    one = GPUGroup(1)
    out["fourth_refused"] = try_reserve(one, timeout_s=10)
    groups["two_b"].release()
    out["after_release"] = settled_view(2)  # the free-GPU view trails a release by one raylet report
    out["fourth_after_release"] = try_reserve(one, timeout_s=20)
    if one.placement_group:
        out["bundles"]["one"] = bundle_view(one.placement_group)
    for group in [*groups.values(), one]:
        group.release()
    out["after_all_released"] = settled_view(8)
    ray.shutdown()
    return out


def two_nodes() -> dict[str, Any]:
    """A head with no GPUs and a worker with 4: a 4-GPU group lands on the worker."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=4, num_gpus=4)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        out: dict[str, Any] = {
            "head_node_id": cluster.head_node.node_id,  # type: ignore[attr-defined]  # set by initialize_head
            "gpu_node_id": worker.node_id,
            "initial": capacity_dict(snapshot()),
            "eight_refused": try_reserve(GPUGroup(8), timeout_s=10),
        }
        group = GPUGroup(4)
        out["reserve"] = try_reserve(group, timeout_s=20)
        assert group.placement_group is not None, out
        out["bundles_to_node_id"] = placement_group_table(group.placement_group)["bundles_to_node_id"]
        out["bundles"] = bundle_view(group.placement_group)
        out["after_reserve"] = settled_view(0)
        out["one_refused"] = try_reserve(GPUGroup(1), timeout_s=10)
        group.release()
        ray.shutdown()
        return out
    finally:
        cluster.shutdown()


class GroupProbe:
    """A replica that reports the GPUs it holds and the ones its group's bundles hand to child tasks."""

    def probe(self) -> dict[str, Any]:
        pg = ray.util.get_current_placement_group()
        assert pg is not None, "a replica with placement_group_bundles runs inside its group"
        own = [str(i) for i in ray.get_gpu_ids()]
        # Bundle 0's GPU is the replica's own when it holds one; child tasks get the other bundles.
        first_free = 1 if own else 0
        refs = [
            gpu_ids_in_bundle.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            ).remote()
            for i in range(first_free, pg.bundle_count)
        ]
        from ray import serve

        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "own_gpu_ids": own,
            "bundle_specs": pg.bundle_specs,
            "child_gpu_ids": [r["gpu_ids"] for r in ray.get(refs, timeout=30)],
        }


def serve_replicas() -> dict[str, Any]:
    """Serve takes GPUGroup.serve_options as they are: a replica per group, each on its own GPUs."""
    from ray import serve

    ray.init(address="local", num_cpus=8, num_gpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(name="group-probe")(GroupProbe)
    shapes = {f"group-{gpus}": (gpus, replicas) for gpus, replicas in ((1, 2), (2, 1), (4, 1))}
    targets = [
        serve.RunTarget(
            deployment.options(num_replicas=replicas, **GPUGroup(gpus).serve_options()).bind(),
            name=name,
            route_prefix=None,
        )
        for name, (gpus, replicas) in shapes.items()
    ]
    handles = serve.run_many(targets)  # deploys the apps side by side, returns once all run
    out: dict[str, Any] = {}
    for name, handle in zip(shapes, handles, strict=True):
        by_replica: dict[str, Any] = {}
        for _ in range(50):  # the router picks replicas at random; ask until each one answered
            reply = handle.probe.remote().result(timeout_s=30)
            by_replica[reply.pop("replica")] = reply
            if len(by_replica) == shapes[name][1]:
                break
        out[name] = list(by_replica.values())
    out["after_deploy"] = capacity_dict(snapshot())
    serve.shutdown()
    ray.shutdown()
    return out


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "one_node": one_node,
    "two_nodes": two_nodes,
    "serve_replicas": serve_replicas,
}

if __name__ == "__main__":
    result = SCENARIOS[sys.argv[1]]()
    print(json.dumps(result, default=str))

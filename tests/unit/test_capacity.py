from __future__ import annotations

import pytest

from orch.capacity import Capacity, InsufficientGPUs, NodeGPUs


def cap(*nodes: tuple[int, int]) -> Capacity:
    return Capacity(tuple(NodeGPUs(f"node-{i}", f"10.0.0.{i}", total, free) for i, (total, free) in enumerate(nodes)))


def test_a_group_fits_only_on_one_node_with_enough_free() -> None:
    assert cap((8, 4)).fits(4)
    assert not cap((8, 2)).fits(4)
    assert not cap((4, 2), (4, 2)).fits(4)  # 4 free in all, but never 4 on one node (STRICT_PACK)
    assert cap((4, 2), (8, 4)).fits(4)


def test_no_nodes_fit_nothing() -> None:
    assert not cap().fits(1)
    assert cap().max_replicas_that_fit(1) == 0
    assert cap().shortfall_message(1) == "needs 1 GPU, 0 free of 0 on 0 nodes"


def test_max_replicas_counts_whole_groups_per_node() -> None:
    assert cap((8, 8)).max_replicas_that_fit(2) == 4
    assert cap((8, 7)).max_replicas_that_fit(2) == 3
    assert cap((4, 3), (4, 3)).max_replicas_that_fit(2) == 2
    assert cap((4, 3), (4, 3)).max_replicas_that_fit(4) == 0
    with pytest.raises(ValueError):
        cap((8, 8)).max_replicas_that_fit(0)


def test_shortfall_on_one_node() -> None:
    assert cap((8, 2)).shortfall_message(4) == "needs 4 GPUs, 2 free of 8 on 1 node"


def test_shortfall_says_gpu_for_one() -> None:
    assert cap((8, 0)).shortfall_message(1) == "needs 1 GPU, 0 free of 8 on 1 node"


def test_shortfall_on_several_nodes_names_the_best_node() -> None:
    assert cap((8, 2), (4, 1)).shortfall_message(4) == (
        "needs 4 GPUs on one node, most free on a node is 2 (3 free of 12 on 2 nodes)"
    )


def test_totals_sum_over_nodes() -> None:
    capacity = cap((0, 0), (8, 3), (4, 4))
    assert (capacity.total, capacity.free, capacity.most_free_on_a_node) == (12, 7, 4)


def test_insufficient_gpus_is_a_runtime_error() -> None:
    assert issubclass(InsufficientGPUs, RuntimeError)

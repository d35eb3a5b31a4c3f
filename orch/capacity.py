"""How many GPUs the cluster has free, node by node, and whether a GPU group fits.

A group of N GPUs is placed STRICT_PACK: all N on one node. So the question is never "are there N
free GPUs" but "is there a node with N free GPUs"; the refusal says which, in one line.

:class:`Capacity` is pure (tests build it by hand); :func:`snapshot` reads it from the connected
Ray cluster and is the only function here that touches Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class InsufficientGPUs(RuntimeError):
    """No node has enough free GPUs for a group; the message says how many are needed and free."""


class NodeGPUs(NamedTuple):
    """One alive node's GPUs: ``total`` declared, ``free`` not held by any task, actor or placement group."""

    node_id: str
    address: str
    total: int
    free: int


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


@dataclass(frozen=True)
class Capacity:
    """The GPUs of every alive node at one moment.

    >>> cap = Capacity((NodeGPUs("n1", "10.0.0.1", total=8, free=2),))
    >>> cap.fits(4), cap.max_replicas_that_fit(2)
    (False, 1)
    >>> cap.shortfall_message(4)
    'needs 4 GPUs, 2 free of 8 on 1 node'
    """

    nodes: tuple[NodeGPUs, ...]

    @property
    def total(self) -> int:
        return sum(n.total for n in self.nodes)

    @property
    def free(self) -> int:
        return sum(n.free for n in self.nodes)

    @property
    def most_free_on_a_node(self) -> int:
        return max((n.free for n in self.nodes), default=0)

    def fits(self, gpus: int) -> bool:
        """Whether one group of ``gpus`` fits now: some node has that many free."""
        return self.most_free_on_a_node >= gpus

    def max_replicas_that_fit(self, gpus: int) -> int:
        """How many groups of ``gpus`` fit now, each on one node."""
        if gpus < 1:
            raise ValueError(f"a group has at least 1 GPU, got {gpus}")
        return sum(n.free // gpus for n in self.nodes)

    def shortfall_message(self, gpus: int) -> str:
        """One line saying what a group of ``gpus`` needs and what is free.

        >>> Capacity((NodeGPUs("a", "", 8, 2), NodeGPUs("b", "", 4, 1))).shortfall_message(4)
        'needs 4 GPUs on one node, most free on a node is 2 (3 free of 12 on 2 nodes)'
        """
        if len(self.nodes) <= 1:
            return f"needs {_gpus(gpus)}, {self.free} free of {self.total} on {_nodes(len(self.nodes))}"
        return (
            f"needs {_gpus(gpus)} on one node, most free on a node is {self.most_free_on_a_node} "
            f"({self.free} free of {self.total} on {_nodes(len(self.nodes))})"
        )


def snapshot() -> Capacity:
    """Reads the connected Ray cluster's GPUs per alive node (two GCS calls; needs ``ray.init`` first).

    Free counts whole GPUs: a GPU partly held by a fractional task is not free for a group.
    """
    import ray
    from ray._private.state import available_resources_per_node  # DeveloperAPI; one GCS call, no dashboard

    available = available_resources_per_node()
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_id = str(node["NodeID"])
        total = int(node.get("Resources", {}).get("GPU", 0))
        free = int(available.get(node_id, {}).get("GPU", 0))
        nodes.append(NodeGPUs(node_id, str(node.get("NodeManagerAddress", "")), total, min(free, total)))
    return Capacity(tuple(nodes))

"""GPUGroup: the N GPUs (1, 2, 4 or 8) that one model replica holds, all on one node.

The layout is one bundle per GPU, the replica's CPUs in the first::

    [{"CPU": num_cpus, "GPU": 1}, {"GPU": 1}, ...]     strategy STRICT_PACK

Serve places the replica actor in bundle 0, so its ``ray_actor_options`` must fit there
(ray/serve/_private/config.py, ``ReplicaConfig._validate_placement_group_options``), and runs
every task and actor the replica starts inside the group. vLLM's Ray executor puts one worker on
each bundle that has a GPU and refuses bundles of more than one (vllm/v1/executor/ray_utils.py,
``initialize_ray_cluster``); Ray Serve LLM builds the same layout. Hence the replica actor:

- 1 GPU: holds the GPU itself (``num_gpus=1``); the engine runs in-process and Ray's
  ``CUDA_VISIBLE_DEVICES`` shows it exactly that GPU.
- N > 1: holds none (``num_gpus=0``); vLLM runs ``tensor_parallel_size=N`` workers, one per bundle.

:meth:`GPUGroup.serve_options` is what a deployment passes to Serve, which creates the group per
replica. :meth:`GPUGroup.reserve` creates one directly (capacity checks, tests, the CLI) and fails
fast with :class:`orch.capacity.InsufficientGPUs` instead of waiting for GPUs that are not there.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from orch.capacity import InsufficientGPUs, snapshot
from orch.tapspec import TapSpec

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

STRATEGY = "STRICT_PACK"
# Raylets report free resources to the GCS every 100 ms (raylet_report_resources_period_milliseconds).
VIEW_LAG_S = 0.25


class GPUGroup:
    """A group of ``gpus`` GPUs on one node for one replica.

    >>> GPUGroup(2, num_cpus=1).bundles()
    [{'CPU': 1.0, 'GPU': 1.0}, {'GPU': 1.0}]
    >>> group = GPUGroup(4)
    >>> group.reserve(timeout_s=5)  # doctest: +SKIP
    >>> group.release()  # doctest: +SKIP
    """

    def __init__(self, gpus: int, num_cpus: float = 1.0, name: str = "") -> None:
        if gpus < 1:
            raise ValueError(f"a GPU group has at least 1 GPU, got {gpus}")
        if num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, got {num_cpus}")
        self.gpus = gpus
        self.num_cpus = float(num_cpus)
        self.name = name  # placement group name; unique in the Ray namespace, "" for none
        self._pg: PlacementGroup | None = None

    @classmethod
    def for_tap(cls, spec: TapSpec, name: str = "") -> GPUGroup:
        """The group one replica of ``spec``'s model holds (unnamed: Ray refuses a second group of one name)."""
        return cls(spec.gpus, spec.num_cpus, name=name)

    def bundles(self) -> list[dict[str, float]]:
        """Serve's ``placement_group_bundles``: one bundle per GPU, the replica's CPUs in the first."""
        first = {"CPU": self.num_cpus, "GPU": 1.0} if self.num_cpus else {"GPU": 1.0}
        return [first] + [{"GPU": 1.0} for _ in range(self.gpus - 1)]

    def replica_actor_options(self) -> dict[str, Any]:
        """The replica actor's resources; a subset of bundle 0, as Serve requires."""
        return {"num_cpus": self.num_cpus, "num_gpus": 1.0 if self.gpus == 1 else 0.0}

    def serve_options(self) -> dict[str, Any]:
        """Deployment options that give each replica its own group (``Deployment.options(**...)``)."""
        return {
            "placement_group_bundles": self.bundles(),
            "placement_group_strategy": STRATEGY,
            "ray_actor_options": self.replica_actor_options(),
        }

    def engine_args(self, cuda_available: bool) -> dict[str, Any]:
        """vLLM engine arguments that match the group: TP over its GPUs with CUDA, else TP 1 on the CPU."""
        if cuda_available and self.gpus > 1:
            return {"tensor_parallel_size": self.gpus, "distributed_executor_backend": "ray"}
        return {"tensor_parallel_size": 1}

    @property
    def placement_group(self) -> PlacementGroup | None:
        """The group :meth:`reserve` created, or None."""
        return self._pg

    def reserve(self, timeout_s: float = 10.0) -> PlacementGroup:
        """Creates the group's placement group and waits until it holds its GPUs.

        Raises :class:`InsufficientGPUs` at once when no node has ``gpus`` free, or after
        ``timeout_s`` when the group still is not placed (then nothing stays reserved).
        """
        from ray.util.placement_group import placement_group, remove_placement_group

        if self._pg is not None:
            raise RuntimeError("this GPU group is already reserved; release() it first")
        capacity = snapshot()
        if not capacity.fits(self.gpus):
            # The GCS's free-GPU view trails a release by one raylet report (~100 ms); look once more.
            time.sleep(VIEW_LAG_S)
            capacity = snapshot()
            if not capacity.fits(self.gpus):
                raise InsufficientGPUs(capacity.shortfall_message(self.gpus))
        pg = placement_group(self.bundles(), strategy=STRATEGY, name=self.name)
        if not pg.wait(timeout_seconds=timeout_s):
            remove_placement_group(pg)
            capacity = snapshot()
            message = capacity.shortfall_message(self.gpus)
            if capacity.fits(self.gpus):  # the GPUs are free, so another bundle resource (CPUs) is short
                message += f"; not placed within {timeout_s:g} s: bundle 0 also needs {self.num_cpus:g} CPU"
            raise InsufficientGPUs(message)
        self._pg = pg
        return pg

    def release(self) -> None:
        """Removes the placement group, freeing its GPUs; a no-op when none is reserved.

        Ray frees them at once, but :func:`orch.capacity.snapshot` shows them free only after the
        node's next resource report (~100 ms); :meth:`reserve` allows for that.
        """
        from ray.util.placement_group import remove_placement_group

        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

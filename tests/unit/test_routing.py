"""Unit tests of orch.routing's choice and apps/router.py's shell over it (fake replicas and a fake
queue-length cache, named so; the router against real Serve replicas is tests/integration/test_router.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from apps.router import OrchRouter
from orch.engine import GenerationRequest
from orch.routing import prefix_hashes, prompt_text


@dataclass(frozen=True)
class FakeReplicaId:
    unique_id: str


@dataclass
class FakeReplica:
    replica_id: FakeReplicaId
    routing_stats: dict[str, Any] = field(default_factory=dict)


class FakeQueueLens(dict[FakeReplicaId, int]):
    pass


def _router(prefix: bool, lens: dict[str, int]) -> tuple[OrchRouter, list[FakeReplica]]:
    router = OrchRouter.__new__(OrchRouter)  # no Serve around it: only the choice is under test
    router.initialize_state(prefix=prefix, block_chars=16, imbalance=2)
    replicas = [FakeReplica(FakeReplicaId(name)) for name in lens]
    router._replica_queue_len_cache = FakeQueueLens({r.replica_id: lens[r.replica_id.unique_id] for r in replicas})
    return router, replicas


def _pending(text: str, method: str = "generate", **kwargs: Any) -> Any:
    request = GenerationRequest(request_id="r", messages=[{"role": "user", "content": text}])
    return SimpleNamespace(args=[request], kwargs=kwargs, metadata=SimpleNamespace(call_method=method))


def _choose(router: OrchRouter, replicas: list[FakeReplica], pending: Any) -> list[list[str]]:
    ranks = asyncio.run(router.choose_replicas(replicas, pending))  # type: ignore[arg-type]
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_prompt_follows_its_prefix_within_the_bound_and_gateways_agree_on_a_new_one() -> None:
    router, replicas = _router(True, {"a": 3, "b": 1, "c": 2})
    other, _ = _router(True, {"a": 3, "b": 1, "c": 2})  # another gateway replica: it routed nothing yet
    doc = "shared document " * 8
    first = _choose(router, replicas, _pending(doc + "q1"))
    assert len(first[0]) == 1 and first == _choose(other, replicas, _pending(doc + "q9"))  # where its block hashes
    router.on_request_routed(_pending(doc + "q1"), FakeReplicaId("a"), None)  # type: ignore[arg-type]
    assert _choose(router, replicas, _pending(doc + "q2")) == [["a"], ["b", "c"]]  # a: 3 <= 1 + 2
    router._replica_queue_len_cache[FakeReplicaId("a")] = 4  # now too busy: the least loaded instead
    assert _choose(router, replicas, _pending(doc + "q3")) == [["b"], ["c", "a"]]
    assert _choose(router, replicas, _pending("x" * 8)) == [["b"], ["c", "a"]]  # too short to hash: least loaded
    assert router.choice.affine == 2


def test_without_prefix_the_ties_come_first_and_other_calls_are_not_hashed() -> None:
    router, replicas = _router(False, {"a": 0, "b": 0, "c": 5})
    ranks = _choose(router, replicas, _pending("x" * 64))
    assert sorted(ranks[0]) == ["a", "b"] and ranks[1] == ["c"]
    assert _choose(router, replicas, _pending("", "stats", replica_id="c")) == [["c"]]  # one replica, by its id
    assert router._hashes(_pending("x" * 64, "stats")) == []


def test_engine_counts_stand_in_for_a_replica_serve_has_no_count_of() -> None:
    router, replicas = _router(False, {"a": 2})
    replicas.append(FakeReplica(FakeReplicaId("b"), {"running": 1, "waiting": 0}))
    assert _choose(router, replicas, None) == [["b"], ["a"]]


def test_prefix_hashes_chain_and_prompts_render_tools_then_messages() -> None:
    a, b = prefix_hashes("0123456789abcdef" * 3 + "x", 16), prefix_hashes("0123456789abcdef" * 2 + "Z" * 16, 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert prefix_hashes("short", 16) == []
    tools = [{"type": "function", "function": {"name": "f"}}]
    request = GenerationRequest(request_id="r", messages=[{"role": "user", "content": "hi"}], tools=tools)
    text = prompt_text(request)
    assert text is not None and text.index('"name": "f"') < text.index("user\x00hi")
    assert prompt_text(GenerationRequest(request_id="r", prompt="plain")) == "plain"
    assert prompt_text(SimpleNamespace()) is None

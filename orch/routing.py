"""Which replica of a model takes a request, as pure logic: least outstanding work, and prefix affinity.
Serve's extension point that runs it, set per model as ``routing``, is ``apps/router.py``.

- **Least outstanding work.** The replicas with the fewest requests in flight come first.
- **Prefix affinity.** A prompt goes to the replica that served its longest prefix, while that replica's
  load is within ``imbalance`` requests of the least loaded one; its engine has that prefix's KV blocks in
  its prefix cache, so the prompt's prefill is mostly skipped. The prompt (the chat messages and tools, or
  the text) is cut in blocks of ``block_chars`` characters, and each block's hash covers every block before
  it, as vLLM's block hashes do: the deepest block hash seen names the replica. A prompt this router has
  not seen goes to the replica its first block hashes to (rendezvous hashing over the replicas within the
  bound). Hashes are stable across processes, so every gateway replica sends a new prefix to the same
  model replica and learns the same home, without a shared map or a hop.

>>> choice = ReplicaChoice(prefix=True, block_chars=4, imbalance=1)
>>> hashes = prefix_hashes("abcdefgh-1", 4)
>>> first = choice.rank({"r1": 0, "r2": 0}, hashes)[0]   # nobody served it: where its first block hashes to
>>> first == ReplicaChoice(prefix=True, block_chars=4).rank({"r1": 0, "r2": 0}, hashes)[0] and len(first) == 1
True
>>> choice.served(hashes, "r2")
>>> choice.rank({"r1": 0, "r2": 1}, prefix_hashes("abcdefgh-2", 4))   # its prefix's replica, 1 busier
[['r2'], ['r1']]
>>> choice.rank({"r1": 0, "r2": 2}, prefix_hashes("abcdefgh-3", 4))   # too busy: the least loaded
[['r1'], ['r2']]
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

R = TypeVar("R", bound=str)


def prefix_hashes(text: str, block_chars: int, max_blocks: int = 512) -> list[int]:
    """The chained hashes of ``text``'s whole blocks: equal prompts up to block k share hashes 0..k.

    >>> a, b = prefix_hashes("x" * 300 + "tail A", 100), prefix_hashes("x" * 300 + "tail B", 100)
    >>> len(a), a == b, prefix_hashes("y" * 300, 100)[0] == a[0]
    (3, True, False)
    """
    out, h = [], b""
    for start in range(0, min(len(text), block_chars * max_blocks) - block_chars + 1, block_chars):
        h = hashlib.blake2b(h + text[start : start + block_chars].encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "big"))
    return out


def _score(block: int, replica: str) -> bytes:
    """Rendezvous weight of a replica for a block: the highest wins, the same in every process."""
    return hashlib.blake2b(f"{block}:{replica}".encode(), digest_size=8).digest()


def prompt_text(request: Any) -> str | None:
    """The text a request's prompt starts with, in the order the engine renders it (tools, then messages);
    None for a call that is not a generation."""
    messages = getattr(request, "messages", None)
    prompt = getattr(request, "prompt", None)
    if messages is None and prompt is None:
        return None
    parts = [json.dumps(request.tools, sort_keys=True)] if getattr(request, "tools", None) else []
    if messages is not None:
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            parts.append(f"{m.get('role') if isinstance(m, dict) else ''}\x00{text}\x01")
    else:
        parts.append(prompt if isinstance(prompt, str) else json.dumps(prompt))
    return "".join(parts)


class ReplicaChoice:
    """Ranks replicas for one request from their loads and what each served (a bounded LRU of block hashes)."""

    def __init__(self, prefix: bool = False, block_chars: int = 256, imbalance: int = 4, max_entries: int = 200_000):
        self.prefix = prefix
        self.block_chars = block_chars
        self._imbalance = imbalance
        self._max_entries = max_entries
        self._homes: OrderedDict[int, Any] = OrderedDict()  # block hash -> the replica that served it
        self.affine = 0  # requests ranked first on their prefix's replica (served there, or hashed to it)

    def hashes(self, request: Any) -> list[int]:
        text = prompt_text(request) if self.prefix else None
        return prefix_hashes(text, self.block_chars) if text else []

    def rank(self, loads: Mapping[R, float], hashes: Sequence[int] = ()) -> list[list[R]]:
        """Ranks of replicas (by id), the most preferred first: for a prompt, the replica that served its
        longest prefix, else the one its first block hashes to, alone when within the bound; else the least
        loaded ones (in random order), then the rest by load."""
        ordered = sorted(loads, key=loads.__getitem__)
        least = loads[ordered[0]]
        within = [r for r in ordered if loads[r] <= least + self._imbalance]
        home = self._home(hashes)
        if home is None and hashes:
            home = max(within, key=lambda r: _score(hashes[0], r))
        if home is not None and home in within:
            self.affine += 1
            return [[home], [r for r in ordered if r != home]]
        tied = [r for r in ordered if loads[r] == least]
        random.shuffle(tied)
        return [tied, ordered[len(tied) :]] if len(tied) < len(ordered) else [tied]

    def served(self, hashes: Sequence[int], replica: str) -> None:
        for h in hashes:
            self._homes[h] = replica
            self._homes.move_to_end(h)
        while len(self._homes) > self._max_entries:
            self._homes.popitem(last=False)

    def _home(self, hashes: Sequence[int]) -> Any:
        """The replica that served the longest prefix of these hashes."""
        home = None
        for h in hashes:
            found = self._homes.get(h)
            if found is None:
                break
            home = found
        return home


def router_config(routing: str) -> dict[str, Any] | None:
    """A model deployment's ``request_router_config`` for its ``routing``; None: Serve's default.

    >>> router_config("prefix")["request_router_kwargs"]
    {'prefix': True}
    >>> router_config("default") is None
    True
    """
    if routing == "default":
        return None
    return {
        "request_router_class": "apps.router:OrchRouter",
        "request_router_kwargs": {"prefix": routing == "prefix"},
        "request_routing_stats_period_s": 2,
    }

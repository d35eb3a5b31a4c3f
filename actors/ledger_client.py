"""LedgerClient: how other processes (the front, the CLI) reach the ledger shards over Ray."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from actors.ledger import LedgerUnavailable, ledger_actor, tenant_id_of
from orch.ledger import Op, Result
from orch.renewal import Renewal, Renewed
from orch.store import ApiKeyRecord, UsageRow

log = logging.getLogger(__name__)


class LedgerClient:
    """Calls the ledger shards from another process (the gateway, the CLI): routes a tenant to its shard
    (crc32 of the tenant id, stable across processes), and retries a call the actor could not take
    (restarting, dead and recreated, or refusing after a failed commit) until ``deadline_s``. Every
    mutation it sends carries an op id, so a retry returns the first result instead of applying twice."""

    def __init__(
        self, data_dir: Path, shards: int = 1, deadline_s: float = 60.0, nodes: dict[int, str] | None = None
    ) -> None:
        self._data_dir = data_dir
        self._deadline_s = deadline_s
        self._handles: list[Any] = [None] * shards
        self._nodes = nodes or {}  # shard -> the custom resource of the node holding its file (else the head)

    @property
    def shards(self) -> int:
        return len(self._handles)

    @property
    def nodes(self) -> dict[int, str]:
        """Shard -> the custom resource of the node that holds its file (shards not listed: the head)."""
        return self._nodes

    def shard_of(self, tenant_id: str) -> int:
        return zlib.crc32(tenant_id.encode()) % len(self._handles)

    def _handle(self, shard: int) -> Any:
        if self._handles[shard] is None:
            self._handles[shard] = ledger_actor(self._data_dir, shard, self._nodes.get(shard))
        return self._handles[shard]

    async def call(self, shard: int, method: str, *args: Any) -> Any:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        deadline = time.monotonic() + self._deadline_s
        delay = 0.05
        while True:
            try:
                return await self._handle(shard).call.remote(method, *args)
            except (RayActorError, ActorUnavailableError, LedgerUnavailable) as exc:
                if time.monotonic() + delay > deadline:
                    raise LedgerUnavailable(f"ledger shard {shard} unavailable: {type(exc).__name__}") from exc
                log.warning("ledger shard %d: %s; retrying", shard, type(exc).__name__)
                if isinstance(exc, ActorDiedError):
                    self._handles[shard] = None  # gone for good: get_if_exists creates it again
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def tenant_call(self, tenant_id: str, method: str, *args: Any) -> Any:
        return await self.call(self.shard_of(tenant_id), method, *args)

    async def apply(self, tenant_id: str, op: Op, usage: UsageRow | None = None) -> Result:
        result: Result = await self.tenant_call(tenant_id, "apply", op, usage)
        return result

    async def renew(self, tenant_id: str, renewal: Renewal) -> Renewed:
        renewed: Renewed = await self.tenant_call(tenant_id, "renew", renewal)
        return renewed

    async def get_key(self, key_id: str) -> ApiKeyRecord | None:
        if len(self._handles) == 1:
            record: ApiKeyRecord | None = await self.call(0, "get_key", key_id)
            return record
        found = await asyncio.gather(*(self.call(s, "get_key", key_id) for s in range(len(self._handles))))
        return next((r for r in found if r is not None), None)

    async def create_tenant(self, name: str, op_id: str | None = None) -> Result:
        """Creates the tenant on the shard its id hashes to (the id derives from ``op_id`` when given)."""
        op_id = op_id or f"tenant-{uuid.uuid4().hex}"
        result: Result = await self.tenant_call(tenant_id_of(op_id), "create_tenant", name, op_id)
        return result

"""TenantLedger: the one writer of a ledger shard's DuckDB file; group-commits money ops.

:class:`LedgerService` is the plain object (testable without Ray): it applies ops to the in-memory
:class:`orch.ledger.Ledger` in arrival order and acknowledges each only after the transaction that
holds it committed. Ops that arrive while a commit runs form the next batch (group commit), so one
fsync-bound transaction serves many requests. A debit and its usage row share a transaction.

:func:`ledger_actor` is the Ray shell: detached, named, restarted on failure; on start it rebuilds
state by replaying the file. Callers retry with the same op id, so a restart loses or doubles nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from orch import snapshot
from orch.backup import backup_file
from orch.invariants import check_invariants
from orch.keys import generate_key, hash_secret, load_or_create_admin_key, load_or_create_pepper, parse_key
from orch.ledger import Code, CreateTenant, ExpireHolds, Ledger, Op, Record, Result, Settle, utc_now
from orch.metrics import COMMIT_BUCKETS_S, Histogram, LedgerGauges, UsageMetrics
from orch.protocol import USAGE_LIMIT, GroupBy
from orch.ratelimit import Decision, Limit, Policy, RateWindows
from orch.renewal import Renewal, Renewed, apply_renewal
from orch.store import ApiKeyRecord, Batch, Store, UsageReport
from orch.usage_log import Usage, UsageRow

log = logging.getLogger(__name__)

NAMESPACE = "llama-orch"


def tenant_id_of(op_id: str) -> str:
    """The id of the tenant a CreateTenant ``op_id`` creates: derived, so a client can route it to its
    shard before the ledger answers, and a retry names the same tenant."""
    return "t-" + hashlib.sha256(op_id.encode()).hexdigest()[:12]


def shard_name(shard: int = 0) -> str:
    return f"tenant-ledger-{shard}"


class LedgerService:
    """Ledger + store + group commit.

    If a commit fails, the in-memory ledger is ahead of the file: it is rebuilt from the file and the
    batch's callers get :class:`LedgerUnavailable` (they retry with the same op ids). If that rebuild
    fails too, the service is *broken*: every pending and later call raises ``LedgerUnavailable`` at
    once, and ``on_broken`` runs (the actor exits its process, so Ray restarts it and it replays).

    >>> service = LedgerService(Path(".orch/ledger-0.duckdb"))  # doctest: +SKIP
    >>> await service.apply(GrantCredits("grant-1", "t1", 5_000_000))  # doctest: +SKIP
    """

    USAGE_QUERIES = 2  # usage reports run at once in worker threads; more wait (they never block holds)
    SNAPSHOT_EVERY = 200_000  # committed ops between two snapshots (orch.snapshot): a restart replays fewer

    def __init__(
        self,
        db_path: Path,
        clock: Callable[[], datetime] = utc_now,
        *,
        store: Store | None = None,
        on_broken: Callable[[], None] | None = None,
        snapshot_every: int | None = None,
        snapshot_aside: bool = False,
    ) -> None:
        self._db_path = db_path
        self._store = Store(db_path) if store is None else store
        self._clock = clock
        self._on_broken = on_broken
        self._broken: str | None = None  # why the service refuses every call, once it is broken
        self._usage_slots = asyncio.Semaphore(self.USAGE_QUERIES)
        self._rates = RateWindows()  # in memory: a restart forgets the last minute's counts
        self._snapshot_every = self.SNAPSHOT_EVERY if snapshot_every is None else snapshot_every
        # Snapshots on the loop pickle the whole ledger there (~1 s at the default size); aside, a forked
        # child does (orch.snapshot.dumps_aside) and a worker thread writes it: the loop pauses for the fork.
        self._snapshot_aside = snapshot_aside and hasattr(os, "fork")
        self._snapshotting: asyncio.Task[None] | None = None
        self._pepper: bytes | None = None
        self._pending: list[tuple[Op | None, Result, Usage, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None
        started = time.perf_counter()
        gc.disable()  # replay makes millions of long-lived records: collections would rescan them all, often
        try:
            self._ledger, replayed = self._load_ledger()
        finally:
            gc.enable()
        self._ledger.check_invariants()
        self._since_snapshot = replayed
        self._snapshot_if_due()
        self._usage_metrics = self._store.usage_metrics()  # then each committed row (orch.metrics)
        self._commit_seconds = Histogram(COMMIT_BUCKETS_S)
        # Per the ledger benchmark: default GC thresholds halve throughput on long-lived records.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        log.info("ledger %s: replayed %d ops in %.2f s", db_path, replayed, time.perf_counter() - started)

    def _load_ledger(self) -> tuple[Ledger, int]:
        """The ledger the file holds: its snapshot (if this code wrote it) and the ops after it replayed;
        how many ops were replayed."""
        found = self._store.load_snapshot()
        if found is not None and found[1] == snapshot.CODE:
            ledger, from_seq = snapshot.loads(found[2], self._clock), found[0]
        else:
            if found is not None:
                log.info("ledger snapshot of other code (%s, this is %s): replaying all", found[1], snapshot.CODE)
            ledger, from_seq = Ledger(self._clock), 0
        return ledger, ledger.replay(self._store.load_ops(from_seq=from_seq))

    def _snapshot_if_due(self) -> None:
        """Writes a snapshot once ``snapshot_every`` ops were committed since the last. Called only when the
        ledger holds exactly what the file does (right after a commit, before the loop runs anything else)."""
        if self._since_snapshot < self._snapshot_every:
            return
        try:
            if self._snapshot_aside and _running_loop():
                if self._snapshotting is None or self._snapshotting.done():  # else the next commit asks again
                    # The ledger holds exactly the ops below next_seq now: the fork copies that state.
                    seq, at = self._store.next_seq, self._clock()
                    collect = snapshot.dumps_aside(self._ledger)
                    self._since_snapshot = 0
                    self._snapshotting = asyncio.create_task(self._write_aside(collect, seq, at))
            else:
                self.snapshot()
        except Exception as exc:  # the ops are durable: a missing snapshot only makes the next restart slower
            log.error("ledger snapshot failed (%s: %s)", type(exc).__name__, exc)

    async def _write_aside(self, collect: Callable[[], bytes], seq: int, at: datetime) -> None:
        """Writes the snapshot a forked child is pickling (of the ops below ``seq``): its bytes and then the
        write, each in a worker thread, while the loop goes on."""
        started = time.perf_counter()
        try:
            state = await asyncio.to_thread(collect)
            cursor = self._store.cursor()
            try:
                await asyncio.to_thread(self._store.save_snapshot, seq, snapshot.CODE, state, at, cursor)
            finally:
                cursor.close()
            log.info("ledger snapshot at op %d aside in %.3f s", seq, time.perf_counter() - started)
        except Exception as exc:  # as above: the next restart replays more
            log.error("ledger snapshot aside failed (%s: %s)", type(exc).__name__, exc)

    async def snapshot_done(self) -> None:
        """Waits for a snapshot being written aside (if any)."""
        if self._snapshotting is not None:
            await asyncio.shield(self._snapshotting)

    def snapshot(self) -> float:
        """Writes a snapshot of the ledger now (as of every committed op); the seconds it took. Safe whenever
        no commit is pending, as between two calls of this service's loop."""
        if self._pending:
            raise RuntimeError("ops are waiting for their commit: a snapshot now would hold uncommitted ones")
        started = time.perf_counter()
        self._store.save_snapshot(self._store.next_seq, snapshot.CODE, snapshot.dumps(self._ledger), self._clock())
        self._since_snapshot = 0
        took = time.perf_counter() - started
        log.info("ledger snapshot at op %d in %.3f s", self._store.next_seq, took)
        return took

    async def backup(self, dest: str) -> dict[str, Any]:
        """Writes a copy of this shard's file to ``dest`` (a new file) while the service goes on committing:
        :func:`orch.backup.backup_file` in a worker thread, one DuckDB transaction, so the copy holds exactly the
        group commits done when it began. Returns its last op's ``seq`` (-1: none), ``ops``, ``bytes``,
        ``sha256`` and ``seconds``."""
        self.check_usable()
        started = time.perf_counter()
        copy = await asyncio.to_thread(backup_file, self._store.cursor(), Path(dest))
        took = time.perf_counter() - started
        log.info(
            "ledger %s: backed up %d ops (to seq %d) to %s in %.2f s", self._db_path, copy.ops, copy.seq, dest, took
        )
        return copy._asdict() | {"seconds": round(took, 3)}

    def check_usable(self) -> None:
        """Raises :class:`LedgerUnavailable` once the service is broken (see the class docstring)."""
        if self._broken is not None:
            raise LedgerUnavailable(self._broken)

    async def apply(self, op: Op, usage: UsageRow | None = None) -> Result:
        """Applies ``op``; returns its result once durable. ``usage`` is written only if ``op`` is OK.

        A Settle's usage row must cost what it settles. A late settle (``result.late``) may debit less
        (the hold had expired and the balance was short): the row is then written with the cost
        actually debited, ``result.micro_credits``, so Σ usage cost stays Σ debits."""
        self.check_usable()
        if usage is not None and type(op) is Settle and usage.cost_micro != op.micro_credits:
            raise ValueError(f"usage row {usage.request_id} costs {usage.cost_micro}, its settle {op.micro_credits}")
        result = self._ledger.apply(op)
        if usage is not None and result.late and result.code is Code.OK:
            usage = usage._replace(cost_micro=result.micro_credits)
        return await self._commit(op, result, () if usage is None else (usage,))

    async def renew(self, renewal: Renewal) -> Renewed:
        """A lease renewal (orch.lease): its Settle, usage rows and next Hold in one transaction."""
        self.check_usable()
        renewed, done = apply_renewal(self._ledger, renewal)
        await asyncio.gather(*(self._commit(op, result, rows) for op, result, rows in done))
        if not done:  # a retry: its first results may still be on their way to the file
            await self._commit(None, Result(Code.EXISTS, "", self._clock()), ())
        return renewed

    async def record(self, usage: UsageRow) -> Result:
        """Writes a usage row without money (contract billing); acknowledged once durable. The row's request
        id is a :class:`~orch.ledger.Record` op's id: a retry of it (EXISTS) writes nothing again and is
        answered once the first is durable."""
        self.check_usable()
        op = Record(usage.request_id, usage.tenant_id)
        result = self._ledger.apply(op)
        if result.code is Code.OK:
            return await self._commit(op, result, (usage,))
        return await self._commit(None, result, ())

    def _commit(self, op: Op | None, result: Result, usage: Usage) -> asyncio.Future[Result]:
        """Queues what ``op`` changed for the next group commit; the future is its result, once durable."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((op, result, usage, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let calls already queued on the loop join this batch
            items, self._pending = self._pending, []
            batch = Batch(ops=[(op, r) for op, r, _, _ in items if op is not None and r.code is Code.OK])
            for _, r, usage, _ in items:
                if r.code is Code.OK and usage:
                    if isinstance(usage, pa.RecordBatch):
                        batch.usage_batches.append(usage)  # a lease's rows, made Arrow by its gateway
                    else:
                        batch.usage.extend(usage)
            started = time.perf_counter()
            try:
                self._store.commit(batch)
            except Exception as exc:
                log.error("ledger commit failed (%s); rebuilding from the file", type(exc).__name__)
                _fail(items, "ledger commit failed; retry with the same op id")
                try:
                    rebuilt, _ = self._load_ledger()
                except Exception as replay_exc:
                    self._break(f"ledger commit failed, then its replay ({type(replay_exc).__name__}: {replay_exc})")
                    return
                self._ledger = rebuilt
                continue
            self._commit_seconds.observe(time.perf_counter() - started)
            self._since_snapshot += len(batch.ops)
            self._snapshot_if_due()  # before any await: the ledger holds exactly what the file does
            for row in batch.usage:
                self._usage_metrics.add(row)
            if batch.usage_batches:
                self._usage_metrics.add_batch(pa.Table.from_batches(batch.usage_batches))
            for _, result, _, future in items:
                if not future.done():
                    future.set_result(result)

    def _break(self, why: str) -> None:
        """Refuses everything from now on, fails every waiting caller, and asks for a restart."""
        log.critical("ledger %s is broken: %s; refusing every call until a restart", self._db_path, why)
        self._broken = why
        items, self._pending = self._pending, []
        _fail(items, why)
        if self._on_broken is not None:
            self._on_broken()

    async def expire_holds(self) -> Result | None:
        """Releases timed-out holds when one is due; run periodically."""
        due = self._ledger.next_hold_expiry()
        if due is None or due > self._clock():
            return None
        return await self.apply(ExpireHolds(f"expire-{uuid.uuid4().hex}"))

    # ---- tenants and keys ----

    async def create_tenant(self, name: str, op_id: str | None = None) -> Result:
        """A new tenant. With ``op_id`` the tenant id derives from it, so a retry returns the same tenant."""
        op_id = op_id or f"tenant-{uuid.uuid4().hex}"
        return await self.apply(CreateTenant(op_id, tenant_id_of(op_id), name))

    def tenant_list(self) -> list[dict[str, Any]]:
        out = []
        for tenant_id in self._ledger.tenant_ids():
            a = self._ledger.account(tenant_id)
            out.append({"tenant_id": tenant_id, "name": a.name, "balance_micro_credits": a.balance})
        return out

    def create_key(
        self, tenant_id: str, tap: str = "public", priority: str | None = None, rpm: int | None = None,
        tpm: int | None = None, pepper: bytes | None = None,
    ) -> tuple[str, str] | None:  # fmt: skip
        """A new key for the tenant, with its own priority class and rate limits (None: none): (key_id,
        raw key), or None for an unknown tenant. The raw key is returned once and never stored. ``pepper``:
        the stack's (shard 0's, which gateways check keys with); a shard on another node (``ledger_nodes``)
        may have another one in its own data dir. None: this shard's own."""
        if not self._ledger.has_tenant(tenant_id):
            return None
        key_id, raw = generate_key()
        _, secret = parse_key(raw)
        policy = Policy(priority=priority, key_rpm=rpm, key_tpm=tpm)
        stored = hash_secret(secret, pepper if pepper is not None else self.key_pepper())
        self._store.add_key(ApiKeyRecord(key_id, tenant_id, tap, stored, self._clock(), None, policy))
        return key_id, raw

    def patch_tenant(self, tenant_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Sets some of the tenant's ``priority``, ``weight``, ``rpm``, ``tpm`` (None clears one); its
        whole policy after, or None for an unknown tenant. Gateways see it within their key cache's ttl."""
        if not self._ledger.has_tenant(tenant_id):
            return None
        return self._store.set_tenant_policy(tenant_id, changes, self._clock())

    # ---- rate limits: the windows of this shard's tenants and their keys (orch/ratelimit.py) ----

    def rate_take(self, limits: tuple[Limit, ...], tokens: int, request_id: str) -> Decision:
        return self._rates.take(limits, tokens, request_id)

    def rate_adjust(self, request_id: str, tokens: int) -> None:
        self._rates.adjust(request_id, tokens)

    def revoke_key(self, key_id: str) -> bool:
        return self._store.revoke_key(key_id, self._clock())

    def revoke_tap_keys(self, tap: str) -> int:
        """Revokes every live key issued for ``tap`` (before a deleted tap's name can be reused); the count."""
        return self._store.revoke_tap_keys(tap, self._clock())

    def admin_key(self) -> str:
        """The stack's one admin key, as this shard's node has it (``$LLAMA_ORCH_ADMIN_KEY``, else the data
        dir's ``admin_key`` file): gateway replicas on any node ask shard 0 for it."""
        return load_or_create_admin_key(self._db_path.parent)

    def key_pepper(self) -> bytes:
        """The stack's key pepper (``orch.keys.load_or_create_pepper``, kept outside the database), which
        gateway replicas on any node ask shard 0 for, as they do the admin key."""
        if self._pepper is None:
            self._pepper = load_or_create_pepper(self._db_path.parent)
        return self._pepper

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        return self._store.get_key(key_id)

    def has_tenant(self, tenant_id: str) -> bool:
        return self._ledger.has_tenant(tenant_id)

    def tenants(self) -> list[str]:
        return self._ledger.tenant_ids()

    # ---- reads ----

    def account(self, tenant_id: str) -> dict[str, Any] | None:
        """Balance, open holds and grants of the tenant; None for an unknown tenant."""
        if not self._ledger.has_tenant(tenant_id):
            return None
        account = self._ledger.account(tenant_id)
        return {
            "object": "account",
            "tenant_id": tenant_id,
            "name": account.name,
            "balance_micro_credits": account.balance,
            "held_micro_credits": account.held,
            "spent_micro_credits": account.spent,
            "policy": self._store.tenant_policy(tenant_id),  # what PATCH /admin/tenants/{id} set
            "grants": [
                {
                    "grant_id": g.grant_id,
                    "micro_credits": g.micro_credits,
                    "remaining_micro_credits": g.remaining,
                    "granted_at": g.granted_at.isoformat(),
                    "expires_at": g.expires_at.isoformat(),
                    "expired": g.expired,
                }
                for g in account.grants
            ],
            "open_holds": [
                {"hold_id": h.hold_id, "micro_credits": h.micro_credits, "expires_at": h.expires_at.isoformat()}
                for h in account.holds
            ],
        }

    async def usage(self, tenant_id: str | None, since: datetime | None, until: datetime | None,
                    group_by: GroupBy | None, limit: int = USAGE_LIMIT) -> UsageReport:  # fmt: skip
        """The usage report (``tenant_id`` None: every tenant of this shard); ungrouped, the latest
        ``limit`` requests."""
        report: UsageReport = await self._read(
            self._store.usage, tenant_id, since=since, until=until, group_by=group_by, limit=limit
        )
        return report

    def list_keys(self, tenant_id: str) -> list[dict[str, Any]]:
        """The tenant's keys, revoked ones too, oldest first: ids, taps, dates and limits, never a secret."""
        return [
            {
                "object": "api_key",
                "key_id": k.key_id,
                "tap": k.tap,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                "priority": k.policy.priority,
                "rpm": k.policy.key_rpm,
                "tpm": k.policy.key_tpm,
            }  # fmt: skip
            for k in self._store.list_keys(tenant_id)
        ]

    async def usage_table(self, tenant_id: str | None, since: datetime | None, until: datetime | None) -> pa.Table:
        """Every usage row in ``[since, until)`` as Arrow (``orch.store.Store.usage_table``), for the export."""
        table: pa.Table = await self._read(self._store.usage_table, tenant_id, since=since, until=until)
        return table

    async def _read(self, query: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store read in a worker thread on a DuckDB cursor of its own: a scan of a large usage table
        never holds up the loop that applies and commits holds and settles."""
        async with self._usage_slots:
            cursor = self._store.cursor()
            try:
                return await asyncio.to_thread(query, *args, **kwargs, con=cursor)
            finally:
                cursor.close()

    def metrics(self, shard: int) -> tuple[UsageMetrics, LedgerGauges]:
        """This shard's part of ``/admin/metrics``: the counters of its committed usage rows, its holds."""
        holds, leases, held = self._ledger.open_holds()
        return self._usage_metrics, LedgerGauges(shard, holds, leases, held, self._commit_seconds)

    def audit(self) -> dict[str, int]:
        self._ledger.check_invariants()
        a = self._store.audit()
        balance = sum(self._ledger.account(t).balance for t in self._ledger.tenant_ids())
        held = sum(self._ledger.account(t).held for t in self._ledger.tenant_ids())
        return {"granted": a.granted, "debited": a.debited, "usage_cost": a.usage_cost,
                "usage_rows": a.usage_rows, "balance": balance, "held": held}  # fmt: skip

    def check_invariants(self) -> dict[str, int]:
        """DESIGN.md's money invariants over this shard's file (:mod:`orch.invariants`; raises AssertionError),
        and its figures. Replays the whole log on the loop: for tests and operators."""
        return dataclasses.asdict(check_invariants(self._store, self._clock()))

    def close(self) -> None:
        self._store.close()


def _fail(items: list[tuple[Op | None, Result, Usage, asyncio.Future[Result]]], why: str) -> None:
    for *_, future in items:
        if not future.done():
            future.set_exception(LedgerUnavailable(why))


def _running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class TenantLedgerActor:
    """Ray shell over :class:`LedgerService`: lifecycle and a hold-expiry tick; calls forward. A broken
    service exits the process (after its callers got their answers) so that Ray restarts the actor."""

    EXIT_DELAY_S = 0.5  # lets the replies of the failed calls leave the process first

    def __init__(self, db_path: str, snapshot_every: int | None = None) -> None:
        self.service = LedgerService(
            Path(db_path), on_broken=self._exit_for_restart, snapshot_every=snapshot_every, snapshot_aside=True
        )
        self._ticker: asyncio.Task[None] | None = None

    def _exit_for_restart(self) -> None:
        # os._exit, not ray.actor.exit_actor: an intended exit is never restarted; a crash is (max_restarts=-1).
        asyncio.get_running_loop().call_later(self.EXIT_DELAY_S, os._exit, 1)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.service.expire_holds()
            except Exception as exc:  # the next tick retries
                log.warning("expire_holds failed: %s", exc)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.service.check_usable()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick())
        result = getattr(self.service, method)(*args, **kwargs)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def ready(self) -> bool:
        return True

    def placement(self) -> dict[str, Any]:
        """Where Ray runs this actor: its node id and the resources it was given (for ``status`` and tests)."""
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "resources": context.get_assigned_resources()}


HEAD_NODE_RESOURCE = "node:__internal_head__"  # every Ray head node has it; the data dir is the head's


def ledger_actor(
    data_dir: Path, shard: int = 0, node_resource: str | None = None, *, snapshot_every: int | None = None
) -> Any:
    """The shard's actor handle, creating it (detached, named, restarting) if it does not exist. Pinned
    to the node that holds its DuckDB file, since a restart elsewhere would open an empty ledger: the head
    (where ``llama-orch up`` runs), or with ``node_resource`` (the taps' ``ledger_nodes``) the node that
    declares that custom resource (``ray start --resources``). Only the creation's options count: a
    restart keeps them, and other callers get the existing actor."""
    import ray

    node = {node_resource: 0.001} if node_resource else {HEAD_NODE_RESOURCE: 0.001}

    actor_cls = ray.remote(TenantLedgerActor).options(  # type: ignore[attr-defined]
        name=shard_name(shard),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=1000,
        num_cpus=0,
        resources=node,
        # Not the caller's placement group: a model replica in a GPU group (the front inside it) captures
        # its children into the group, where the head-node resource is not.
        scheduling_strategy="DEFAULT",
    )
    return actor_cls.remote(str(data_dir / f"ledger-{shard}.duckdb"), snapshot_every)


class LedgerUnavailable(RuntimeError):
    """The ledger did not answer within the retry deadline, or could not commit (retry the same op id)."""

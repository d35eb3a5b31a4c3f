"""The DuckDB store: the ledger's op log, API keys and usage rows. The only module that writes SQL.

Event-sourced: every OK (op, result) the ledger applied is appended to ``ops`` in apply order, and
``load_ops()`` yields them back for ``Ledger.replay``. ``tenants``, ``grants``, ``holds`` and
``debits`` are views over ``ops``. ``commit(batch)`` writes a batch of ops and usage rows in one
transaction (group commit) from Arrow tables; acknowledge the batch's callers only after it returns.
DuckDB allows one writing process per file, and a connection is not for concurrent threads: the
ledger actor owns the Store.

>>> import tempfile, os
>>> from orch.ledger import CreateTenant, Ledger
>>> path = os.path.join(tempfile.mkdtemp(), "ledger.duckdb")
>>> ledger, op = Ledger(), CreateTenant("op-1", "acme", "Acme")
>>> with Store(path) as store:
...     store.commit(Batch(ops=[(op, ledger.apply(op))]))
>>> with Store(path) as store:
...     Ledger().replay(store.load_ops())
1
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import pyarrow as pa

from orch.ledger import (
    Code,
    CreateTenant,
    ExpireHolds,
    GrantCredits,
    Hold,
    Op,
    Record,
    Release,
    Result,
    Settle,
)
from orch.metrics import HISTOGRAMS, Histogram, UsageMetrics
from orch.protocol import GroupBy
from orch.ratelimit import Policy
from orch.store_schema import MIGRATIONS, OPS_ARROW, SCHEMA_VERSION, TABLES, USAGE_EXPORT_ARROW, USAGE_LOG_ARROW, VIEWS
from orch.usage_log import UsageRow, to_arrow  # UsageRow: plugins import it from here


class ApiKeyRecord(NamedTuple):
    key_id: str
    tenant_id: str
    tap: str
    secret_hash: str
    created_at: datetime
    revoked_at: datetime | None = None
    policy: Policy = Policy()  # the key's priority and limits, and its tenant's policy when read


TENANT_POLICY_FIELDS = ("priority", "weight", "rpm", "tpm")


@dataclass
class Batch:
    """What one transaction writes: OK (op, result) pairs in apply order, and usage rows: as rows, or as
    batches already made by :func:`orch.usage_log.to_arrow` (a gateway's lease batch). Add a request's usage
    row in the batch of its Settle, and only when that Settle was OK (not EXISTS): a retried settle then
    never writes a second row, and Σ usage cost stays Σ debits."""

    ops: list[tuple[Op, Result]] = field(default_factory=list)
    usage: list[UsageRow] = field(default_factory=list)
    usage_batches: list[pa.RecordBatch] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ops) + len(self.usage) + sum(b.num_rows for b in self.usage_batches)


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int


@dataclass(frozen=True, slots=True)
class UsageGroup:
    key: str  # ISO day (group_by='day'), model name ('model'), end user ('user'; '' for none), tenant id
    # ('tenant'), or ISO day, a space and the model name ('day_model')
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int


@dataclass(frozen=True, slots=True)
class UsageReport:
    totals: UsageTotals
    group_by: GroupBy | None
    rows: tuple[UsageGroup, ...] | tuple[UsageRow, ...]  # groups, or requests when group_by is None


SUMS = ("requests", "prompt_tokens", "completion_tokens", "cost_micro")  # what a report adds up


def merge_reports(reports: Sequence[UsageReport], limit: int = 1000) -> UsageReport:
    """One report from the reports of several ledger shards over the same filter: totals and groups add
    up; rows are the latest ``limit`` of all, in time order.

    >>> a = UsageReport(UsageTotals(1, 10, 5, 70), "model", (UsageGroup("m", 1, 10, 5, 70),))
    >>> groups = (UsageGroup("m", 1, 5, 1, 20), UsageGroup("n", 1, 15, 5, 70))
    >>> b = UsageReport(UsageTotals(2, 20, 6, 90), "model", groups)
    >>> merged = merge_reports([a, b])
    >>> merged.totals, [(g.key, g.requests, g.cost_micro) for g in merged.rows]
    (UsageTotals(requests=3, prompt_tokens=30, completion_tokens=11, cost_micro=160), [('m', 2, 90), ('n', 1, 70)])
    """
    totals = UsageTotals(*(sum(getattr(r.totals, f) for r in reports) for f in SUMS))
    group_by = reports[0].group_by if reports else None
    if group_by is None:
        rows = sorted((row for r in reports for row in r.rows), key=lambda row: row.ts)[-limit:]  # type: ignore[union-attr]
        return UsageReport(totals, None, tuple(rows))  # type: ignore[arg-type]
    groups: dict[str, list[int]] = {}
    for r in reports:
        for g in r.rows:
            sums = groups.setdefault(g.key, [0, 0, 0, 0])  # type: ignore[union-attr]
            for i, f in enumerate(SUMS):
                sums[i] += getattr(g, f)
    return UsageReport(totals, group_by, tuple(UsageGroup(k, *v) for k, v in sorted(groups.items())))


GROUP_KEYS = {
    "day": "strftime(ts, '%Y-%m-%d')", "model": "model", "user": "coalesce(end_user, '')", "tenant": "tenant_id",
    "day_model": "strftime(ts, '%Y-%m-%d') || ' ' || model",  # the dashboard's chart: '2026-11-28 <model>'
}  # fmt: skip


class Audit(NamedTuple):
    """Sums for the money invariants: ``debited == usage_cost`` when every settle has its usage row."""

    ops: int
    granted: int
    debited: int
    usage_rows: int
    usage_cost: int


# (op, result) → ops row without seq; one encoder per op type, the decoder below is its inverse.
# A settle's micro_credits column is what it debited (views and audit sum it); a late one keeps what it
# asked in ``asked``.
def _encode(op: Op, r: Result) -> tuple[Any, ...]:
    if type(op) is Hold:
        return (
            op.op_id,
            "hold",
            r.at,
            op.tenant_id,
            None,
            None,
            op.micro_credits,
            op.timeout_s,
            None,
            r.expires_at,
            None,
            None,
        )
    if type(op) is Settle:
        asked = op.micro_credits if r.late else None
        return (op.op_id, "settle", r.at, r.tenant_id, op.hold_id, None, r.micro_credits, None, r.released, None,
                None, asked)  # fmt: skip
    if type(op) is Release:
        return (op.op_id, "release", r.at, r.tenant_id, op.hold_id, None, None, None, r.released, None, None, None)
    if type(op) is ExpireHolds:
        return (op.op_id, "expire_holds", r.at, None, None, None, None, None, r.released, None, list(r.hold_ids),
                None)  # fmt: skip
    if type(op) is GrantCredits:
        return (op.op_id, "grant", r.at, op.tenant_id, None, None, op.micro_credits, None, None, r.expires_at, None,
                None)  # fmt: skip
    if type(op) is CreateTenant:
        return (op.op_id, "create_tenant", r.at, op.tenant_id, None, op.name, None, None, None, None, None, None)
    if type(op) is Record:
        return (op.op_id, "record", r.at, op.tenant_id, None, None, None, None, None, None, None, None)
    raise TypeError(f"not a ledger op: {op!r}")


def _decode(row: tuple[Any, ...]) -> tuple[Op, Result]:
    op_id, kind, at, tenant_id, hold_id, name, micro, timeout_s, released, expires_at, hold_ids, asked = row
    at = at.replace(tzinfo=UTC)
    if expires_at is not None:
        expires_at = expires_at.replace(tzinfo=UTC)
    op: Op
    if kind == "hold":
        op = Hold(op_id, tenant_id, micro, timeout_s)
        return op, Result(Code.OK, op_id, at, tenant_id, micro, expires_at=expires_at)
    if kind == "settle":
        op = Settle(op_id, hold_id, micro if asked is None else asked)
        return op, Result(Code.OK, op_id, at, tenant_id, micro, released, late=asked is not None)
    if kind == "release":
        return Release(op_id, hold_id), Result(Code.OK, op_id, at, tenant_id, released=released)
    if kind == "expire_holds":
        return ExpireHolds(op_id), Result(Code.OK, op_id, at, released=released, hold_ids=tuple(hold_ids or ()))
    if kind == "grant":
        op = GrantCredits(op_id, tenant_id, micro)
        return op, Result(Code.OK, op_id, at, tenant_id, micro, expires_at=expires_at)
    if kind == "create_tenant":
        return CreateTenant(op_id, tenant_id, name), Result(Code.OK, op_id, at, tenant_id)
    if kind == "record":
        return Record(op_id, tenant_id), Result(Code.OK, op_id, at, tenant_id)
    raise ValueError(f"unknown op kind in store: {kind!r}")


def _naive_utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return at.astimezone(UTC).replace(tzinfo=None)


def _aware(at: datetime | None) -> datetime | None:
    return None if at is None else at.replace(tzinfo=UTC)


def _table(schema: pa.Schema, columns: Sequence[Sequence[Any]]) -> pa.Table:
    arrays = [pa.array(col, type=f.type) for f, col in zip(schema, columns, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


class Store:
    """One DuckDB file. ``read_only=True`` for readers while no writer holds it. ``threads``: DuckDB
    worker threads; 1 by default because each statement on small appends costs about twice the CPU
    with more (measured: ~1 ms vs ~2 ms per insert), and the ledger's writes are all small appends."""

    def __init__(self, path: str | Path, *, read_only: bool = False, threads: int = 1) -> None:
        self.path = Path(path)
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = duckdb.connect(str(self.path), read_only=read_only, config={"threads": threads})
        if not read_only:
            self._con.execute(TABLES)
            if not self._one("SELECT count(*) FROM schema_version"):
                self._con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
            while (found := self._one("SELECT max(version) FROM schema_version")) in MIGRATIONS:
                self._con.execute(f"BEGIN TRANSACTION; {MIGRATIONS[found]} COMMIT;")
            self._con.execute(VIEWS)
        version = self._one("SELECT max(version) FROM schema_version")
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version}, this code reads {SCHEMA_VERSION}")
        self._next_seq: int = self._one("SELECT coalesce(max(seq) + 1, 0) FROM ops")

    def close(self) -> None:
        self._con.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own to this file, for reads from another thread (pass it as ``con=``):
        DuckDB runs it on a snapshot while this Store's connection goes on committing. Close it after."""
        return self._con.cursor()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _one_row(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
        rows = self._con.execute(sql, params).fetchall()  # fetchall: DuckDB 2 refuses new work after fetchone
        assert len(rows) == 1, sql
        return tuple(rows[0])

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._one_row(sql, params)[0]

    # ---- the ledger's log ----

    def commit(self, batch: Batch) -> None:
        """Writes the batch in ONE transaction: all of it is durable when this returns, none if it raises
        or the process dies first. Only OK results belong in a batch: nothing else changed state.
        If it raises, the Ledger in memory is ahead of the file: rebuild it with ``load_ops()``."""
        if not len(batch):
            return
        ops_table = usage_table = None
        if batch.ops:
            rows = []
            for op, result in batch.ops:
                if result.code is not Code.OK or result.op_id != op.op_id:
                    raise ValueError(f"only OK results changed state and belong in a batch: {result!r}")
                rows.append(_encode(op, result))
            seqs = list(range(self._next_seq, self._next_seq + len(rows)))  # pa.array(range) is 100x slower
            ops_table = _table(OPS_ARROW, [seqs, *zip(*rows, strict=True)])
        usage = [to_arrow(batch.usage)] if batch.usage else []
        if usage or batch.usage_batches:
            usage_table = pa.Table.from_batches(usage + batch.usage_batches, schema=USAGE_LOG_ARROW)
        with self._transaction() as con:
            if ops_table is not None:
                con.from_arrow(ops_table).insert_into("ops")
            if usage_table is not None:
                con.from_arrow(usage_table).insert_into("usage_log")
        self._next_seq += len(batch.ops)

    @contextlib.contextmanager
    def _transaction(self, con: duckdb.DuckDBPyConnection | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """The store's connection (or ``con``, a :meth:`cursor`) inside one transaction: committed at the end,
        rolled back if it raises."""
        con = self._con if con is None else con
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def load_ops(self, rows_per_batch: int = 65_536, *, from_seq: int = 0) -> Iterator[tuple[Op, Result]]:
        """Every committed (op, result) in apply order (from ``from_seq`` on), for ``Ledger.replay``. Read it
        to the end before the next call on this Store: it streams from the connection."""
        reader = self._con.sql(
            "SELECT op_id, kind::VARCHAR, applied_at, tenant_id, hold_id, name, micro_credits, timeout_s,"
            " released, expires_at, hold_ids, asked FROM ops WHERE seq >= ? ORDER BY seq",
            params=[from_seq],
        ).to_arrow_reader(rows_per_batch)
        for record_batch in reader:  # type: ignore[union-attr]
            for row in zip(*record_batch.to_pydict().values(), strict=True):
                yield _decode(row)

    @property
    def next_seq(self) -> int:
        """The seq the next committed op gets: every op below it is in the file."""
        return self._next_seq

    def save_snapshot(
        self, seq: int, code: str, state: bytes, at: datetime, con: duckdb.DuckDBPyConnection | None = None
    ) -> None:
        """Keeps ``state`` as the latest snapshot (of the ops below ``seq``), in one transaction; on ``con`` (a
        :meth:`cursor`, from another thread) while this store's connection goes on committing."""
        with self._transaction(con) as con:
            con.execute("DELETE FROM snapshots")
            con.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?)", [seq, _naive_utc(at), code, state])

    def load_snapshot(self) -> tuple[int, str, bytes] | None:
        """The latest snapshot: (seq, code, state), or None."""
        rows = self._con.execute("SELECT seq, code, state FROM snapshots ORDER BY seq DESC LIMIT 1").fetchall()
        return (int(rows[0][0]), str(rows[0][1]), bytes(rows[0][2])) if rows else None

    # ---- API keys ----

    def add_key(self, key: ApiKeyRecord) -> None:
        """Stores the key with its own priority and limits (``key.policy``'s key fields)."""
        p = key.policy
        self._con.execute(
            "INSERT INTO api_keys (key_id, tenant_id, tap, secret_hash, created_at, revoked_at, priority, rpm, tpm)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [*key[:4], _naive_utc(key.created_at), key.revoked_at and _naive_utc(key.revoked_at),
             p.priority, p.key_rpm, p.key_tpm],
        )  # fmt: skip

    def set_tenant_policy(self, tenant_id: str, changes: dict[str, Any], at: datetime) -> dict[str, Any]:
        """Sets some of a tenant's ``priority``, ``weight``, ``rpm``, ``tpm`` (None clears one); the
        tenant's whole policy after the change."""
        policy = self.tenant_policy(tenant_id) | changes
        self._con.execute(
            "INSERT OR REPLACE INTO tenant_policies VALUES (?, ?, ?, ?, ?, ?)",
            [tenant_id, *(policy[f] for f in TENANT_POLICY_FIELDS), _naive_utc(at)],
        )
        return policy

    def tenant_policy(self, tenant_id: str) -> dict[str, Any]:
        row = self._con.execute(
            "SELECT priority, weight, rpm, tpm FROM tenant_policies WHERE tenant_id = ?", [tenant_id]
        ).fetchone()
        return dict(zip(TENANT_POLICY_FIELDS, row or (None,) * len(TENANT_POLICY_FIELDS), strict=True))

    def revoke_key(self, key_id: str, at: datetime) -> bool:
        """Marks the key revoked at ``at``; False if no such key or already revoked (first time kept)."""
        found = self._con.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL RETURNING key_id",
            [_naive_utc(at), key_id],
        ).fetchall()
        return bool(found)

    def revoke_tap_keys(self, tap: str, at: datetime) -> int:
        """Revokes every live key issued for ``tap`` at ``at`` (a deleted tap's name may be reused);
        returns how many."""
        found = self._con.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE tap = ? AND revoked_at IS NULL RETURNING key_id",
            [_naive_utc(at), tap],
        ).fetchall()
        return len(found)

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        rows = self._keys("WHERE k.key_id = ?", [key_id])
        return rows[0] if rows else None

    def list_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        return self._keys("WHERE k.tenant_id = ? ORDER BY k.created_at, k.key_id", [tenant_id])

    def _keys(self, where: str, params: list[Any]) -> list[ApiKeyRecord]:
        """Keys with their policy: the key's own priority and limits, its tenant's weight, limits and
        priority (the key's priority first)."""
        rows = self._con.execute(
            "SELECT k.key_id, k.tenant_id, k.tap, k.secret_hash, k.created_at, k.revoked_at,"
            " coalesce(k.priority, t.priority), t.weight, k.rpm, k.tpm, t.rpm, t.tpm"
            f" FROM api_keys k LEFT JOIN tenant_policies t ON t.tenant_id = k.tenant_id {where}",
            params,
        ).fetchall()
        return [
            ApiKeyRecord(r[0], r[1], r[2], r[3], r[4].replace(tzinfo=UTC), _aware(r[5]), Policy(*r[6:])) for r in rows
        ]

    # ---- usage ----

    def usage(
        self,
        tenant_id: str | None,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: GroupBy | None = None,
        limit: int = 1000,
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> UsageReport:
        """Usage in ``[since, until)`` for one tenant (None: all): totals, and rows per day (UTC),
        per model, per end user, or the latest ``limit`` requests (in time order) when ``group_by`` is None.
        ``con``: a :meth:`cursor` to run on, from another thread than the committing one."""
        con = con or self._con
        cond, params = _usage_filter(tenant_id, since, until)
        sums = "count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)"
        sums += ", coalesce(sum(cost_micro), 0)"
        totals = UsageTotals(
            *(int(v) for v in con.execute(f"SELECT {sums} FROM usage WHERE {cond}", params).fetchall()[0])
        )
        rows: tuple[UsageGroup, ...] | tuple[UsageRow, ...]
        if group_by is None:
            columns = ", ".join(f"{c}::VARCHAR" if c == "status" else c for c in UsageRow._fields)
            found = con.execute(
                f"SELECT {columns} FROM usage WHERE {cond} ORDER BY ts DESC LIMIT ?", [*params, limit]
            ).fetchall()
            rows = tuple(UsageRow(r[0], r[1].replace(tzinfo=UTC), *r[2:]) for r in reversed(found))
        elif group_by in GROUP_KEYS:
            key = GROUP_KEYS[group_by]
            found = con.execute(
                f"SELECT {key} AS k, {sums} FROM usage WHERE {cond} GROUP BY k ORDER BY k", params
            ).fetchall()
            rows = tuple(UsageGroup(str(r[0]), *(int(v) for v in r[1:])) for r in found)
        else:
            raise ValueError(f"group_by must be one of {sorted(GROUP_KEYS)} or None, not {group_by!r}")
        return UsageReport(totals, group_by, rows)

    def usage_table(
        self,
        tenant_id: str | None,
        since: datetime | None = None,
        until: datetime | None = None,
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> pa.Table:
        """Every usage row in ``[since, until)`` of one tenant (None: all), in time order, as an Arrow table
        of :data:`~orch.store_schema.USAGE_EXPORT_ARROW` (the export's documented schema)."""
        con = con or self._con
        cond, params = _usage_filter(tenant_id, since, until)
        columns = ", ".join(f"{c}::VARCHAR AS {c}" if c == "status" else c for c in UsageRow._fields)
        sql = f"SELECT {columns} FROM usage WHERE {cond} ORDER BY ts, request_id"
        table: pa.Table = con.sql(sql, params=params).to_arrow_table()
        return table.cast(USAGE_EXPORT_ARROW)

    def usage_metrics(self, con: duckdb.DuckDBPyConnection | None = None) -> UsageMetrics:
        """The counters and histograms of every usage row in the file (:mod:`orch.metrics`), by SQL:
        what :meth:`UsageMetrics.add` would count row by row, in one scan per histogram."""
        con = con or self._con
        metrics = UsageMetrics()
        for tap, model, status, n, prompt, completion in con.execute(
            "SELECT tap, model, status::VARCHAR, count(*), sum(prompt_tokens), sum(completion_tokens)"
            " FROM usage GROUP BY ALL"
        ).fetchall():
            metrics.requests[(tap, model, status)] += int(n)
            metrics.prompt_tokens[(tap, model)] += int(prompt)
            metrics.completion_tokens[(tap, model)] += int(completion)
        for tenant, cost in con.execute("SELECT tenant_id, sum(cost_micro) FROM usage GROUP BY ALL").fetchall():
            metrics.micro_credits[tenant] += int(cost)
        for name, (bounds, value, which) in HISTOGRAMS.items():
            bucket = " ".join(f"WHEN v <= {b!r}::DOUBLE THEN {i}" for i, b in enumerate(bounds))
            found = con.execute(
                f"SELECT tap, model, CASE {bucket} ELSE {len(bounds)} END AS bucket, count(*), sum(v)"
                f" FROM (SELECT tap, model, {value} AS v FROM usage WHERE {which}) GROUP BY ALL"
            ).fetchall()
            for tap, model, index, n, total in found:
                histogram = metrics.histograms[name].setdefault((tap, model), Histogram(bounds))
                histogram.counts[index] += int(n)
                histogram.sum += float(total)
        return metrics

    def audit(self) -> Audit:
        """Whole-file sums (O(file)): for tests and operators, not for the request path."""
        row = self._one_row(
            "SELECT (SELECT count(*) FROM ops),"
            " (SELECT coalesce(sum(micro_credits), 0) FROM ops WHERE kind = 'grant'),"
            " (SELECT coalesce(sum(micro_credits), 0) FROM ops WHERE kind = 'settle'),"
            " (SELECT count(*) FROM usage), (SELECT coalesce(sum(cost_micro), 0) FROM usage)"
        )
        return Audit(*(int(v) for v in row))


def copy_database(con: duckdb.DuckDBPyConnection, dest: Path) -> tuple[int, int]:
    """Copies the database ``con`` (a cursor of the ledger's store) is on into the new file ``dest`` in ONE
    transaction: DuckDB reads it on a snapshot, so the copy holds every transaction committed before it began
    and none after, however long it runs while other connections commit. Returns (the copy's last op seq, -1
    for none; its op count)."""
    alias = f"backup_{uuid.uuid4().hex}"  # one per copy: two backups at once never share a name
    (source,) = con.execute("SELECT current_database()").fetchall()[0]
    con.execute(f"ATTACH '{str(dest).replace(chr(39), chr(39) * 2)}' AS {alias}")
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f'COPY FROM DATABASE "{source.replace(chr(34), chr(34) * 2)}" TO {alias}')
            ops, last = con.execute(f"SELECT count(*), coalesce(max(seq), -1) FROM {alias}.ops").fetchall()[0]
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute(f"CHECKPOINT {alias}")  # all of it in the one file: no WAL beside it
    finally:
        con.execute(f"DETACH {alias}")
    return int(last), int(ops)


def _literal(text: str) -> str:
    return text.replace("'", "''")


def _usage_filter(tenant_id: str | None, since: datetime | None, until: datetime | None) -> tuple[str, list[Any]]:
    """The WHERE clause and its parameters of a usage query: one tenant (None: all), ``[since, until)``."""
    where, params = ["TRUE"], []
    for sql, value in (("tenant_id = ?", tenant_id), ("ts >= ?", since), ("ts < ?", until)):
        if value is not None:
            where.append(sql)
            params.append(_naive_utc(value) if isinstance(value, datetime) else value)
    return " AND ".join(where), params

"""The DuckDB store: group commit, replay to the same ledger, crash atomicity, keys, usage queries."""

from __future__ import annotations

import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from orch.keys import generate_key, hash_secret, parse_key
from orch.ledger import (
    Code,
    CreateTenant,
    ExpireHolds,
    GrantCredits,
    Hold,
    Ledger,
    Op,
    Record,
    Release,
    Result,
    Settle,
)
from orch.ratelimit import Policy
from orch.store import ApiKeyRecord, Batch, Store, UsageRow
from orch.usage_log import to_arrow

T0 = datetime(2025, 6, 30, 23, 59, 58, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def usage_row(request_id: str, cost: int, **kw: object) -> UsageRow:
    fields: dict[str, object] = dict(
        request_id=request_id, ts=T0, tenant_id="acme", key_id="k1", tap="public", model="smollm2",
        prompt_tokens=10, completion_tokens=5, cost_micro=cost, ttft_ms=40, latency_ms=300, status="ok",
        finish_reason="stop",
    )  # fmt: skip
    fields.update(kw)
    return UsageRow(**fields)  # type: ignore[arg-type]


def apply_into(ledger: Ledger, batch: Batch, op: Op, now: datetime | None = None) -> Result:
    result = ledger.apply(op, now)
    if result.code is Code.OK:
        batch.ops.append((op, result))
    return result


def seeded_ledger(store: Store, clock: FakeClock) -> Ledger:
    ledger, batch = Ledger(clock=clock), Batch()
    apply_into(ledger, batch, CreateTenant("c-acme", "acme", "Acme"))
    apply_into(ledger, batch, GrantCredits("g-acme", "acme", 10_000))
    store.commit(batch)
    return ledger


def test_commit_then_reload_replays_to_identical_ledger_state(tmp_path: Path) -> None:
    rng, clock = random.Random(11), FakeClock()
    ledger = Ledger(clock=clock)
    logged: list[tuple[Op, Result]] = []
    with Store(tmp_path / "ledger.duckdb") as store:
        batch = Batch()
        for t in ("acme", "globex"):
            apply_into(ledger, batch, CreateTenant(f"c-{t}", t, t.title()))
            apply_into(ledger, batch, GrantCredits(f"g-{t}", t, 50_000))
        for i in range(600):
            clock.now += timedelta(seconds=rng.random() * 20)
            tenant = rng.choice(["acme", "globex"])
            ops: list[Op] = [Hold(f"h{i}", tenant, rng.randrange(0, 2000), 30)]
            ending: list[Op] = [Settle(f"s{i}", f"h{i}", rng.randrange(0, 2000)), Release(f"r{i}", f"h{i}")]
            ops.append(rng.choice(ending))
            if i % 97 == 0:
                ops.append(GrantCredits(f"g{i}", tenant, 1000))
            if i % 31 == 0:
                ops.append(ExpireHolds(f"x{i}"))
            for op in ops:
                if (result := apply_into(ledger, batch, op)).code is Code.OK and isinstance(op, Settle):
                    batch.usage.append(usage_row(op.op_id, result.micro_credits, tenant_id=tenant))
            if len(batch) >= rng.choice([1, 32, 256]):
                logged += batch.ops
                store.commit(batch)
                batch = Batch()
        logged += batch.ops
        store.commit(batch)
        audit = store.audit()
    with Store(tmp_path / "ledger.duckdb") as store:
        rebuilt = Ledger(clock=clock)
        assert rebuilt.replay(store.load_ops()) == len(logged) == audit.ops
    for t in ("acme", "globex"):
        assert rebuilt.account(t) == ledger.account(t)
    assert rebuilt.next_hold_expiry() == ledger.next_hold_expiry()
    rebuilt.check_invariants()
    assert all(rebuilt.apply(op).code is Code.EXISTS for op, _ in logged)  # idempotency survives restart
    assert audit.debited == audit.usage_cost == sum(ledger.account(t).spent for t in ("acme", "globex"))


_KILLED_WRITER = """
import os, signal, sys
from orch.ledger import Hold, Ledger, Settle
from orch.store import Batch, Store, UsageRow

store = Store(sys.argv[1])
ledger = Ledger()
ledger.replay(store.load_ops())
batch = Batch()
for op in (Hold("h-lost", "acme", 500, 60), Settle("s-lost", "h-lost", 400)):
    batch.ops.append((op, ledger.apply(op)))
batch.usage.append(UsageRow("s-lost", ledger.clock(), "acme", "k1", "public", "m", 1, 1, 400, 5, 9, "ok", "stop"))

class DieAt:
    '''Forwards to the real connection; SIGKILLs this process at the named statement.'''
    def __init__(self, con, statement):
        self._con, self._statement = con, statement
    def __getattr__(self, name):
        return getattr(self._con, name)
    def execute(self, sql, *args):
        if sql == self._statement:
            os.kill(os.getpid(), signal.SIGKILL)
        result = self._con.execute(sql, *args)
        if sql == "COMMIT" and self._statement == "after COMMIT":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

store._con = DieAt(store._con, sys.argv[2])
store.commit(batch)
"""


@pytest.mark.parametrize("die_at, survives", [("COMMIT", False), ("after COMMIT", True)])
def test_sigkill_keeps_a_batch_all_or_nothing(tmp_path: Path, die_at: str, survives: bool) -> None:
    path = tmp_path / "ledger.duckdb"
    with Store(path) as store:
        ledger = seeded_ledger(store, FakeClock(datetime.now(UTC)))
    child = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), die_at], capture_output=True)
    assert child.returncode == -9, child.stderr.decode()
    with Store(path) as store:
        rebuilt = Ledger()
        rebuilt.replay(store.load_ops())
        audit = store.audit()
    if survives:
        assert (audit.ops, audit.debited, audit.usage_rows, audit.usage_cost) == (4, 400, 1, 400)
        assert rebuilt.account("acme").spent == 400
    else:  # killed with the batch inserted but not committed: none of it is there
        assert (audit.ops, audit.debited, audit.usage_rows) == (2, 0, 0)
        assert rebuilt.account("acme") == ledger.account("acme")


def test_failed_commit_rolls_back_the_whole_batch_and_the_store_stays_usable(tmp_path: Path) -> None:
    clock = FakeClock()
    with Store(tmp_path / "ledger.duckdb") as store:
        ledger = seeded_ledger(store, clock)
        bad = Batch()
        apply_into(ledger, bad, Hold("h1", "acme", 100, 60))
        bad.usage.append(usage_row("r1", 0, status="exploded"))  # not a usage_status: the insert fails
        with pytest.raises(duckdb.Error):
            store.commit(bad)
        assert store.audit().ops == 2 and store.audit().usage_rows == 0
        good = Batch()
        apply_into(ledger, good, Hold("h2", "acme", 100, 60))
        store.commit(good)
        assert [op.op_id for op, _ in store.load_ops()] == ["c-acme", "g-acme", "h2"]


def test_commit_refuses_naive_usage_timestamps(tmp_path: Path) -> None:
    with Store(tmp_path / "ledger.duckdb") as store:
        with pytest.raises(ValueError):
            store.commit(Batch(usage=[usage_row("r", 1, ts=datetime(2025, 1, 1))]))
        assert store.audit().usage_rows == 0


def test_commit_refuses_results_that_changed_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "ledger.duckdb") as store:
        ledger = seeded_ledger(store, FakeClock())
        op = Hold("h", "acme", 10**9, 60)
        with pytest.raises(ValueError):
            store.commit(Batch(ops=[(op, ledger.apply(op))]))


def test_raw_key_never_reaches_the_db_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.duckdb"
    key_id, raw = generate_key()
    secret = parse_key(raw)[1]
    with Store(path) as store:
        seeded_ledger(store, FakeClock())
        store.add_key(ApiKeyRecord(key_id, "acme", "public", hash_secret(secret), T0))
        store.commit(Batch(usage=[usage_row("r1", 5, key_id=key_id)]))
        assert store.get_key(key_id) is not None
        files = [p for p in tmp_path.iterdir() if p.is_file()]
        assert files and all(secret.encode() not in p.read_bytes() for p in files)  # WAL included
    assert secret.encode() not in path.read_bytes() and raw.encode() not in path.read_bytes()
    # The grep can see strings: the same file does show a plainly stored value.
    with Store(path) as store:
        store.commit(Batch(usage=[usage_row("r2", 5, model="canary-" + "z" * 40)]))
    assert b"canary-" + b"z" * 40 in path.read_bytes()


def test_views_show_tenants_grants_holds_and_debits(tmp_path: Path) -> None:
    clock = FakeClock()
    with Store(tmp_path / "ledger.duckdb") as store:
        ledger, batch = seeded_ledger(store, clock), Batch()
        for op in (Hold("h1", "acme", 100, 10), Hold("h2", "acme", 100, 10), Hold("h3", "acme", 100, 10)):
            apply_into(ledger, batch, op)
        apply_into(ledger, batch, Hold("h4", "acme", 100, 1000))
        apply_into(ledger, batch, Settle("s1", "h1", 60))
        apply_into(ledger, batch, Release("r2", "h2"))
        apply_into(ledger, batch, ExpireHolds("x"), T0 + timedelta(seconds=10))
        store.commit(batch)
        sql = store._con.execute
        assert sql("SELECT tenant_id, name FROM tenants").fetchall() == [("acme", "Acme")]
        assert sql("SELECT grant_id, micro_credits, expires_at FROM grants").fetchall() == [
            ("g-acme", 10_000, datetime(2026, 6, 30, 23, 59, 58))
        ]
        assert sql("SELECT hold_id, state FROM holds ORDER BY hold_id").fetchall() == [
            ("h1", "settled"), ("h2", "released"), ("h3", "expired"), ("h4", "open")
        ]  # fmt: skip
        assert sql("SELECT hold_id, micro_credits FROM debits").fetchall() == [("h1", 60)]


def test_usage_totals_and_groups_by_day_model_user_and_both(tmp_path: Path) -> None:
    rows = [
        usage_row("a", 10, ts=T0, model="m1", end_user="alice", http_request_id="req-a"),
        usage_row("b", 20, ts=T0 + timedelta(seconds=2), model="m2", completion_tokens=7, end_user="bob"),  # next day
        usage_row("c", 30, ts=T0 + timedelta(days=1), model="m1", status="aborted", finish_reason="abort"),
        usage_row("d", 99, tenant_id="globex"),
    ]
    with Store(tmp_path / "ledger.duckdb") as store:
        store.commit(Batch(usage=rows))
        by_day = store.usage("acme", group_by="day")
        assert (by_day.totals.requests, by_day.totals.cost_micro, by_day.totals.completion_tokens) == (3, 60, 17)
        assert [(g.key, g.requests, g.cost_micro) for g in by_day.rows] == [  # type: ignore[union-attr]
            ("2025-06-30", 1, 10), ("2025-07-01", 2, 50)
        ]  # fmt: skip
        by_model = store.usage("acme", group_by="model")
        assert [(g.key, g.cost_micro) for g in by_model.rows] == [("m1", 40), ("m2", 20)]  # type: ignore[union-attr]
        by_user = store.usage("acme", group_by="user")
        assert [(g.key, g.cost_micro) for g in by_user.rows] == [("", 30), ("alice", 10), ("bob", 20)]  # type: ignore[union-attr]
        by_day_model = store.usage("acme", group_by="day_model")  # the dashboard's chart
        assert [(g.key, g.cost_micro) for g in by_day_model.rows] == [  # type: ignore[union-attr]
            ("2025-06-30 m1", 10), ("2025-07-01 m1", 30), ("2025-07-01 m2", 20)
        ]  # fmt: skip
        plain = store.usage("acme")
        assert plain.rows == tuple(rows[:3])  # typed rows back, UTC-aware, in time order
        latest = store.usage("acme", limit=2)
        assert latest.rows == tuple(rows[1:3]) and latest.totals.requests == 3  # the latest 2; totals count all
        assert store.usage(None).totals.cost_micro == 159


def test_usage_window_is_half_open(tmp_path: Path) -> None:
    with Store(tmp_path / "ledger.duckdb") as store:
        store.commit(Batch(usage=[usage_row(str(i), 1, ts=T0 + timedelta(seconds=i)) for i in range(5)]))
        report = store.usage("acme", since=T0 + timedelta(seconds=1), until=T0 + timedelta(seconds=3))
        assert [r.request_id for r in report.rows] == ["1", "2"]  # type: ignore[union-attr]
        assert report.totals.requests == 2
        assert store.usage("nobody").totals.requests == 0
        with pytest.raises(ValueError):
            store.usage("acme", group_by="week")  # type: ignore[arg-type]


def test_keys_are_added_listed_and_revoked_once(tmp_path: Path) -> None:
    with Store(tmp_path / "ledger.duckdb") as store:
        first = ApiKeyRecord("k1", "acme", "public", "h1", T0)
        store.add_key(first)
        store.add_key(ApiKeyRecord("k2", "acme", "public", "h2", T0 + timedelta(seconds=1)))
        assert store.get_key("k1") == first and store.get_key("nope") is None
        assert store.revoke_key("k1", T0 + timedelta(hours=1))
        assert not store.revoke_key("k1", T0 + timedelta(hours=2))  # the first revocation time stays
        assert not store.revoke_key("nope", T0)
        assert [(k.key_id, k.revoked_at) for k in store.list_keys("acme")] == [
            ("k1", T0 + timedelta(hours=1)), ("k2", None)
        ]  # fmt: skip


def test_read_only_store_reads_what_the_writer_committed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.duckdb"
    with Store(path) as store:
        seeded_ledger(store, FakeClock())
    with Store(path, read_only=True) as reader:
        assert [op.op_id for op, _ in reader.load_ops()] == ["c-acme", "g-acme"]
        assert reader.usage("acme").totals.requests == 0


def test_sequence_numbers_continue_after_reopen(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.duckdb", FakeClock()
    with Store(path) as store:
        ledger = seeded_ledger(store, clock)
    with Store(path) as store:
        batch = Batch()
        apply_into(ledger, batch, Hold("h", "acme", 5, 60))
        store.commit(batch)
        assert store._con.execute("SELECT op_id, seq FROM ops ORDER BY seq").fetchall() == [
            ("c-acme", 0), ("g-acme", 1), ("h", 2)
        ]  # fmt: skip


def test_late_settles_replay_from_the_file_with_what_they_debited(tmp_path: Path) -> None:
    clock, path = FakeClock(), tmp_path / "ledger.duckdb"
    with Store(path) as store:
        ledger, batch = seeded_ledger(store, clock), Batch()  # 10_000 granted
        apply_into(ledger, batch, Hold("h-expired", "acme", 3_000, 10))
        apply_into(ledger, batch, Hold("h-overdue", "acme", 2_000, 10))
        apply_into(ledger, batch, ExpireHolds("x"), T0 + timedelta(seconds=5))  # ends nothing yet
        later = T0 + timedelta(seconds=20)
        late = apply_into(ledger, batch, Settle("s-overdue", "h-overdue", 1_500), later)  # still reserved
        assert (late.late, late.micro_credits, late.released) == (True, 1_500, 500)
        assert apply_into(ledger, batch, ExpireHolds("x2"), later).hold_ids == ("h-expired",)
        apply_into(ledger, batch, Hold("h-new", "acme", 8_000, 60), later)  # 500 left free
        capped = apply_into(ledger, batch, Settle("s-expired", "h-expired", 2_500), later)
        assert (capped.code, capped.late, capped.micro_credits) == (Code.OK, True, 500)
        store.commit(batch)
        sql = store._con.execute
        assert sql("SELECT hold_id, micro_credits FROM debits ORDER BY hold_id").fetchall() == [
            ("h-expired", 500), ("h-overdue", 1_500)
        ]  # fmt: skip
        assert sql("SELECT hold_id, state FROM holds ORDER BY hold_id").fetchall() == [
            ("h-expired", "settled_late"), ("h-new", "open"), ("h-overdue", "settled_late")
        ]  # fmt: skip
        assert store.audit().debited == 2_000
    with Store(path) as store:
        rebuilt = Ledger(clock=clock)
        assert rebuilt.replay(store.load_ops()) == len(batch.ops) + 2
    assert rebuilt.account("acme", later) == ledger.account("acme", later)
    assert rebuilt.apply(Settle("s-expired", "h-expired", 2_500), later) == capped._replace(code=Code.EXISTS)


# The usage table of versions 1 to 4 (1 lacked end_user and http_request_id): ids as text.
OLD_USAGE = """CREATE TABLE usage (request_id VARCHAR NOT NULL, ts TIMESTAMP NOT NULL, tenant_id VARCHAR NOT NULL,
    key_id VARCHAR, tap VARCHAR NOT NULL, model VARCHAR NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost_micro BIGINT NOT NULL, ttft_ms INTEGER, latency_ms INTEGER NOT NULL,
    status usage_status NOT NULL, finish_reason VARCHAR{more})"""
OURS = "chatcmpl-" + "0f" * 16


def old_usage_rows(con: duckdb.DuckDBPyConnection, rows: list[UsageRow], version: int) -> None:
    """Replaces the file's usage log with the usage table of ``version`` holding ``rows``, and its op kinds
    with the enum before v5 (no 'record')."""
    more = ", end_user VARCHAR, http_request_id VARCHAR" if version >= 3 else ""
    con.execute("DROP VIEW usage; DROP TABLE usage_log;" + OLD_USAGE.format(more=more))
    kinds = "'create_tenant', 'grant', 'hold', 'settle', 'release', 'expire_holds'"
    con.execute(f"CREATE TYPE op_kind AS ENUM ({kinds}); ALTER TABLE ops ALTER kind TYPE op_kind; DROP TYPE op_kind_v5")
    for row in rows:
        values = (row.request_id, row.ts.replace(tzinfo=None), *row[2 : 15 if more else 13])
        con.execute(f"INSERT INTO usage VALUES ({', '.join('?' * len(values))})", values)


def test_a_version_1_file_is_migrated_when_the_writer_opens_it(tmp_path: Path) -> None:
    path, clock = tmp_path / "ledger.duckdb", FakeClock()
    with Store(path) as store:
        seeded_ledger(store, clock)
    con = duckdb.connect(str(path))  # what a version-1 file looks like: no `asked`, no usage `end_user`, ...
    con.execute("ALTER TABLE ops DROP COLUMN asked")
    rows = [usage_row(OURS, 5), usage_row("my-own-id", 7)]
    old_usage_rows(con, rows, version=1)
    for column in ("priority", "rpm", "tpm"):
        con.execute(f"ALTER TABLE api_keys DROP COLUMN {column}")
    con.execute("DROP TABLE tenant_policies")
    con.execute("UPDATE schema_version SET version = 1")
    con.close()
    with pytest.raises(RuntimeError, match="schema version 1"):
        Store(path, read_only=True)  # a reader never writes: the writer migrates
    with Store(path) as store:
        assert [op.op_id for op, _ in store.load_ops()] == ["c-acme", "g-acme"]
        assert store.usage("acme", group_by="user").totals.requests == 2  # the new usage columns are there
        assert sorted(store.usage("acme").rows) == sorted(rows)  # the ids as they were
        ledger, record = Ledger(clock=clock), Record("r-1", "acme")
        ledger.replay(store.load_ops())
        store.commit(Batch(ops=[(record, ledger.apply(record))]))  # v5's op kind
        assert [op for op, _ in store.load_ops()][-1] == record
        store.add_key(ApiKeyRecord("k1", "acme", "public", "h1", T0, policy=Policy(priority="batch", key_rpm=5)))
        store.set_tenant_policy("acme", {"weight": 2.0}, T0)
        assert store.get_key("k1").policy == Policy(priority="batch", weight=2.0, key_rpm=5)  # and the key's
    with Store(path, read_only=True) as reader:
        assert reader._one("SELECT max(version) FROM schema_version") == 5


def test_a_version_4_usage_table_moves_to_the_log_with_every_id_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "ledger.duckdb"
    Store(path).close()
    upper = "0F0F0F0F-0F0F-0F0F-0F0F-0F0F0F0F0F0F"  # a UUID, but not as DuckDB writes one: kept as text
    rows = [
        usage_row(OURS, 5, http_request_id="0f" * 4 + "-0f0f-0f0f-0f0f-" + "0f" * 6, end_user="u"),
        usage_row("cmpl-" + "a" * 31, 6, http_request_id=upper),  # one digit short: not ours
        usage_row("embd-" + "b" * 32, 7),
        usage_row("chatcmpl-" + "C" * 32, 8, http_request_id=""),  # upper case: not ours
    ]
    con = duckdb.connect(str(path))
    old_usage_rows(con, rows, version=4)
    con.execute("UPDATE schema_version SET version = 4")
    con.close()
    with Store(path) as store:
        assert sorted(store.usage("acme").rows) == sorted(rows)
        kinds = store._con.execute("SELECT request_kind, request_text, http_text FROM usage_log").fetchall()
    expected = [("chatcmpl", None, None), ("embd", None, None)]
    expected += [(None, rows[1].request_id, upper), (None, rows[3].request_id, "")]
    assert sorted(kinds, key=str) == sorted(expected, key=str)


def test_rows_written_as_rows_or_as_gateway_batches_read_back_the_same(tmp_path: Path) -> None:
    rows = [usage_row(OURS, 5, http_request_id=str(uuid.uuid4())), usage_row("x", 6, http_request_id="X")]
    with Store(tmp_path / "ledger.duckdb") as store:
        store.commit(Batch(usage=rows[:1], usage_batches=[to_arrow(rows[1:]), to_arrow([])]))
        store.commit(Batch(usage_batches=[to_arrow(rows)]))
        assert sorted(store.usage("acme").rows) == sorted(rows * 2)
        assert store.audit().usage_cost == 22


def test_a_key_reads_with_its_own_limits_and_its_tenants_policy(tmp_path: Path) -> None:
    with Store(tmp_path / "ledger.duckdb") as store:
        store.add_key(ApiKeyRecord("k1", "acme", "public", "h1", T0, policy=Policy(key_rpm=10, key_tpm=1000)))
        store.add_key(ApiKeyRecord("k2", "acme", "public", "h2", T0, policy=Policy(priority="interactive")))
        assert store.get_key("k1").policy == Policy(key_rpm=10, key_tpm=1000)
        assert store.set_tenant_policy("acme", {"priority": "batch", "rpm": 60}, T0) == {
            "priority": "batch", "weight": None, "rpm": 60, "tpm": None
        }  # fmt: skip
        assert store.set_tenant_policy("acme", {"weight": 3.0, "rpm": None}, T0)["rpm"] is None  # None clears
        assert store.get_key("k1").policy == Policy("batch", 3.0, 10, 1000, None, None)  # the tenant's class
        assert store.get_key("k2").policy.priority == "interactive"  # the key's own class first
        assert store.tenant_policy("globex") == {"priority": None, "weight": None, "rpm": None, "tpm": None}


def test_revoke_tap_keys_revokes_every_live_key_of_that_tap_only(tmp_path: Path) -> None:
    with Store(tmp_path / "ledger.duckdb") as store:
        store.add_key(ApiKeyRecord("k1", "acme", "private-acme", "h1", T0))
        store.add_key(ApiKeyRecord("k2", "globex", "private-acme", "h2", T0))
        store.add_key(ApiKeyRecord("k3", "acme", "public", "h3", T0))
        store.add_key(ApiKeyRecord("k4", "acme", "private-acme", "h4", T0, T0))  # revoked already
        assert store.revoke_tap_keys("private-acme", T0 + timedelta(hours=1)) == 2
        assert store.revoke_tap_keys("private-acme", T0 + timedelta(hours=2)) == 0
        revoked = {k.key_id: k.revoked_at for t in ("acme", "globex") for k in store.list_keys(t)}
        assert revoked == {"k1": T0 + timedelta(hours=1), "k2": T0 + timedelta(hours=1), "k3": None, "k4": T0}


def test_usage_runs_on_its_own_cursor_in_another_thread_while_commits_go_on(tmp_path: Path) -> None:
    import threading

    with Store(tmp_path / "ledger.duckdb") as store:
        store.commit(Batch(usage=[usage_row(f"r{i}", 1, ts=T0 + timedelta(seconds=i)) for i in range(20_000)]))
        reports: list[int] = []
        cursor = store.cursor()

        def report() -> None:
            for _ in range(20):
                reports.append(store.usage("acme", group_by="day", con=cursor).totals.requests)

        reader = threading.Thread(target=report)
        reader.start()
        for i in range(50):  # commits on the store's own connection meanwhile
            store.commit(Batch(usage=[usage_row(f"w{i}", 1)]))
        reader.join()
        cursor.close()
        assert len(reports) == 20 and all(20_000 <= n <= 20_050 for n in reports)
        assert reports == sorted(reports)  # each report sees a committed snapshot, never a torn batch
        assert store.usage("acme").totals.requests == 20_050

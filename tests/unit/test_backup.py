"""orch.backup and LedgerService.backup without Ray: real ledger services on real DuckDB files in tmp dirs,
backed up while ops go on committing, restored into a fresh data dir and opened again. Fakes are named as
fakes: a cursor that pauses inside the copy's transaction, a stack's state file."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from actors.ledger import LedgerService
from orch import backup as backup_module
from orch.backup import MANIFEST, BackupError, backup, restore
from orch.control.cli import main as cli_main
from orch.keys import ADMIN_KEY_ENV, PEPPER_ENV, load_or_create_admin_key, verify
from orch.ledger import Account, GrantCredits, Hold, Ledger, Settle
from orch.store import Store
from orch.usage_log import UsageRow

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def clock() -> datetime:
    return T0


@pytest.fixture(autouse=True)
def _secrets_from_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv(PEPPER_ENV, raising=False)


class FakePausingCursor:
    """A store cursor that stops right after the backup's COPY ran, inside its transaction, until the test
    lets it go: what commits meanwhile provably commits while the copy's transaction is open."""

    def __init__(self) -> None:
        self.real: duckdb.DuckDBPyConnection | None = None
        self.copied = threading.Event()
        self.go_on = threading.Event()

    def execute(self, sql: str, *args: Any) -> duckdb.DuckDBPyConnection:
        assert self.real is not None
        result = self.real.execute(sql, *args)
        if sql.startswith("COPY FROM DATABASE"):
            self.copied.set()
            self.go_on.wait(timeout=60)  # a guard: the test sets it
        return result

    def close(self) -> None:
        assert self.real is not None
        self.real.close()


class FakePausingCopyStore(Store):
    """The real store, whose cursors pause as :class:`FakePausingCursor` does (one backup at a time)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.pausing = FakePausingCursor()

    def cursor(self) -> Any:
        self.pausing.real = super().cursor()
        return self.pausing


def usage_row(request_id: str, tenant_id: str, cost: int) -> UsageRow:
    return UsageRow(request_id, T0, tenant_id, "k1", "public", "m", 10, 5, cost, 40, 300, "ok", "stop")


async def spend(service: LedgerService, tenant: str, n: int, prefix: str) -> None:
    """``n`` requests' money: a hold, then its settle with the usage row."""
    for i in range(n):
        assert (await service.apply(Hold(f"{prefix}-h{i}", tenant, 1_000, 60))).ok
        settle = Settle(f"{prefix}-s{i}", f"{prefix}-h{i}", 300 + i)
        assert (await service.apply(settle, usage_row(settle.op_id, tenant, settle.micro_credits))).ok


async def new_tenant(service: LedgerService, name: str, grant: int = 1_000_000) -> str:
    tenant = (await service.create_tenant(name, f"op-{name}")).tenant_id
    assert (await service.apply(GrantCredits(f"g-{name}", tenant, grant))).ok
    return tenant


def call_of(services: list[LedgerService]) -> Any:
    """``LedgerClient.call``'s shape, on services in this process."""

    async def call(shard: int, method: str, *args: Any) -> Any:
        result = getattr(services[shard], method)(*args)
        return await result if asyncio.iscoroutine(result) else result

    return call


def state_at(store: Store, seq: int) -> Ledger:
    """The ledger as of op ``seq``: the file's first ``seq + 1`` ops replayed."""
    ledger = Ledger(clock)
    ledger.replay(list(store.load_ops())[: seq + 1])
    return ledger


def test_ops_committed_while_the_copy_runs_are_not_in_it_and_the_restore_has_the_accounts_of_its_start(
    tmp_path: Path,
) -> None:
    live, restored_dir = tmp_path / "live", tmp_path / "restored"
    store = FakePausingCopyStore(live / "ledger-0.duckdb")
    load_or_create_admin_key(live)

    async def scenario() -> None:
        service = LedgerService(live / "ledger-0.duckdb", clock, store=store)
        tenant = await new_tenant(service, "acme")
        await spend(service, tenant, 5, "before")
        key_id, raw = service.create_key(tenant) or ("", "")
        at_copy = service.account(tenant)
        seq_at_copy = service._store.next_seq - 1
        copying = asyncio.ensure_future(backup(live, tmp_path / "backup", 1, call_of([service])))
        assert await asyncio.to_thread(store.pausing.copied.wait, 60)
        await spend(service, tenant, 3, "during")  # committed while the copy's transaction is open
        assert service.account(tenant) != at_copy
        store.pausing.go_on.set()
        manifest = await copying
        assert manifest["files"]["ledger-0.duckdb"]["seq"] == seq_at_copy
        assert service._store.next_seq - 1 == seq_at_copy + 6
        service.close()

        restore(tmp_path / "backup", restored_dir)
        restored = LedgerService(restored_dir / "ledger-0.duckdb", clock)
        assert restored.account(tenant) == at_copy
        record = restored.get_key(key_id)
        assert record is not None and verify(raw, record.secret_hash, restored.key_pepper())  # the pepper came too
        assert restored.check_invariants()["ops"] == seq_at_copy + 1
        restored.close()

    asyncio.run(scenario())
    assert (restored_dir / "key_pepper").stat().st_mode & 0o777 == 0o600
    assert (restored_dir / "admin_key").stat().st_mode & 0o777 == 0o600


def test_a_backup_under_load_of_two_shards_restores_each_as_of_its_seq(tmp_path: Path) -> None:
    live, restored_dir = tmp_path / "live", tmp_path / "restored"
    load_or_create_admin_key(live)
    fd = os.open(live / "demo_key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"sk-orch-demo\n")
    os.close(fd)

    async def scenario() -> None:
        services = [LedgerService(live / f"ledger-{s}.duckdb", clock) for s in range(2)]
        tenants = [await new_tenant(services[s], f"t{s}-{i}") for s in range(2) for i in range(3)]
        shard_of = {t: i // 3 for i, t in enumerate(tenants)}
        services[0].create_key(tenants[0])  # makes the key pepper
        for t in tenants:
            await spend(services[shard_of[t]], t, 20, f"{t}-first")
        stop = asyncio.Event()
        applied = [0]

        async def load(tenant: str) -> None:  # hold/settle pairs, all the time the backup runs
            i = 0
            while not stop.is_set():
                await spend(services[shard_of[tenant]], tenant, 1, f"{tenant}-load-{i}")
                applied[0] += 1
                i += 1

        writers = [asyncio.ensure_future(load(t)) for t in tenants]
        await asyncio.sleep(0.05)
        before = applied[0]
        manifest = await backup(live, tmp_path / "backup", 2, call_of(services))
        during = applied[0] - before
        stop.set()
        await asyncio.gather(*writers)
        assert during > 0, "no op committed while the backup ran"
        expected: dict[str, Account] = {}
        for s, service in enumerate(services):
            seq = manifest["files"][f"ledger-{s}.duckdb"]["seq"]
            assert 0 < seq < service._store.next_seq - 1  # it copied a point in the middle of the load
            reference = state_at(service._store, seq)
            expected |= {t: reference.account(t) for t in tenants if shard_of[t] == s}
            service.close()

        restore(tmp_path / "backup", restored_dir)
        for s in range(2):
            restored = LedgerService(restored_dir / f"ledger-{s}.duckdb", clock)
            for t in tenants:
                if shard_of[t] == s:
                    assert restored._ledger.account(t) == expected[t]
            restored.check_invariants()  # raises on a violation: no half group commit in the copy
            restored.close()

    asyncio.run(scenario())
    assert sorted(os.listdir(tmp_path / "backup")) == [
        "admin_key", "demo_key", "key_pepper", "ledger-0.duckdb", "ledger-1.duckdb", MANIFEST
    ]  # fmt: skip
    assert (restored_dir / "demo_key").read_text() == "sk-orch-demo\n"


def made_backup(tmp_path: Path) -> tuple[Path, Path]:
    """A live data dir with one shard (a tenant, a key) and its backup: (data dir, backup dir)."""
    live = tmp_path / "live"
    load_or_create_admin_key(live)

    async def scenario() -> None:
        service = LedgerService(live / "ledger-0.duckdb", clock)
        tenant = await new_tenant(service, "acme")
        service.create_key(tenant)
        await backup(live, tmp_path / "backup", 1, call_of([service]))
        service.close()

    asyncio.run(scenario())
    return live, tmp_path / "backup"


def test_a_damaged_backup_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    _, backup_dir = made_backup(tmp_path)
    data = bytearray((backup_dir / "ledger-0.duckdb").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (backup_dir / "ledger-0.duckdb").write_bytes(bytes(data))
    with pytest.raises(BackupError, match="ledger-0.duckdb does not match its digest"):
        restore(backup_dir, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    (backup_dir / "key_pepper").unlink()
    with pytest.raises(BackupError, match="key_pepper is missing"):
        restore(backup_dir, tmp_path / "fresh")


def test_a_restore_over_ledger_files_needs_force_and_then_replaces_them_wal_and_other_shards_too(
    tmp_path: Path,
) -> None:
    live, backup_dir = made_backup(tmp_path)
    (live / "ledger-0.duckdb.wal").write_bytes(b"a WAL that would replay onto the restored file")
    (live / "ledger-3.duckdb").write_bytes(b"a shard the backup has not")
    with pytest.raises(BackupError, match="already has ledger-0.duckdb, ledger-0.duckdb.wal, ledger-3.duckdb"):
        restore(backup_dir, live)
    restore(backup_dir, live, force=True)
    assert sorted(p.name for p in live.glob("ledger-*")) == ["ledger-0.duckdb"]
    assert backup_module.sha256_of(live / "ledger-0.duckdb") == backup_module.sha256_of(backup_dir / "ledger-0.duckdb")


def test_a_restore_over_another_secret_needs_force(tmp_path: Path) -> None:
    _, backup_dir = made_backup(tmp_path)
    other = tmp_path / "other"
    load_or_create_admin_key(other)  # another stack's admin key (no ledger there)
    with pytest.raises(BackupError, match="already has admin_key; restore over them with --force"):
        restore(backup_dir, other)


def write_fake_cluster_state(data_dir: Path) -> None:
    """The state file of a running `up` (its daemon's pid: this live process)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    state = {"gcs_address": "127.0.0.1:1", "pid": os.getpid(), "num_cpus": 1, "num_gpus": 0, "auth_token_path": ""}
    (data_dir / "cluster.json").write_text(json.dumps(state))


def test_a_restore_into_a_data_dir_a_stack_runs_on_is_refused(tmp_path: Path) -> None:
    _, backup_dir = made_backup(tmp_path)
    running = tmp_path / "running"
    write_fake_cluster_state(running)
    with pytest.raises(BackupError, match=f"a stack runs on {running} .*`llama-orch down` first"):
        restore(backup_dir, running, force=True)
    assert not (running / "ledger-0.duckdb").exists()


def test_an_unfinished_or_strange_backup_is_refused(tmp_path: Path) -> None:
    _, backup_dir = made_backup(tmp_path)
    manifest = json.loads((backup_dir / MANIFEST).read_text())
    manifest["files"]["../outside"] = manifest["files"]["admin_key"]
    (backup_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackupError, match="lists files no backup has"):
        restore(backup_dir, tmp_path / "fresh")
    (backup_dir / MANIFEST).unlink()
    with pytest.raises(BackupError, match="no manifest.json: not a backup, or an unfinished one"):
        restore(backup_dir, tmp_path / "fresh")


def test_a_backup_goes_into_a_new_folder_and_a_shard_never_overwrites_a_file(tmp_path: Path) -> None:
    _, backup_dir = made_backup(tmp_path)
    service = LedgerService(tmp_path / "other" / "ledger-0.duckdb", clock)
    with pytest.raises(BackupError, match="is not an empty folder"):
        asyncio.run(backup(tmp_path / "other", backup_dir, 1, call_of([service])))
    with pytest.raises(FileExistsError):
        asyncio.run(service.backup(str(backup_dir / "ledger-0.duckdb")))
    empty = asyncio.run(service.backup(str(tmp_path / "empty.duckdb")))
    assert (empty["seq"], empty["ops"]) == (-1, 0)
    service.close()
    assert [p.name for p in tmp_path.glob(".*.tmp*")] == []


def test_the_cli_restores_and_says_why_in_one_line_when_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, backup_dir = made_backup(tmp_path)
    fresh = tmp_path / "fresh"
    assert cli_main(["--data-dir", str(fresh), "restore", str(backup_dir)]) == 0
    assert "start it with ledger_shards: 1" in capsys.readouterr().out
    assert cli_main(["--data-dir", str(fresh), "restore", str(backup_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama-orch: ") and "--force" in err and err.count("\n") == 1
    assert cli_main(["--data-dir", str(fresh), "backup", str(tmp_path / "b2")]) == 1
    assert "no stack runs for data dir" in capsys.readouterr().err

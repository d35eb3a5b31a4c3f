"""A full disk under the ledger's data dir: the ledger refuses what it cannot commit (LedgerUnavailable, a 503
``ledger_unavailable`` at the gateway) and loses nothing it acknowledged; with room again, a restart replays
every acknowledged op and the ledger goes on. The data dir is a small tmpfs of the test's own (needs root, as
CI runs; skipped elsewhere, saying so)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from actors.ledger import LedgerService, LedgerUnavailable
from orch.ledger import MICRO, Code, GrantCredits, Hold, Settle
from orch.usage_log import UsageRow
from tests.reliability.table import record

pytestmark = pytest.mark.reliability
IN_FLIGHT = 50  # hold+settle pairs sent at once, round after round, until the disk is full


def mount(where: Path, size: str, remount: bool = False) -> subprocess.CompletedProcess[str]:
    options = f"remount,size={size}" if remount else f"size={size}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)


def fill(path: Path) -> None:
    """Writes ``path`` until the disk is full (ENOSPC)."""
    with contextlib.suppress(OSError), path.open("wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "data"
    where.mkdir()
    done = mount(where, "3m")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_refuses_new_holds_and_loses_nothing_acknowledged(small_disk: Path) -> None:
    path = small_disk / "ledger-0.duckdb"
    service = LedgerService(path)
    tenant = asyncio.run(service.create_tenant("Acme")).tenant_id
    assert asyncio.run(service.apply(GrantCredits("g", tenant, 10**6 * MICRO))).code is Code.OK
    acknowledged: list[str] = []
    refused = 0

    async def pair(i: int) -> None:
        hold_id = f"hold-{i:06d}-" + "x" * 40  # long ids: the disk fills sooner
        await service.apply(Hold(hold_id, tenant, 1_000, 600))
        acknowledged.append(hold_id)
        row = UsageRow(f"r-{hold_id}", datetime.now(UTC), tenant, "k", "public", "m", 10, 5, 700, 5, 9, "ok", "stop")
        await service.apply(Settle(f"s-{hold_id}", hold_id, 700), row)
        acknowledged.append(f"s-{hold_id}")

    async def until_full() -> None:
        nonlocal refused
        for start in range(0, 200_000, IN_FLIGHT):
            pairs = (pair(i) for i in range(start, start + IN_FLIGHT))
            results = await asyncio.gather(*pairs, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(f, LedgerUnavailable) for f in failures), failures[:3]
            refused += len(failures)
            if failures:
                return
        raise AssertionError("the disk never filled")

    asyncio.run(until_full())
    fill(small_disk / "filler")  # the rest of the disk too, as another process would
    # What still fits in the pages the files already have commits; then a new hold is refused, not taken on
    # credit (the gateway answers 503 ledger_unavailable).
    for i in range(10_000):
        try:
            asyncio.run(service.apply(Hold(f"after-full-{i}", tenant, 1_000, 600)))
        except LedgerUnavailable:
            break
        acknowledged.append(f"after-full-{i}")
    else:
        raise AssertionError("a full disk never refused a hold")
    try:
        service.close()
    except Exception:  # closing checkpoints, which a full disk may refuse: the WAL holds what was committed
        pass
    (small_disk / "filler").unlink()
    assert mount(small_disk, "64m", remount=True).returncode == 0
    service = LedgerService(path)  # the restart Ray would do: it replays the file
    found = {op.op_id for op, _ in service._store.load_ops()}
    missing = [op_id for op_id in acknowledged if op_id not in found]
    lost = 700 * sum(op_id.startswith("s-") for op_id in missing)  # acknowledged debits gone
    figures = service.check_invariants()
    record("disk full under the data dir (ledger)", IN_FLIGHT, lost, figures["double_charges"], figures["violations"])
    assert not missing, f"{len(missing)} acknowledged ops lost, e.g. {missing[:3]}"
    assert refused > 0
    assert asyncio.run(service.apply(Hold("after-room", tenant, 1_000, 600))).code is Code.OK
    service.close()

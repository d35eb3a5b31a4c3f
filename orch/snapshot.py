"""Ledger snapshots: the whole in-memory :class:`orch.ledger.Ledger` pickled into its store file beside the
seq of the first op it does not hold, so a restart loads it and replays only the ops after it. Restart time
then follows the ledger's state (tenants, grants, open holds and the op ids of one idempotency window), not
the length of its history.

A snapshot is used only by the code that wrote it: :data:`CODE` is a digest of the ledger's source, and a
snapshot of other code (an upgrade) is ignored for a full replay, which a new snapshot then follows.

>>> from datetime import UTC, datetime
>>> from orch.ledger import CreateTenant, Ledger
>>> ledger = Ledger(clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
>>> _ = ledger.apply(CreateTenant("op-1", "acme", "Acme"))
>>> loads(dumps(ledger), ledger.clock).account("acme").name
'Acme'
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from orch import ledger as ledger_module
from orch import ledger_ops, ledger_state
from orch.ledger import Ledger

CODE = hashlib.sha256(
    b"".join(Path(m.__file__).read_bytes() for m in (ledger_module, ledger_ops, ledger_state) if m.__file__)
).hexdigest()[:16]


def dumps(ledger: Ledger) -> bytes:
    return pickle.dumps(ledger, protocol=pickle.HIGHEST_PROTOCOL)


def dumps_aside(ledger: Ledger) -> Callable[[], bytes]:
    """Pickles ``ledger`` as it is now without holding its caller up for it: a forked child pickles its
    copy-on-write image into a pipe and exits, while the caller's ledger goes on changing. Returns what
    gets the bytes (it blocks: run it in a worker thread) and reaps the child; it raises if the child
    failed. The child runs only pickling and a write: no lock of another thread (DuckDB's, Ray's) is touched.
    The fork itself costs the copy of the page tables (milliseconds for a ledger process)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child: it never returns)
        code = 1
        try:
            os.close(read)
            with os.fdopen(write, "wb") as out:
                out.write(dumps(ledger))
            code = 0
        finally:
            os._exit(code)
    os.close(write)

    def collect() -> bytes:
        with os.fdopen(read, "rb") as source:
            state = source.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the snapshot process {pid} failed (status {status})")
        return state

    return collect


def loads(state: bytes, clock: Callable[[], datetime]) -> Ledger:
    ledger: Ledger = pickle.loads(state)  # noqa: S301 — our own file, written by this code (CODE)
    ledger.clock = clock
    return ledger

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


def loads(state: bytes, clock: Callable[[], datetime]) -> Ledger:
    ledger: Ledger = pickle.loads(state)  # noqa: S301 — our own file, written by this code (CODE)
    ledger.clock = clock
    return ledger

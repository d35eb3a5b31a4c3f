"""The CLI's small state files (``taps.json``, ``up.json``): written whole or not at all, and changed
under a lock, so that two CLI runs at once never drop each other's change.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "taps.json"
>>> with locked(path):
...     write_json_atomic(path, {"acme": {"gpus": 1}})
>>> path.read_text()
'{\\n  "acme": {\\n    "gpus": 1\\n  }\\n}\\n'
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_held = threading.local()  # per thread: the lock files it holds, so that `locked` nests


def write_json_atomic(path: str | Path, obj: Any, *, mode: int = 0o644) -> None:
    """Writes ``obj`` as JSON to ``path`` so that readers see the old file or the new one, never a part,
    and the new one survives a crash once this returns: a temp file in the same folder, fsync'd, renamed
    over ``path``, then the folder fsync'd. Raises (leaving ``path`` as it was) if ``obj`` isn't JSON."""
    path = Path(path)
    data = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable only once the folder is
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Holds an exclusive lock for read-modify-write of ``path`` (``flock`` on ``<path>.lock`` beside it;
    other processes wait). Nests within a thread; the OS drops it if the process dies.

    >>> import tempfile, pathlib
    >>> state = pathlib.Path(tempfile.mkdtemp()) / "up.json"
    >>> with locked(state), locked(state):
    ...     pass
    """
    lock_path = os.path.abspath(Path(path).with_name(Path(path).name + ".lock"))
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if lock_path in held:  # this thread holds it already: a second flock on a new fd would wait for ever
        yield
        return
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(lock_path)
        try:
            yield
        finally:
            held.discard(lock_path)
    finally:
        os.close(fd)  # closing the file releases the lock

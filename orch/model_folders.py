"""Model folders published whole: built in a temporary sibling under a file lock, a ``.complete``
marker written last, then renamed into place. A folder with the marker is complete; checking for it
costs a ``stat``."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MARKER = ".complete"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def build_once(target: Path, lock_path: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Publish `target` built by `build(tmp_dir)` unless a complete one exists; serialised by a file lock.

    `build` returns provenance recorded in the marker. A half-built folder never becomes visible: the
    build happens in a temporary sibling (same filesystem, so the final rename is atomic) that is
    removed if the build fails.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(lock_path):
        if is_complete(target):  # another process built it while we waited
            return target
        # Only lock holders build, so any temporary sibling now is from a builder that was killed.
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            provenance = build(tmp)
            (tmp / MARKER).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
            _make_readable(tmp)
            if target.exists():  # a leftover without the marker, e.g. copied in by hand
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _make_readable(folder: Path) -> None:
    # mkdtemp makes the folder 0700 and safetensors writes 0600: open them up like any model download.
    folder.chmod(0o755)
    for child in folder.rglob("*"):
        child.chmod(0o755 if child.is_dir() else 0o644)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    # flock is released by the kernel if the holder dies, so a crashed conversion never wedges others.
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)

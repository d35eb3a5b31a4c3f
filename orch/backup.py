"""``llama-orch backup`` / ``restore``: a copy of a data dir's money state, taken while the stack runs.

A backup is a folder: each ledger shard's DuckDB file, copied by the shard's own actor
(:meth:`actors.ledger.LedgerService.backup` runs :func:`orch.store.copy_database`: one DuckDB transaction in a worker
thread, so the copy holds exactly the group commits done when it began while the shard goes on committing);
the secrets a restored ledger needs beside it (``key_pepper``: without it no API key verifies; ``admin_key``;
``demo_key``); and ``manifest.json``, written last, with each file's SHA-256: a folder without it is an
unfinished backup. Model weights, Ray's state and the CLI's records (``up.json``, ``taps.json``) are not in it.

:func:`restore` checks every file against the manifest before it writes anything, refuses while a stack runs
on the data dir, and replaces ledger files or other secrets only when forced; each file lands whole (a temp
file renamed), the secrets with mode 0600.

>>> manifest = asyncio.run(backup(data_dir, Path("/backups/2026-11-28"), 1, client.call))  # doctest: +SKIP
>>> restore(Path("/backups/2026-11-28"), Path(".orch-restored"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import duckdb

from orch.files import write_json_atomic
from orch.keys import ADMIN_KEY_FILE, PEPPER_FILE
from orch.store import Store, copy_database
from orch.store_schema import SCHEMA_VERSION

FORMAT = 1  # manifest.json's layout; restore refuses another
MANIFEST = "manifest.json"
SECRET_FILES = (PEPPER_FILE, ADMIN_KEY_FILE, "demo_key")  # copied when the data dir has them
CHUNK = 1 << 20

ShardCall = Callable[..., Awaitable[Any]]  # (shard, method, *args) → its result: LedgerClient.call's shape


class BackupError(RuntimeError):
    """A backup or restore that cannot be done; the message is one line saying why and what to do."""


def ledger_file(shard: int) -> str:
    """A shard's file name in the data dir (``actors.ledger.ledger_actor``'s) and in a backup."""
    return f"ledger-{shard}.duckdb"


class ShardCopy(NamedTuple):
    seq: int  # the last op in the copy; -1: none
    ops: int
    bytes: int
    sha256: str


def backup_file(con: duckdb.DuckDBPyConnection, dest: Path) -> ShardCopy:
    """:func:`orch.store.copy_database` into a temp file beside the new file ``dest``, renamed to it once whole and
    fsync'd. Blocking, and closes ``con``: a ledger runs it in a worker thread that owns the cursor, so a
    caller that gives up never closes it under the copy."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if dest.exists():
            raise FileExistsError(f"{dest} exists; a backup writes a new file")
        seq, ops = copy_database(con, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        con.close()
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    return ShardCopy(seq, ops, dest.stat().st_size, sha256_of(dest))


async def backup(data_dir: Path, dest_dir: Path, shards: int, call: ShardCall) -> dict[str, Any]:
    """Backs up the running stack's ``shards`` ledger shards (each copied by its actor through ``call``, all
    at once) and the data dir's secrets into the new or empty folder ``dest_dir``; returns the manifest it
    wrote last. Run it on the machine that holds the data dir (the Ray head's): the actors write there."""
    dest_dir = await asyncio.to_thread(_new_folder, dest_dir)
    copies = await asyncio.gather(*(_backup_shard(s, dest_dir / ledger_file(s), call) for s in range(shards)))
    return await asyncio.to_thread(_finish, data_dir, dest_dir, copies)


def _new_folder(path: Path) -> Path:
    path = path.resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BackupError(f"{path} exists and is not an empty folder; back up into a new one")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds secrets
    return path


def _finish(data_dir: Path, dest_dir: Path, copies: list[dict[str, Any]]) -> dict[str, Any]:
    """Checks each shard's copy, copies the secrets, writes the manifest (last); returns it. A copy that is not
    here was written by a shard on another node (``ledger_nodes``), on that node: its entry says
    ``"elsewhere"``, and :func:`restore` refuses the backup until it is put beside the manifest."""
    files: dict[str, dict[str, Any]] = {}
    for shard, copy in enumerate(copies):
        path = dest_dir / ledger_file(shard)
        files[path.name] = {k: copy[k] for k in ("sha256", "seq", "ops", "bytes", "seconds")}
        if not path.exists():  # a shard on another node (ledger_nodes) wrote it there: gather it before a restore
            files[path.name]["elsewhere"] = True
            continue
        with Store(path, read_only=True) as store:  # the copy opens, at this code's schema, with its ops
            if store.next_seq - 1 != copy["seq"] or sha256_of(path) != copy["sha256"]:
                raise BackupError(f"shard {shard}'s copy {path} is not what its ledger wrote; back up again")
    for name in SECRET_FILES:
        if (data_dir / name).exists():
            digest = _copy_file(data_dir / name, dest_dir / name, 0o600)
            files[name] = {"sha256": digest, "bytes": (dest_dir / name).stat().st_size}
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "shards": len(copies),
        "schema_version": SCHEMA_VERSION,
        "files": files,
    }
    write_json_atomic(dest_dir / MANIFEST, manifest)
    return manifest


async def _backup_shard(shard: int, dest: Path, call: ShardCall) -> dict[str, Any]:
    try:
        copy: dict[str, Any] = await call(shard, "backup", str(dest))
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc  # a Ray task error carries the actor's exception
        why = (str(cause).strip().splitlines() or [""])[0]
        raise BackupError(f"shard {shard} could not write {dest} ({type(cause).__name__}: {why}); the backup in "
                          f"{dest.parent} is unfinished (no {MANIFEST})") from exc  # fmt: skip
    return copy


def read_manifest(backup_dir: Path) -> dict[str, Any]:
    """The backup's manifest; raises :class:`BackupError` if there is none (an unfinished backup) or it is of
    another format or a newer schema than this code reads."""
    try:
        manifest: dict[str, Any] = json.loads((backup_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{backup_dir} has no {MANIFEST}: not a backup, or an unfinished one") from None
    except ValueError as exc:
        raise BackupError(f"{backup_dir / MANIFEST} is not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{backup_dir} is a backup of format {manifest.get('format')}; this code reads {FORMAT}")
    strange = [n for n in manifest["files"] if n not in SECRET_FILES and not re.fullmatch(r"ledger-\d+\.duckdb", n)]
    if strange:  # a name restore would write outside what a backup holds (a path, another file)
        raise BackupError(f"{backup_dir / MANIFEST} lists files no backup has: {strange[:3]}")
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise BackupError(f"{backup_dir} holds ledger schema {manifest['schema_version']}; this code reads up to "
                          f"{SCHEMA_VERSION}: restore it with the release that made it")  # fmt: skip
    return manifest


def verify(backup_dir: Path, manifest: dict[str, Any]) -> None:
    """Raises :class:`BackupError` naming the first file of the backup that is missing or whose SHA-256 is not
    the manifest's."""
    for name, entry in manifest["files"].items():
        path = backup_dir / name
        if not path.is_file():
            raise BackupError(f"{path} is missing; the backup is incomplete")
        if sha256_of(path) != entry["sha256"]:
            raise BackupError(f"{path} does not match its digest in {MANIFEST}: the backup is damaged; refusing")


def restore(backup_dir: Path, data_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Restores the backup in ``backup_dir`` into ``data_dir`` (created if need be) and returns its manifest.
    Refuses, before writing anything, a data dir a stack runs on, one that has ledger files or other secrets
    (unless ``force``: they are replaced, and ledger files of shards the backup has not are removed), and a
    damaged backup."""
    from orch.control.cluster import read_state, up_file

    manifest = read_manifest(backup_dir)
    if (state := read_state(data_dir)) is not None:
        raise BackupError(f"a stack runs on {data_dir} (Ray head pid {state.pid}); `llama-orch down` first")
    if up_file(data_dir).exists():
        raise BackupError(f"{up_file(data_dir)} records a deployed stack; `llama-orch down` first")
    ledgers = sorted(p.name for p in data_dir.glob("ledger-*.duckdb*")) if data_dir.is_dir() else []
    secrets = [n for n in SECRET_FILES if n in manifest["files"] and (data_dir / n).exists()
               and sha256_of(data_dir / n) != manifest["files"][n]["sha256"]]  # fmt: skip
    if (ledgers or secrets) and not force:
        raise BackupError(f"{data_dir} already has {', '.join(ledgers + secrets)}; restore over them with --force")
    verify(backup_dir, manifest)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ledgers:
        if name not in manifest["files"]:  # another shard's file, or a WAL that would replay onto the backup's
            (data_dir / name).unlink()
    for name, entry in manifest["files"].items():
        _copy_file(backup_dir / name, data_dir / name, 0o600 if name in SECRET_FILES else 0o644, entry["sha256"])
    return manifest


def _copy_file(src: Path, dest: Path, mode: int, sha256: str | None = None) -> str:
    """Copies ``src`` over ``dest`` whole (a temp file beside it, fsync'd, renamed, the folder fsync'd) with
    ``mode``; the SHA-256 of what it copied, which must be ``sha256`` when given (else ``dest`` is untouched)."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as f, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as out:
            os.fchmod(out.fileno(), mode)
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise BackupError(f"{src} changed while it was copied (its digest is not the manifest's); restore again")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

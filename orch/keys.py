"""API keys: ``sk-orch-<key_id>-<secret>``, shown once, stored only as a hash of the secret.

>>> key_id, raw = generate_key()
>>> parse_key(raw)[0] == key_id
True
>>> stored = hash_secret(parse_key(raw)[1])
>>> verify(raw, stored), verify(raw[:-1] + "x", stored)
(True, False)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

PREFIX = "sk-orch-"
KEY_ID_BYTES = 10  # 16 base32 characters: 80 random bits, collisions negligible, short enough to log
SECRET_BYTES = 32  # 52 base32 characters: 256 random bits
ADMIN_KEY_ID = "admin"  # never a generated key_id (those are 16 characters long)
ADMIN_KEY_ENV = "LLAMA_ORCH_ADMIN_KEY"
ADMIN_KEY_FILE = "admin_key"
PEPPER_ENV = "LLAMA_ORCH_KEY_PEPPER"
PEPPER_FILE = "key_pepper"
PEPPERED = "p1$"  # the mark of a stored hash made with the pepper
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")  # lower-case base32: no '-', url-safe


class InvalidKey(ValueError):
    """The string is not an ``sk-orch-<key_id>-<secret>`` key. The message never contains the key."""


def _token(nbytes: int) -> str:
    return base64.b32encode(secrets.token_bytes(nbytes)).decode("ascii").rstrip("=").lower()


def generate_key() -> tuple[str, str]:
    """A new key: ``(key_id, raw_key)``. Show ``raw_key`` once; store ``hash_secret(secret)``."""
    key_id = _token(KEY_ID_BYTES)
    return key_id, f"{PREFIX}{key_id}-{_token(SECRET_BYTES)}"


def parse_key(raw: str) -> tuple[str, str]:
    """``(key_id, secret)`` of a raw key; raises ``InvalidKey`` on anything else."""
    if not isinstance(raw, str) or not raw.startswith(PREFIX):
        raise InvalidKey("not an sk-orch- key")
    key_id, sep, secret = raw[len(PREFIX) :].partition("-")
    if not sep or not key_id or len(secret) < 32 or not _ALPHABET.issuperset(secret):
        raise InvalidKey("malformed sk-orch- key")
    if key_id != ADMIN_KEY_ID and (len(key_id) != 16 or not _ALPHABET.issuperset(key_id)):
        raise InvalidKey("malformed sk-orch- key id")
    return key_id, secret


def hash_secret(secret: str, pepper: bytes | None = None) -> str:
    """Digest to store. SHA-256 suffices because secrets carry 256 random bits: no dictionary or brute
    force can invert it, so a slow password hash would only slow every request. With the server's
    ``pepper`` (:func:`load_or_create_pepper`: an HMAC key kept outside the database) it is an HMAC marked
    ``p1$``, and a stolen DB file alone cannot even check a guessed key."""
    data = secret.encode("ascii")
    if pepper:
        return PEPPERED + hmac.new(pepper, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def verify(raw: str, stored_hash: str, pepper: bytes | None = None) -> bool:
    """Whether ``raw``'s secret hashes to ``stored_hash``, compared in constant time. A stored hash without
    the ``p1$`` mark is of a key made before the stack had a pepper: checked as plain SHA-256."""
    try:
        _, secret = parse_key(raw)
    except InvalidKey:
        return False
    peppered = stored_hash.startswith(PEPPERED)
    if peppered and not pepper:
        return False
    return hmac.compare_digest(hash_secret(secret, pepper if peppered else None), stored_hash)


def load_or_create_pepper(data_dir: str | Path) -> bytes:
    """The server's key pepper: ``$LLAMA_ORCH_KEY_PEPPER`` (hex, ≥ 32 bytes) if set, else
    ``<data_dir>/key_pepper`` (mode 0600, beside the database, never in it), made on first use. Losing it
    invalidates every key made with it: back it up with the data dir."""
    from_env = os.environ.get(PEPPER_ENV, "").strip()
    if from_env:
        pepper = bytes.fromhex(from_env)
        if len(pepper) < 32:
            raise ValueError(f"${PEPPER_ENV} must be at least 32 bytes of hex")
        return pepper
    return bytes.fromhex(_private_file(Path(data_dir) / PEPPER_FILE, secrets.token_hex(32)))


def load_or_create_admin_key(data_dir: str | Path) -> str:
    """The admin key: ``$LLAMA_ORCH_ADMIN_KEY`` if set (any secret :func:`validate_admin_key` accepts;
    ``ValueError`` otherwise), else ``<data_dir>/admin_key`` (mode 0600), generated there on first use.
    The file is a credential like an SSH key; it never enters the DB."""
    from_env = os.environ.get(ADMIN_KEY_ENV, "")
    if from_env.strip():
        return validate_admin_key(from_env)
    return _private_file(Path(data_dir) / ADMIN_KEY_FILE, f"{PREFIX}{ADMIN_KEY_ID}-{_token(SECRET_BYTES)}")


def _private_file(path: Path, new: str) -> str:
    """The secret in ``path`` (refused if others may read it), or ``new`` written there first."""
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} is readable by others; chmod 600 it")
        return path.read_text(encoding="ascii").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole to a private temp file (mkstemp creates it 0600), then linked into place: readers
    # never see a partial secret, and of two racing first starts exactly one secret wins.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(new + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text(encoding="ascii").strip()
    finally:
        os.unlink(tmp)
    return new


def is_admin_key(raw: str, admin_key: str) -> bool:
    """Whether a presented bearer token is the admin key: both are hashed, then compared in constant
    time, so neither the secret's content nor its length shows in the timing.

    >>> is_admin_key("x" * 40, "x" * 40), is_admin_key("x" * 39, "x" * 40), is_admin_key("", "")
    (True, False, False)
    """
    if not admin_key:
        return False
    presented = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).digest()
    expected = hashlib.sha256(admin_key.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(presented, expected)


ADMIN_KEY_MIN_CHARS = 32


def validate_admin_key(raw: str) -> str:
    """The admin secret a user set (surrounding whitespace dropped); raises ``ValueError`` with one line
    saying why when it is too short or has spaces, control or non-ASCII characters. The message never
    contains the secret.

    >>> validate_admin_key("  " + "s" * 32 + "\\n") == "s" * 32
    True
    >>> validate_admin_key("hunter2")
    Traceback (most recent call last):
    ...
    ValueError: LLAMA_ORCH_ADMIN_KEY must be at least 32 characters (it has 7); use e.g. `openssl rand -hex 32`.
    """
    key = raw.strip()
    if len(key) < ADMIN_KEY_MIN_CHARS:
        raise ValueError(
            f"{ADMIN_KEY_ENV} must be at least {ADMIN_KEY_MIN_CHARS} characters (it has {len(key)}); "
            "use e.g. `openssl rand -hex 32`."
        )
    if not all("!" <= c <= "~" for c in key):
        raise ValueError(
            f"{ADMIN_KEY_ENV} must be printable ASCII without spaces or control characters "
            "(it is sent as an HTTP Bearer token)."
        )
    return key

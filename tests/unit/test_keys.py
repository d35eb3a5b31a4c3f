"""API keys: format, parsing, hashing, constant-time verification, and the admin key file."""

from __future__ import annotations

import hmac
import stat
import threading
from pathlib import Path

import pytest

from orch import keys
from orch.keys import (
    ADMIN_KEY_ENV,
    InvalidKey,
    generate_key,
    hash_secret,
    is_admin_key,
    load_or_create_admin_key,
    parse_key,
    validate_admin_key,
    verify,
)


def test_generated_key_has_the_sk_orch_id_secret_shape() -> None:
    key_id, raw = generate_key()
    prefix, orch, kid, secret = raw.split("-")
    assert (prefix, orch, kid) == ("sk", "orch", key_id)
    assert len(key_id) == 16 and len(secret) == 52  # 80 and 256 random bits
    assert parse_key(raw) == (key_id, secret)


def test_generated_keys_are_unique() -> None:
    pairs = [generate_key() for _ in range(1000)]
    assert len({k for k, _ in pairs}) == len({r for _, r in pairs}) == 1000


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "sk-other-abcdefghijklmnop-" + "a" * 52,
        "sk-orch-abcdefghijklmnop",
        "sk-orch-abcdefghijklmnop-short",
        "sk-orch-abcdefghijklmnop-" + "a" * 51 + "-",
        "sk-orch-ABCDEFGHIJKLMNOP-" + "a" * 52,
        "sk-orch-abc-" + "a" * 52,
        "sk-orch--" + "a" * 52,
        "Bearer sk-orch-abcdefghijklmnop-" + "a" * 52,
    ],
)
def test_parse_key_rejects_anything_else(raw: str) -> None:
    with pytest.raises(InvalidKey) as error:
        parse_key(raw)
    assert "aaaa" not in str(error.value)  # the message never echoes the key


def test_verify_accepts_the_key_and_rejects_any_other() -> None:
    key_id, raw = generate_key()
    stored = hash_secret(parse_key(raw)[1])
    assert verify(raw, stored)
    assert not verify(raw[:-1] + ("a" if raw[-1] != "a" else "b"), stored)
    assert not verify(generate_key()[1], stored)
    assert not verify("garbage", stored)


def test_stored_hash_is_not_the_secret() -> None:
    _, raw = generate_key()
    secret = parse_key(raw)[1]
    stored = hash_secret(secret)
    assert secret not in stored and len(stored) == 64


def test_verify_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    _, raw = generate_key()
    assert verify(raw, hash_secret(parse_key(raw)[1]))
    assert len(calls) == 1


def test_pepper_changes_the_hash_and_is_needed_to_verify() -> None:
    _, raw = generate_key()
    secret = parse_key(raw)[1]
    peppered = hash_secret(secret, pepper=b"server-side")
    assert peppered != hash_secret(secret)
    assert verify(raw, peppered, pepper=b"server-side")
    assert not verify(raw, peppered) and not verify(raw, peppered, pepper=b"another")
    assert verify(raw, hash_secret(secret), pepper=b"server-side")  # a key made before the pepper still works


def test_the_pepper_is_made_once_outside_the_database_and_kept_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(keys.PEPPER_ENV, raising=False)
    pepper = keys.load_or_create_pepper(tmp_path)
    assert len(pepper) == 32 and keys.load_or_create_pepper(tmp_path) == pepper
    assert stat.S_IMODE((tmp_path / keys.PEPPER_FILE).stat().st_mode) == 0o600
    monkeypatch.setenv(keys.PEPPER_ENV, "ab" * 32)
    assert keys.load_or_create_pepper(tmp_path) == b"\xab" * 32
    monkeypatch.setenv(keys.PEPPER_ENV, "ab" * 8)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        keys.load_or_create_pepper(tmp_path)


def test_admin_key_comes_from_the_environment_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = "my-own-secret-of-forty-characters-xxxxx"
    monkeypatch.setenv(ADMIN_KEY_ENV, f" {own}\n")
    assert load_or_create_admin_key(tmp_path) == own
    assert not (tmp_path / "admin_key").exists()


@pytest.mark.parametrize("bad", ["short-secret", "a" * 31, "a" * 20 + " " + "a" * 20, "a" * 40 + "\x07", "é" * 40])
def test_admin_key_from_the_environment_is_refused_in_one_line(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMIN_KEY_ENV, bad)
    with pytest.raises(ValueError) as error:
        load_or_create_admin_key(tmp_path)
    message = str(error.value)
    assert message.startswith(ADMIN_KEY_ENV + " must be") and "\n" not in message
    assert bad.strip() not in message  # never echoes the secret
    with pytest.raises(ValueError):
        validate_admin_key(bad)


def test_any_admin_secret_of_32_printable_characters_is_accepted() -> None:
    for secret in ("x" * 32, "0123456789abcdef" * 4, "Pa$$w0rd!-with_symbols.and~more/+=="):
        assert validate_admin_key(secret) == secret


def test_admin_key_is_generated_once_into_a_private_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    first = load_or_create_admin_key(tmp_path / "data")
    path = tmp_path / "data" / "admin_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_admin_key(tmp_path / "data") == first
    assert parse_key(first)[0] == "admin"
    assert [p.name for p in path.parent.iterdir()] == ["admin_key"]  # no temp file left behind


def test_racing_first_starts_agree_on_one_admin_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(load_or_create_admin_key(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1 and (tmp_path / "admin_key").read_text().strip() == found[0]


def test_admin_key_file_readable_by_others_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    load_or_create_admin_key(tmp_path)
    (tmp_path / "admin_key").chmod(0o644)
    with pytest.raises(PermissionError):
        load_or_create_admin_key(tmp_path)


def test_is_admin_key_matches_only_the_admin_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    admin = load_or_create_admin_key(tmp_path)
    assert is_admin_key(admin, admin)
    assert not is_admin_key(generate_key()[1], admin)
    assert not is_admin_key("", admin)
    assert not is_admin_key("", "")  # no admin key configured: nothing matches
    own = "my-own-secret-of-forty-characters-xxxxx"
    assert is_admin_key(own, own) and not is_admin_key(own[:-1], own) and not is_admin_key(own + "x", own)


def test_admin_key_comparison_hashes_both_sides_before_comparing(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    is_admin_key("short", "a-much-longer-admin-secret-of-40-chars-xx")
    assert [(len(a), len(b)) for a, b in compared] == [(32, 32)]  # equal lengths: the length never leaks

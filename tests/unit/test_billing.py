"""Pure billing logic: the hold bound, bearer parsing and the key cache over a fake key store."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest

from orch.billing import ADMIN, KeyCache, PromptLimits, bearer_token, hold_amount, prompt_token_bound
from orch.errors import Forbidden, InvalidRequest, Unauthorized
from orch.keys import generate_key, hash_secret, parse_key
from orch.ledger import Price, cost
from orch.protocol import GrantBody, parse_body, parse_usage_query
from orch.store import ApiKeyRecord

ADMIN_KEY = "sk-orch-admin-" + "a" * 52


def test_prompt_bound_counts_utf8_bytes_and_template_tokens() -> None:
    limits = PromptLimits(max_model_len=100, per_message_tokens=20, per_prompt_tokens=3)
    assert prompt_token_bound(limits, messages=["é"]) == 2 + 20
    assert prompt_token_bound(limits, prompt="abc") == 3 + 3
    assert prompt_token_bound(limits, prompt=[5] * 7) == 7
    assert prompt_token_bound(limits, messages=["x" * 500]) == 100  # longer prompts are refused anyway


def test_hold_covers_every_possible_outcome() -> None:
    rng = random.Random(7)
    for _ in range(300):
        price = Price(rng.randrange(0, 5_000_000), rng.randrange(0, 5_000_000))
        length = rng.randrange(16, 300)
        limits = PromptLimits(length, 10, 2)
        bound = rng.randrange(1, 400)
        max_tokens = rng.choice([None, rng.randrange(1, 400)])
        hold = hold_amount(price, limits, bound, max_tokens)
        top = min(bound, length)
        worst = max(
            cost(price, p, c) for p in range(0, top + 1) for c in [min(max_tokens or length, length - p)] if c >= 0
        )
        assert hold == worst  # exact worst case: never short, never more than needed


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer "):
        with pytest.raises(Unauthorized):
            bearer_token(bad)


class FakeKeyStore:
    """Stands in for the ledger's key table; counts fetches."""

    def __init__(self) -> None:
        self.records: dict[str, ApiKeyRecord] = {}
        self.fetches = 0

    def add(self, tenant: str, tap: str = "public") -> str:
        key_id, raw = generate_key()
        secret_hash = hash_secret(parse_key(raw)[1])
        self.records[key_id] = ApiKeyRecord(key_id, tenant, tap, secret_hash, datetime.now(UTC))
        return raw

    async def fetch(self, key_id: str) -> ApiKeyRecord | None:
        self.fetches += 1
        await asyncio.sleep(0.01)
        return self.records.get(key_id)


def test_key_cache_authenticates_caches_and_sees_revocation_after_ttl() -> None:
    store = FakeKeyStore()
    clock_value = [0.0]
    cache = KeyCache(store.fetch, ADMIN_KEY, ttl_s=5.0, clock=lambda: clock_value[0])
    raw = store.add("t-1")
    key_id = parse_key(raw)[0]

    async def scenario() -> None:
        principals = await asyncio.gather(*(cache.authenticate(raw, "public") for _ in range(50)))
        assert {p.tenant_id for p in principals} == {"t-1"}
        assert store.fetches == 1  # concurrent lookups share one fetch
        store.records[key_id] = store.records[key_id]._replace(revoked_at=datetime.now(UTC))
        clock_value[0] = 4.9
        assert (await cache.authenticate(raw, "public")).key_id == key_id  # still cached
        clock_value[0] = 5.1
        with pytest.raises(Unauthorized):
            await cache.authenticate(raw, "public")

    asyncio.run(scenario())


def test_key_cache_refuses_bad_keys_and_keys_of_other_taps() -> None:
    store = FakeKeyStore()
    cache = KeyCache(store.fetch, ADMIN_KEY)
    raw = store.add("t-1", tap="private-acme")

    async def scenario() -> None:
        with pytest.raises(Forbidden):
            await cache.authenticate(raw, "public")
        with pytest.raises(Unauthorized) as wrong_secret:
            await cache.authenticate(raw[:-4] + "aaaa", "private-acme")
        assert raw[:-4] not in wrong_secret.value.message
        for bad in ("sk-nope", "sk-orch-admin-" + "b" * 52, generate_key()[1]):
            with pytest.raises(Unauthorized):
                await cache.authenticate(bad, "public")
        assert await cache.authenticate(ADMIN_KEY, "public") is ADMIN

    asyncio.run(scenario())


def test_usage_query_and_admin_bodies() -> None:
    since, until, group_by = parse_usage_query({"since": "2026-11-01T10:00:00+02:00", "group_by": "model"})
    assert since == datetime(2026, 11, 1, 8, tzinfo=UTC) and until is None and group_by == "model"
    for bad in ({"since": "yesterday"}, {"group_by": "week"}, {"limit": "3"}):
        with pytest.raises(InvalidRequest) as err:
            parse_usage_query(bad)
        assert err.value.param == next(iter(bad))
    with pytest.raises(InvalidRequest) as err:
        parse_body(GrantBody, b'{"micro_credits": 5}')
    assert err.value.param == "idempotency_key"
    with pytest.raises(InvalidRequest) as err:
        parse_body(GrantBody, b'{"micro_credits": 1.5, "idempotency_key": "x"}')
    assert err.value.param == "micro_credits"


def test_a_cancelled_caller_does_not_cancel_others_sharing_its_lookup() -> None:
    store = FakeKeyStore()
    cache = KeyCache(store.fetch, ADMIN_KEY)
    raw = store.add("t-1")

    async def scenario() -> None:
        leader = asyncio.create_task(cache.authenticate(raw, "public"))
        follower = asyncio.create_task(cache.authenticate(raw, "public"))
        await asyncio.sleep(0)
        leader.cancel()
        assert (await follower).tenant_id == "t-1"
        assert store.fetches == 1

    asyncio.run(scenario())


def test_lone_surrogates_are_a_400_not_a_500() -> None:
    with pytest.raises(InvalidRequest) as err:
        prompt_token_bound(PromptLimits(100, 10, 2), messages=["\ud800"])
    assert err.value.param == "messages"

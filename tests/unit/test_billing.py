"""Pure billing logic: the hold bound, bearer parsing and the key cache over a fake key store."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest

from orch.billing import ADMIN, KeyCache, MissBudget, PromptLimits, bearer_token, hold_amount, prompt_token_bound
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


def test_key_cache_refreshes_a_busy_key_ahead_so_it_never_waits_for_the_ledger() -> None:
    store = FakeKeyStore()
    now = [0.0]
    cache = KeyCache(store.fetch, ADMIN_KEY, ttl_s=5.0, clock=lambda: now[0])
    raw = store.add("t-1")

    async def scenario() -> None:
        await cache.authenticate(raw, "public")
        for t in (1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 8.0, 9.5, 11.0):  # in use every 1-1.5 s, for two ttls
            now[0] = t
            before = store.fetches
            await cache.authenticate(raw, "public")
            # A call that waited for a lookup shows its fetch on return; a refresh ahead starts later.
            assert store.fetches == before, t
            await asyncio.sleep(0.02)  # the background refresh (10 ms) completes
        assert store.fetches == 5  # the first lookup and a refresh past each half ttl (at 3.0, 5.5, 8.0, 11.0)

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
    since, until, group_by, limit = parse_usage_query({"since": "2026-11-01T10:00:00+02:00", "group_by": "model"})
    assert since == datetime(2026, 11, 1, 8, tzinfo=UTC) and until is None and group_by == "model" and limit == 1000
    assert parse_usage_query({"limit": "20", "group_by": "day_model"})[2:] == ("day_model", 20)
    for bad in ({"since": "yesterday"}, {"group_by": "week"}, {"limit": "0"}, {"limit": "1001"}, {"limit": "2.5"},
                {"top": "3"}):  # fmt: skip
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


def _random_key() -> str:
    return generate_key()[1]  # well formed, with a key id no store has


def test_a_flood_of_unknown_key_ids_from_one_client_costs_at_most_its_miss_budget() -> None:
    store = FakeKeyStore()
    now = [0.0]
    budget = MissBudget(burst=20, per_s=2.0, total_burst=1000, total_per_s=100.0)
    cache = KeyCache(store.fetch, ADMIN_KEY, clock=lambda: now[0], max_misses=1000, miss_budget=budget)
    good = [store.add(f"t-{i}") for i in range(5)]

    async def scenario() -> None:
        for raw in good:
            await cache.authenticate(raw, "public", client="10.0.0.1")
        store.fetches = 0
        for i in range(10_000):
            with pytest.raises(Unauthorized):
                await cache.authenticate(_random_key(), "public", client="10.0.0.66")
            if i % 1000 == 0:  # good keys stay cached throughout: no fetch for them
                for raw in good:
                    assert (await cache.authenticate(raw, "public", client="10.0.0.1")).tap == "public"
        assert store.fetches <= budget.burst
        assert cache.refused == 10_000 - store.fetches
        # Another client's budget is its own, and the flooder's refills with time.
        with pytest.raises(Unauthorized):
            await cache.authenticate(_random_key(), "public", client="10.0.0.2")
        assert store.fetches == budget.burst + 1
        now[0] = 1.0
        with pytest.raises(Unauthorized):
            await cache.authenticate(_random_key(), "public", client="10.0.0.66")
        assert store.fetches == budget.burst + 2

    asyncio.run(scenario())


def test_misses_never_evict_known_keys() -> None:
    store = FakeKeyStore()
    cache = KeyCache(
        store.fetch, ADMIN_KEY, clock=lambda: 0.0, max_entries=10, max_misses=10,
        miss_budget=MissBudget(burst=10**6, total_burst=10**6),
    )  # fmt: skip
    good = store.add("t-1")

    async def scenario() -> None:
        await cache.authenticate(good, "public")
        for _ in range(500):  # many distinct clients, so no per-client budget stops them
            with pytest.raises(Unauthorized):
                await cache.authenticate(_random_key(), "public", client=str(random.random()))
        fetches = store.fetches
        assert (await cache.authenticate(good, "public")).tenant_id == "t-1"
        assert store.fetches == fetches

    asyncio.run(scenario())


def test_a_known_key_is_looked_up_again_after_the_ttl_even_when_its_client_budget_is_spent() -> None:
    store = FakeKeyStore()
    now = [0.0]
    cache = KeyCache(store.fetch, ADMIN_KEY, clock=lambda: now[0], miss_budget=MissBudget(burst=1, per_s=0.0))
    good = store.add("t-1")

    async def scenario() -> None:
        await cache.authenticate(good, "public", client="c")
        with pytest.raises(Unauthorized):
            await cache.authenticate(_random_key(), "public", client="c")
        now[0] = 10.0  # past the ttl: the known key is fetched again (a revocation must be seen)
        assert (await cache.authenticate(good, "public", client="c")).tenant_id == "t-1"
        assert store.fetches == 2

    asyncio.run(scenario())


def test_any_admin_secret_authenticates_without_a_lookup() -> None:
    store = FakeKeyStore()
    own = "a-user-chosen-admin-secret-of-40-chars-x"
    cache = KeyCache(store.fetch, own)

    async def scenario() -> None:
        assert await cache.authenticate(own, "public") is ADMIN
        for wrong in (own[:-1], own + "y", "sk-orch-admin-" + "a" * 52):
            with pytest.raises(Unauthorized):
                await cache.authenticate(wrong, "public")
        assert store.fetches == 0

    asyncio.run(scenario())


def test_forget_tap_drops_its_cached_keys_only() -> None:
    store = FakeKeyStore()
    cache = KeyCache(store.fetch, ADMIN_KEY)
    acme, other = store.add("t-1", tap="acme"), store.add("t-2", tap="public")

    async def scenario() -> None:
        await cache.authenticate(acme, "acme")
        await cache.authenticate(other, "public")
        assert cache.forget_tap("acme") == 1
        fetches = store.fetches
        await cache.authenticate(other, "public")
        assert store.fetches == fetches
        store.records[parse_key(acme)[0]] = store.records[parse_key(acme)[0]]._replace(revoked_at=datetime.now(UTC))
        with pytest.raises(Unauthorized):  # refetched at once, not after the ttl
            await cache.authenticate(acme, "acme")

    asyncio.run(scenario())


def test_a_prompt_longer_than_any_tokenisation_could_fit_is_refused_without_tokenising() -> None:
    limits = PromptLimits(max_model_len=2048, per_message_tokens=20, per_prompt_tokens=3, max_token_bytes=100)
    assert prompt_token_bound(limits, prompt="x" * 204_800) == 2048  # could still fit: the engine decides
    for prompt, messages, param in ((["x" * 204_801], None, "prompt"), (None, ["x" * 100_000] * 3, "messages")):
        with pytest.raises(InvalidRequest) as err:
            if messages is None:
                prompt_token_bound(limits, prompt=prompt[0])
            else:
                prompt_token_bound(limits, messages=messages)
        assert (err.value.status, err.value.param, err.value.code) == (400, param, "context_length_exceeded")
    with pytest.raises(InvalidRequest) as err:
        prompt_token_bound(limits, prompt=[1] * 2049)
    assert err.value.param == "prompt"


def test_a_lone_surrogate_in_a_plain_prompt_is_a_400_naming_prompt() -> None:
    with pytest.raises(InvalidRequest) as err:
        prompt_token_bound(PromptLimits(100, 10, 2), prompt="ok \udc80")
    assert (err.value.param, err.value.code) == ("prompt", "invalid_unicode")

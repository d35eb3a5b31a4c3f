"""Unit tests of orch.ratelimit's sliding windows (pure logic, a fake clock)."""

from __future__ import annotations

from orch.ratelimit import Limit, Policy, RateWindows, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_refused_request_counts_nowhere_and_the_window_slides() -> None:
    clock = Clock()
    windows = RateWindows(clock=clock)
    both = (Limit("key:k1", rpm=3), Limit("tenant:t", rpm=5))
    other_key = (Limit("key:k2", rpm=10), Limit("tenant:t", rpm=5))
    answers = []
    for i in range(4):
        answers.append(windows.take(both, 1, f"a{i}").ok)
        clock.now += 1
    assert answers == [True, True, True, False]  # the key's 3, not the tenant's 5
    assert [windows.take(other_key, 1, f"b{i}").ok for i in range(3)] == [True, True, False]  # 3 + 2 = 5
    refused = windows.take(both, 1, "late")
    assert not refused.ok and refused.retry_after_s == 56  # the first request, 4 s ago, leaves in 56 s
    assert "requests on key:k1" in refused.why and "try again in 56s" in refused.why
    clock.now += 56
    assert windows.take(both, 1, "after").ok  # a0 left both windows


def test_tokens_are_taken_at_their_bound_and_corrected_when_the_request_ends() -> None:
    clock = Clock()
    windows = RateWindows(clock=clock)
    limit = (Limit("tenant:t", tpm=1000),)
    first = windows.take(limit, 600, "r1")
    assert first.ok and first.remaining_tokens == 400 and first.limit_tokens == 1000
    assert not windows.take(limit, 600, "r2").ok  # 1200 > 1000 while r1 holds its bound
    windows.adjust("r1", 150)  # it used 150 of its 600
    second = windows.take(limit, 600, "r2")
    assert second.ok and second.remaining_tokens == 250
    too_large = windows.take(limit, 5000, "r3")
    assert not too_large.ok and "Request too large" in too_large.why
    windows.adjust("unknown", 10)  # a request that was never counted: nothing to correct


def test_the_headers_say_the_tightest_subjects_numbers_as_openai_does() -> None:
    clock = Clock()
    windows = RateWindows(clock=clock)
    limits = (Limit("key:k", rpm=10, tpm=10_000), Limit("tenant:t", rpm=4))
    decision = windows.take(limits, 100, "r1")
    headers = decision.headers()
    assert headers["x-ratelimit-limit-requests"] == "4"  # the tenant's limit leaves less
    assert headers["x-ratelimit-remaining-requests"] == "3"
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert headers["x-ratelimit-remaining-tokens"] == "9900"
    assert headers["x-ratelimit-reset-tokens"] == "1m0s"
    assert duration(0.004) == "4ms" and duration(59.25) == "59.25s" and duration(125) == "2m5s"


def test_subjects_without_limits_are_skipped_and_a_policy_makes_its_subjects() -> None:
    windows = RateWindows(clock=Clock())
    assert windows.take((Limit("key:k"),), 10, "r").ok  # no limit on either count: always
    policy = Policy(key_tpm=100, tenant_rpm=2)
    assert policy.limited and policy.limits("k", "t") == (Limit("key:k", None, 100), Limit("tenant:t", 2, None))
    assert not Policy(priority="batch").limited and Policy().limits("k", "t") == ()


def test_old_requests_are_forgotten_so_the_maps_stay_bounded() -> None:
    clock = Clock()
    windows = RateWindows(clock=clock, max_requests=10)
    for i in range(50):
        windows.take((Limit(f"key:{i}", rpm=100),), 1, f"r{i}")
        clock.now += 0.1
    assert len(windows._taken) <= 10
    clock.now += 61
    windows.take((Limit("key:x", rpm=1),), 1, "last")
    assert list(windows._taken) == ["last"]

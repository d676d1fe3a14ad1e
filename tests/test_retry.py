"""RetryPolicy: exponential backoff with full jitter, a cap, Retry-After as a floor."""

from __future__ import annotations

import random

import pytest

from worker.upload.retry import RetryPolicy

pytestmark = pytest.mark.timeout(30)


def policy(*, max_retries: int = 8, backoff: float = 1.0, backoff_max: float = 300.0, seed: int = 7) -> RetryPolicy:
    return RetryPolicy(max_retries=max_retries, backoff=backoff, backoff_max=backoff_max, rng=random.Random(seed))


@pytest.mark.parametrize(
    ("backoff", "backoff_max"),
    [(1.0, 300.0), (0.5, 10.0), (2.0, 3.0), (0.0, 5.0), (10.0, 10.0)],
)
def test_delays_stay_within_the_exponential_bound_and_the_cap(backoff: float, backoff_max: float) -> None:
    retry = policy(backoff=backoff, backoff_max=backoff_max)
    for attempts in range(1, 40):
        bound = min(backoff_max, backoff * 2 ** (attempts - 1))
        for _ in range(50):
            delay = retry.delay(attempts)
            assert 0.0 <= delay <= bound


def test_first_retry_bound_is_the_base() -> None:
    retry = policy(backoff=3.0, backoff_max=300.0)
    draws = [retry.delay(1) for _ in range(500)]
    assert max(draws) <= 3.0
    assert max(draws) > 2.5  # the whole range is used


def test_bound_doubles_until_the_cap() -> None:
    retry = policy(backoff=1.0, backoff_max=20.0)
    for attempts, bound in [(2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 20.0), (30, 20.0)]:
        draws = [retry.delay(attempts) for _ in range(400)]
        assert max(draws) <= bound
        assert max(draws) > 0.8 * bound


def test_highest_retry_count_allowed_by_the_settings_still_works() -> None:
    retry = policy(max_retries=100, backoff=3600.0, backoff_max=3600.0)
    assert 0.0 <= retry.delay(101) <= 3600.0


def test_full_jitter_spreads_the_delays() -> None:
    retry = policy(backoff=1.0, backoff_max=300.0)
    draws = [retry.delay(5) for _ in range(200)]
    assert len(set(draws)) > 190
    assert min(draws) < 2.0 < 14.0 < max(draws)  # bound is 16: low and high draws both occur


def test_same_seed_same_delays() -> None:
    first = [policy(seed=42).delay(n) for n in range(1, 10)]
    second = [policy(seed=42).delay(n) for n in range(1, 10)]
    assert first == second


def test_retry_after_is_a_floor() -> None:
    retry = policy(backoff=1.0, backoff_max=300.0)
    for _ in range(100):
        delay = retry.delay(1, retry_after=30.0)  # the jitter alone would be <= 1
        assert delay == 30.0
    for _ in range(100):
        delay = retry.delay(8, retry_after=30.0)  # bound 128: jitter may go above the floor
        assert 30.0 <= delay <= 128.0


def test_retry_after_is_capped_at_backoff_max() -> None:
    retry = policy(backoff=1.0, backoff_max=60.0)
    for attempts in (1, 3, 20):
        for _ in range(50):
            assert retry.delay(attempts, retry_after=3600.0) == 60.0


def test_retry_after_zero_changes_nothing() -> None:
    with_header = policy(seed=3)
    without = policy(seed=3)
    assert [with_header.delay(4, retry_after=0.0) for _ in range(20)] == [without.delay(4) for _ in range(20)]


@pytest.mark.parametrize(
    ("max_retries", "attempts", "exhausted"),
    [
        (0, 0, False),
        (0, 1, True),
        (0, 2, True),
        (3, 0, False),
        (3, 1, False),
        (3, 3, False),
        (3, 4, True),
        (3, 5, True),
    ],
)
def test_exhausted_boundaries(max_retries: int, attempts: int, exhausted: bool) -> None:
    assert policy(max_retries=max_retries).exhausted(attempts) is exhausted


def test_max_retries_three_allows_four_uploads() -> None:
    retry = policy(max_retries=3)
    uploads = 0
    while True:
        uploads += 1
        if retry.exhausted(uploads):
            break
    assert uploads == 4

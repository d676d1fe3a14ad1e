"""Several Netcore accounts from one worker, each isolated; one sick asset_id never holds up the others.

A real worker, the real RabbitMQ and a sandbox serving two keys (``default`` and ``brand-b``,
each its own account, with faults per account and per asset_id). Every test keeps a ledger:
ids sent = ids delivered + ids dead-lettered, nothing lost.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import DeadLetters, QueueSet, WorkerProcess, event, event_id_of, publish_events
from tests.integration.conftest import API_KEY
from worker.sandbox import Sandbox

#: brand-b's key, which the sandbox serves as an account of its own.
B_KEY = "brand-b-key-5e1f0c"
#: brand-b's asset_ids (every other asset_id is the default account's).
B_ASSETS = [f"b-{n}" for n in range(3)]
#: The longest interval between two probes of an API that is down, in these tests.
PROBE_MAX = 4.0


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(api_key=API_KEY, seed=7, accounts={"brand-b": B_KEY}) as sandbox:
        yield sandbox


@pytest.fixture
def accounts_env(worker_env: dict[str, str], sandbox: Sandbox, tmp_path: Path) -> dict[str, str]:
    """The worker's settings: ``default`` (NETCORE_API_KEY) and brand-b from an accounts file."""
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(f'[accounts.brand-b]\napi_key_env = "BRAND_B_KEY"\napi_url = "{sandbox.url}"\n'
                        f'asset_ids = {B_ASSETS!r}\n'.replace("'", '"'))
    return {"NETCORE_ACCOUNTS_FILE": str(accounts), "BRAND_B_KEY": B_KEY,
            "UPLOAD_PROBE_INTERVAL_MAX": str(PROBE_MAX), "ACTIVITY_BATCH_WAIT": "0.3"}


def publish(queues: QueueSet, prefix: str, count: int, assets: list[str]) -> list[str]:
    ids = [f"{prefix}{n}" for n in range(count)]
    payloads = [[event(i, asset_id=assets[n % len(assets)]) for n, i in enumerate(ids[start:start + 50])]
                for start in range(0, count, 50)]
    publish_events(queues.settings.queue, payloads)
    return ids


def delivered(sandbox: Sandbox, account: str | None = None) -> list[str | None]:
    return [event_id_of(e) for e in sandbox.accepted(account)]


def has_all(ids: list[str], account: str | None = None) -> Callable[[Sandbox], bool]:
    wanted = set(ids)

    def check(s: Sandbox) -> bool:
        return s.accepted_count(account) >= len(wanted) and wanted <= set(delivered(s, account))

    return check


def ledger_holds(sent: list[str], sandbox: Sandbox, dead: DeadLetters) -> None:
    seen = set(delivered(sandbox)) | set(dead.ids())
    assert set(sent) - seen == set(), "events lost"


def test_one_account_down_for_minutes_never_slows_the_other(
        start_worker: Callable[..., WorkerProcess], accounts_env: dict[str, str], queues: QueueSet,
        sandbox: Sandbox, dead_letters: DeadLetters) -> None:
    sandbox.add_fault(status=503, account="brand-b")  # brand-b's API is down, until cleared
    worker = start_worker(**accounts_env)
    b_ids = publish(queues, "b", 2000, B_ASSETS)
    a_ids = publish(queues, "a", 6000, [f"a-{n}" for n in range(7)])
    assert sandbox.wait_until(has_all(a_ids, "default"), timeout=90), "the healthy account was held up"
    assert sandbox.accepted_count("brand-b") == 0
    b_requests = [r for r in sandbox.requests() if r.account == "brand-b"]
    # brand-b's circuit opened: a few failures, then one probe per interval (at most 1 a second here)
    assert len(b_requests) <= 5 + 2 * len(B_ASSETS) + 20
    assert dead_letters.envelopes == []
    assert queues.depth(queues.settings.queue) == 0  # brand-b's events wait in its own queues, not in activities
    assert worker.wait_for_log("Account brand-b: its API looks down", 10)
    sandbox.clear_faults()  # brand-b's API is back
    assert sandbox.wait_until(has_all(b_ids, "brand-b"), timeout=60 + PROBE_MAX)
    dead_letters.settle(1.0)
    assert dead_letters.envelopes == []  # nothing dead-lettered in either account
    ledger_holds(a_ids + b_ids, sandbox, dead_letters)


def test_one_accounts_revoked_key_dead_letters_only_its_events_as_unauthorized(
        start_worker: Callable[..., WorkerProcess], accounts_env: dict[str, str], queues: QueueSet,
        sandbox: Sandbox, dead_letters: DeadLetters) -> None:
    sandbox.accounts["brand-b"] = "revoked-long-ago"  # the worker's key for brand-b is no longer valid
    start_worker(**accounts_env)
    b_ids = publish(queues, "b", 300, B_ASSETS)
    a_ids = publish(queues, "a", 1000, ["a-0", "a-1"])
    assert dead_letters.wait_for(len(b_ids), timeout=60)
    assert sandbox.wait_until(has_all(a_ids, "default"), timeout=60)
    dead_letters.settle(1.0)
    assert {e["reason"] for e in dead_letters.envelopes} == {"unauthorized"}
    assert sorted(dead_letters.ids()) == sorted(b_ids)
    assert {e["account"] for e in dead_letters.envelopes} == {"brand-b"}
    ledger_holds(a_ids + b_ids, sandbox, dead_letters)


@pytest.mark.parametrize("sick_first", [True, False], ids=["sick-alone-first", "sick-amid-traffic"])
def test_an_asset_id_failing_for_good_never_holds_up_the_others(
        start_worker: Callable[..., WorkerProcess], accounts_env: dict[str, str], queues: QueueSet,
        sandbox: Sandbox, dead_letters: DeadLetters, sick_first: bool) -> None:
    sandbox.add_fault(status=503, asset_id="sick")  # every upload of "sick" fails; the others go through
    worker = start_worker(**accounts_env)
    healthy_assets = [f"h-{n}" for n in range(7)]
    sent: list[str] = []
    if sick_first:
        sent += publish(queues, "s", 3000, ["sick"])
        assert worker.wait_for_log("asset_id=sick failed", 60)  # alone, with no sign of life: held
        before = publish(queues, "h", 2000, healthy_assets)
    else:
        before = publish(queues, "h", 1000, healthy_assets)
        sent += publish(queues, "s", 3000, ["sick"])
        before += publish(queues, "g", 1000, healthy_assets)
    sent += before
    # the healthy events are not delayed by more than one probe interval (and the batching wait)
    assert sandbox.wait_until(has_all(before), timeout=PROBE_MAX + 20)
    # the sick asset_id's batches follow the retry policy while the others succeed: dead-lettered
    # after UPLOAD_MAX_RETRIES (4 here), not after the 6-hour window meant for outages
    assert dead_letters.wait_for(3000, timeout=120)
    dead_letters.settle(1.0)
    assert {e["reason"] for e in dead_letters.envelopes} == {"retries_exhausted"}
    assert {e["asset_id"] for e in dead_letters.envelopes} == {"sick"}
    assert all(e["attempts"] == 5 for e in dead_letters.envelopes)
    ledger_holds(sent, sandbox, dead_letters)


def test_a_429_storm_without_retry_after_backs_off_exponentially_on_its_account_only(
        start_worker: Callable[..., WorkerProcess], accounts_env: dict[str, str], queues: QueueSet,
        sandbox: Sandbox, dead_letters: DeadLetters) -> None:
    sandbox.add_fault(status=429, account="brand-b")  # no Retry-After: the worker chooses how long to wait
    worker = start_worker(**accounts_env)
    b_ids = publish(queues, "b", 1000, B_ASSETS)
    assert sandbox.wait_until(lambda s: sum(r.status == 429 for r in s.requests()) >= 4, timeout=30)
    a_ids = publish(queues, "a", 3000, ["a-0", "a-1", "a-2"])
    assert sandbox.wait_until(has_all(a_ids, "default"), timeout=60)  # the other account flows meanwhile
    storm = [r.at for r in sandbox.requests() if r.account == "brand-b"]
    # each 429 paused the account twice as long as the one before, up to the cap: what the worker said
    waits = [float(w) for w in re.findall(r"Account brand-b: the API asked to slow down \(429\): its uploads "
                                          r"wait ([0-9.]+) s", worker.log())]
    assert len(waits) >= 3 and all(b == min(PROBE_MAX, 2 * a) for a, b in zip(waits, waits[1:])), waits
    # and did: the account's next request came only once the pause its last 429 started was over
    # (one upload in flight at a time: the account's adaptive limit starts at one, and a 429 never raises it)
    gaps = [later - earlier for earlier, later in zip(storm, storm[1:])]
    assert all(gap >= 0.9 * wait for gap, wait in zip(gaps, waits)), list(zip(gaps, waits))
    sandbox.clear_faults()
    assert sandbox.wait_until(has_all(b_ids, "brand-b"), timeout=PROBE_MAX * 3 + 30)
    dead_letters.settle(1.0)
    assert dead_letters.envelopes == []  # a rate limit spends no attempt
    ledger_holds(a_ids + b_ids, sandbox, dead_letters)


def test_an_account_held_to_a_rate_limit_delivers_everything_at_its_pace_while_the_other_flows(
        start_worker: Callable[..., WorkerProcess], accounts_env: dict[str, str], queues: QueueSet,
        sandbox: Sandbox, dead_letters: DeadLetters) -> None:
    # brand-b's API takes one upload a second and answers the rest 429 with Retry-After: 1, as a
    # rate-limited API does; batches of 100 make 20 uploads of brand-b's events, 20 s at the least
    sandbox.add_fault(status=429, retry_after=1, per_second=1, account="brand-b")
    start_worker(**accounts_env, ACTIVITY_BATCH_SIZE="100", UPLOAD_MAX_RETRIES="2")
    b_ids = publish(queues, "b", 2000, B_ASSETS)
    a_ids = publish(queues, "a", 2000, ["a-0", "a-1"])
    assert sandbox.wait_until(has_all(a_ids, "default"), timeout=60)
    assert sandbox.accepted_count("brand-b") < len(b_ids)  # the other account did not wait for brand-b's pace
    assert sandbox.wait_until(has_all(b_ids, "brand-b"), timeout=120)
    b_answers = [r.status for r in sandbox.requests() if r.account == "brand-b"]
    refused, taken = b_answers.count(429), b_answers.count(200)
    assert refused >= 1  # the limit was met: the worker went faster than one a second when it could
    # each 429 paused the account for its Retry-After: a few refusals per upload taken at most,
    # where a worker that ignored Retry-After would meet hundreds
    assert refused <= 2 * taken + 10, (refused, taken)
    dead_letters.settle(1.0)
    assert dead_letters.envelopes == []  # a rate limit spends no attempt (2 allowed here)
    ledger_holds(a_ids + b_ids, sandbox, dead_letters)


def test_an_asset_id_of_no_account_is_dead_lettered_unroutable_and_replayable(
        start_worker: Callable[..., WorkerProcess], accounts_env: dict[str, str], queues: QueueSet,
        sandbox: Sandbox, dead_letters: DeadLetters) -> None:
    env = {**accounts_env, "NETCORE_API_KEY": ""}  # no default account: brand-b only
    start_worker(**env)
    lost = publish(queues, "u", 20, ["nobody-owns-this"])
    b_ids = publish(queues, "b", 20, B_ASSETS)
    assert dead_letters.wait_for(20, timeout=30)
    assert sandbox.wait_until(has_all(b_ids, "brand-b"), timeout=30)
    dead_letters.settle(0.5)
    assert {e["reason"] for e in dead_letters.envelopes} == {"unroutable"}
    assert sorted(dead_letters.ids()) == sorted(lost)
    assert all(e["event"]["asset_id"] == "nobody-owns-this" for e in dead_letters.envelopes)  # whole: replayable
    ledger_holds(lost + b_ids, sandbox, dead_letters)



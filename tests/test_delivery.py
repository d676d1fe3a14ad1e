"""Delivering one batch: validation, bisection of rejections, retries, dead letters.

The API is a fake client answering from a script (a function of the events posted), the
broker a list, time a ManualClock and jitter a seeded Random: no network, no sleeping.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery

from worker import deadletter, jsonutil
from worker.clock import ManualClock
from worker.delivery import Delivery, Report
from worker.errors import Permanent, PublishError, Transient
from worker.messages import UPLOAD_TASK, upload_message
from worker.publisher import Outgoing
from worker.retry import RetryPolicy

pytestmark = pytest.mark.timeout(60)

DLQ = "activities.dead"
UPLOAD_QUEUE = "activities.upload"
ASSET = "asset-1"
#: The ManualClock's wall time, where every test starts.
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
NOW_TEXT = "2026-01-01T00:00:00Z"
ENVELOPE_KEYS = {"reason", "error", "event", "details", "asset_id", "attempts", "failed_at"}


def event(i: int, *, bad: bool = False, timestamp: str = "2025-12-31T18:00:00Z", **overrides: Any) -> dict[str, Any]:
    """A valid event numbered ``i``; ``bad`` marks it for the fake API to reject."""
    params: dict[str, Any] = {"i": i, "items": [{"sku": f"sku-{i}", "qty": 1}]}
    if bad:
        params["bad"] = True
    body: dict[str, Any] = {
        "activity_name": "Purchase",
        "asset_id": ASSET,
        "timestamp": timestamp,
        "activity_source": "web",
        "activity_params": params,
        "identity": f"user{i}@example.com",
    }
    body.update(overrides)
    return body


Script = Callable[[list[Any]], None]


def rejects_bad(events: list[Any]) -> None:
    """The API's answer: 400 for the whole request if any event in it is bad."""
    if any(e["activity_params"].get("bad") for e in events):
        raise Permanent("the API rejected the event (400 Bad Request)", reason="rejected", status=400, body='{"status":"fail"}')


def accepts(events: list[Any]) -> None:
    return None


class FakeClient:
    """Records every post; answers from ``script``."""

    def __init__(self, script: Script = accepts) -> None:
        self.script = script
        self.posts: list[list[Any]] = []
        self.delivered: list[Any] = []

    def post(self, events: Sequence[Any]) -> None:
        # the worker posts each event's JSON text, as received
        batch = [jsonutil.loads(e) if isinstance(e, str) else e for e in events]
        self.posts.append(batch)
        self.script(batch)
        self.delivered.extend(batch)


@dataclass
class RetryCall:
    asset_id: str
    events: list[Any]
    attempts: int
    countdown: float


@dataclass
class Harness:
    client: FakeClient
    clock: ManualClock
    policy: RetryPolicy
    published: list[list[Outgoing]] = field(default_factory=list)
    retries: list[RetryCall] = field(default_factory=list)
    delivery: Delivery = field(init=False)

    def __post_init__(self) -> None:
        self.delivery = Delivery(
            client=self.client,  # type: ignore[arg-type]
            policy=self.policy,
            publish=self.publish,
            retry_message=self.retry_message,
            dead_letter_queue=DLQ,
            clock=self.clock,
        )

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.published.append(list(messages))

    def retry_message(self, asset_id: str, events: list[Any], attempts: int, countdown: float) -> Outgoing:
        values = [jsonutil.loads(e) if isinstance(e, str) else e for e in events]
        self.retries.append(RetryCall(asset_id, values, attempts, countdown))
        return Outgoing(UPLOAD_QUEUE, jsonutil.dumps({"asset_id": asset_id, "events": events, "attempts": attempts}))

    def deliver(self, events: list[Any], attempts: int = 0, asset_id: str = ASSET) -> Report:
        # as the ingest step sends them: each event's JSON text
        texts = [jsonutil.dumps(e).decode("utf-8") for e in events]
        return self.delivery.deliver(asset_id, texts, attempts)

    @property
    def messages(self) -> list[Outgoing]:
        return [m for group in self.published for m in group]

    @property
    def dead_letters(self) -> list[dict[str, Any]]:
        return [jsonutil.loads(m.body) for m in self.messages if m.queue == DLQ]


def harness(script: Script = accepts, *, max_retries: int = 8, seed: int = 1) -> Harness:
    policy = RetryPolicy(max_retries=max_retries, backoff=1.0, backoff_max=300.0, rng=random.Random(seed))
    return Harness(FakeClient(script), ManualClock(), policy)


def key(e: dict[str, Any]) -> int:
    return e["activity_params"]["i"]


def check_envelope(body: dict[str, Any], reason: str, attempts: int) -> None:
    assert ENVELOPE_KEYS <= body.keys()
    assert body["reason"] == reason
    assert isinstance(body["error"], str) and body["error"]
    assert body["asset_id"] == ASSET
    assert body["attempts"] == attempts
    assert body["failed_at"] == NOW_TEXT
    assert isinstance(body["details"], dict)
    assert "raw" not in body


def check_adds_up(report: Report) -> None:
    assert report.delivered + sum(report.dead.values()) + report.retried == report.received


# --- success and rejections -------------------------------------------------------------------------


def test_all_good_one_request() -> None:
    h = harness()
    events = [event(i) for i in range(1000)]
    report = h.deliver(events)
    assert h.client.posts == [events]
    assert report.delivered == 1000
    assert report.requests == 1
    assert report.dead == {}
    assert report.retried == 0
    assert h.retries == []
    assert h.messages == []  # publish may be called, but with nothing to hand on
    check_adds_up(report)


def test_1000_events_3_rejected_are_isolated() -> None:
    bad = {17, 500, 999}
    events = [event(i, bad=i in bad) for i in range(1000)]
    original = copy.deepcopy(events)
    h = harness(rejects_bad)
    report = h.deliver(events)

    assert report.delivered == 997
    assert report.dead == {"rejected": 3}
    assert report.retried == 0
    assert report.requests == len(h.client.posts)
    assert report.requests <= 2 * 3 * 10 + 1
    assert all(1 <= len(p) <= 1000 for p in h.client.posts)
    assert all({e["asset_id"] for e in p} == {ASSET} for p in h.client.posts)
    # every good event delivered exactly once, no bad one
    assert sorted(key(e) for e in h.client.delivered) == [i for i in range(1000) if i not in bad]

    letters = h.dead_letters
    assert sorted(key(b["event"]) for b in letters) == sorted(bad)
    for body in letters:
        check_envelope(body, "rejected", attempts=1)
        assert body["event"] == original[key(body["event"])]
        assert body["details"]["status"] == 400
        assert body["details"]["response"] == '{"status":"fail"}'
    assert all(m.headers[deadletter.REASON_HEADER] == "rejected" for m in h.messages)
    assert len(h.published) == 1  # one confirmed group for the whole batch
    assert events == original  # nothing was changed on the way
    check_adds_up(report)


def test_all_rejected_in_a_batch_of_8() -> None:
    events = [event(i, bad=True) for i in range(8)]
    h = harness(rejects_bad)
    report = h.deliver(events)
    assert report.delivered == 0
    assert report.dead == {"rejected": 8}
    assert report.requests == 1 + 2 + 4 + 8
    assert sorted(key(b["event"]) for b in h.dead_letters) == list(range(8))
    assert h.client.delivered == []
    check_adds_up(report)


@pytest.mark.parametrize("seed", range(12))
def test_bisection_bound_and_accounting_random(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 1000)
    k = rng.randint(0, min(n, 6))
    bad = set(rng.sample(range(n), k))
    events = [event(i, bad=i in bad) for i in range(n)]
    h = harness(rejects_bad)
    report = h.deliver(events)
    assert report.requests <= 2 * k * max(1, math.ceil(math.log2(n))) + 1
    assert sorted(key(e) for e in h.client.delivered) == sorted(set(range(n)) - bad)
    assert sorted(key(b["event"]) for b in h.dead_letters) == sorted(bad)
    check_adds_up(report)


def test_413_splits_then_refuses_the_one_too_big() -> None:
    def too_big(events: list[Any]) -> None:
        if any(e["activity_params"].get("huge") for e in events):
            raise Permanent("the API refused the request (413)", reason="refused", status=413)

    events = [event(i) for i in range(6)]
    events[4]["activity_params"]["huge"] = "x"
    h = harness(too_big)
    report = h.deliver(events)
    assert report.delivered == 5
    assert report.dead == {"refused": 1}
    (body,) = h.dead_letters
    assert key(body["event"]) == 4
    assert body["details"]["status"] == 413


def test_401_dead_letters_every_event_after_one_request() -> None:
    def unauthorized(events: list[Any]) -> None:
        raise Permanent("the API refused the API key (401 Unauthorized)", reason="unauthorized", status=401, body="")

    events = [event(i) for i in range(50)]
    h = harness(unauthorized)
    report = h.deliver(events)
    assert len(h.client.posts) == 1
    assert report.requests == 1
    assert report.dead == {"unauthorized": 50}
    letters = h.dead_letters
    assert [b["event"] for b in letters] == events
    for body in letters:
        check_envelope(body, "unauthorized", attempts=1)
        assert body["details"]["status"] == 401
    assert h.retries == []


@pytest.mark.parametrize("status", [403, 404, 405, 422])
def test_other_permanent_statuses_are_refused_without_splitting(status: int) -> None:
    def refuse(events: list[Any]) -> None:
        raise Permanent(f"the API refused the request ({status})", reason="refused", status=status)

    h = harness(refuse)
    report = h.deliver([event(i) for i in range(10)])
    assert report.requests == 1
    assert report.dead == {"refused": 10}


# --- transient failures -----------------------------------------------------------------------------


def _unavailable(retry_after: float | None = None) -> Script:
    def script(events: list[Any]) -> None:
        raise Transient("the API answered 503", status=503, body="busy", retry_after=retry_after)

    return script


@pytest.mark.parametrize("attempts", [0, 1, 5])
def test_transient_schedules_one_retry_with_attempts_plus_one(attempts: int) -> None:
    events = [event(i) for i in range(20)]
    original = copy.deepcopy(events)
    h = harness(_unavailable())
    report = h.deliver(events, attempts=attempts)
    (retry,) = h.retries
    assert retry.asset_id == ASSET
    assert retry.attempts == attempts + 1
    assert sorted(retry.events, key=key) == original
    assert 0.0 <= retry.countdown <= min(300.0, 2.0**attempts)
    assert report.retried == 20
    assert report.dead == {}
    assert report.requests == 1
    assert h.dead_letters == []
    (message,) = h.messages
    assert message.queue == UPLOAD_QUEUE
    check_adds_up(report)


def test_transient_honours_retry_after() -> None:
    h = harness(_unavailable(retry_after=42.0))
    h.deliver([event(0)])
    (retry,) = h.retries
    assert retry.countdown >= 42.0


def test_transient_during_bisection_retries_only_what_is_left() -> None:
    bad = {3, 40}
    calls = {"n": 0}

    def flaky(events: list[Any]) -> None:
        calls["n"] += 1
        if calls["n"] > 4:
            raise Transient("the API answered 502", status=502)
        rejects_bad(events)

    events = [event(i, bad=i in bad) for i in range(64)]
    h = harness(flaky)
    report = h.deliver(events)
    (retry,) = h.retries
    delivered = {key(e) for e in h.client.delivered}
    dead = {key(b["event"]) for b in h.dead_letters}
    retried = [key(e) for e in retry.events]
    assert len(retried) == len(set(retried))
    # every event lands in exactly one place
    assert sorted([*delivered, *dead, *retried]) == list(range(64))
    assert not delivered & bad
    check_adds_up(report)


def test_exhausted_retries_dead_letter_every_event() -> None:
    events = [event(i) for i in range(5)]
    h = harness(_unavailable(), max_retries=3)
    report = h.deliver(events, attempts=3)  # the 4th upload: no retry left
    assert h.retries == []
    assert report.dead == {"retries_exhausted": 5}
    assert report.retried == 0
    letters = h.dead_letters
    assert [b["event"] for b in letters] == events
    for body in letters:
        check_envelope(body, "retries_exhausted", attempts=4)
        assert body["details"]["status"] == 503
        assert body["details"]["response"] == "busy"
        assert "4" in body["error"]
    check_adds_up(report)


def test_last_retry_left_is_still_scheduled() -> None:
    h = harness(_unavailable(), max_retries=3)
    h.deliver([event(0)], attempts=2)  # the 3rd upload fails: one retry is left
    (retry,) = h.retries
    assert retry.attempts == 3
    assert h.dead_letters == []


def test_no_retries_at_all() -> None:
    h = harness(_unavailable(), max_retries=0)
    report = h.deliver([event(0), event(1)])
    assert report.dead == {"retries_exhausted": 2}
    assert h.retries == []


# --- validation -------------------------------------------------------------------------------------


def test_invalid_events_are_dead_lettered_before_any_request() -> None:
    good = [event(i) for i in range(4)]
    wrong_source = event(100, activity_source="WEB")
    nobody = event(101)
    del nobody["identity"]
    empty_array = event(102)
    empty_array["activity_params"]["tags"] = []
    bad_date = event(103, timestamp="2021-02-30T10:00:00Z")
    invalid = [wrong_source, nobody, empty_array, bad_date]
    events = [good[0], wrong_source, good[1], nobody, empty_array, good[2], bad_date, good[3]]
    original = copy.deepcopy(events)

    h = harness()
    report = h.deliver(events)

    assert h.client.posts == [good]  # invalid ones never posted
    assert report.invalid == 4
    assert report.delivered == 4
    assert report.dead == {"invalid": 4}
    letters = h.dead_letters
    assert [b["event"] for b in letters] == invalid
    for body in letters:
        check_envelope(body, "invalid", attempts=0)
        assert body["details"]  # the field errors
    by_key = {key(b["event"]): b for b in letters}
    assert "activity_source" in by_key[100]["details"]
    assert "activity_params" in by_key[102]["details"]
    assert "timestamp" in by_key[103]["details"]
    assert "activity_source" in by_key[100]["error"]
    assert events == original
    check_adds_up(report)


def test_only_invalid_events_means_no_request() -> None:
    h = harness()
    report = h.deliver([event(i, activity_source="WEB") for i in range(3)])
    assert h.client.posts == []
    assert report.requests == 0
    assert report.dead == {"invalid": 3}


def test_invalid_and_transient_together() -> None:
    h = harness(_unavailable())
    report = h.deliver([event(0), event(1, activity_source="App")])
    assert report.dead == {"invalid": 1}
    (retry,) = h.retries
    assert [key(e) for e in retry.events] == [0]
    check_adds_up(report)


def test_invalid_event_error_does_not_echo_the_identity() -> None:
    h = harness()
    h.deliver([event(0, activity_source="WEB", identity="secret.person@example.com")])
    (message,) = h.messages
    body = jsonutil.loads(message.body)
    assert "secret.person@example.com" not in body["error"]
    assert "secret.person@example.com" not in jsonutil.dumps(body["details"]).decode()
    assert body["event"]["identity"] == "secret.person@example.com"  # the event itself is kept whole


# --- stale events -----------------------------------------------------------------------------------


def test_stale_events_are_counted_and_still_sent(caplog: pytest.LogCaptureFixture) -> None:
    two_days_ago = (NOW - timedelta(days=2)).isoformat().replace("+00:00", "Z")
    just_a_day = (NOW - timedelta(hours=24)).isoformat().replace("+00:00", "Z")
    events = [
        event(0, timestamp=two_days_ago),
        event(1, timestamp="2025-12-30T05:30:00+05:30"),  # 2025-12-30T00:00Z: two days
        event(2, timestamp=just_a_day),  # exactly 24 hours: not yet stale
        event(3),
    ]
    h = harness()
    with caplog.at_level(logging.WARNING, logger="worker.delivery"):
        report = h.deliver(events)
    assert report.stale == 2
    assert report.delivered == 4
    assert h.client.posts == [events]
    assert any("older than 24 hours" in r.getMessage() for r in caplog.records)


def test_stale_is_measured_on_the_clock() -> None:
    h = harness()
    h.clock.advance(3 * 86400)
    report = h.deliver([event(0)])  # 2025-12-31T18:00Z, now 2026-01-04
    assert report.stale == 1


# --- publishing -------------------------------------------------------------------------------------


def test_publish_failure_propagates() -> None:
    h = harness(rejects_bad)

    def refuse(messages: Sequence[Outgoing]) -> None:
        raise PublishError("no confirm")

    h.delivery.publish = refuse
    with pytest.raises(PublishError):
        h.deliver([event(0, bad=True), event(1)])


def test_dead_letters_and_retry_go_out_in_one_group() -> None:
    bad = {0}
    calls = {"n": 0}

    def flaky(events: list[Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # [0..3] 400, [0,1] 400, [0] 400, then [1] fails
            raise Transient("the API answered 500", status=500)
        rejects_bad(events)

    h = harness(flaky)
    h.deliver([event(i, bad=i in bad) for i in range(4)])
    assert len(h.published) == 1
    queues = sorted(m.queue for m in h.published[0])
    assert queues == [DLQ, UPLOAD_QUEUE]


def test_failed_at_follows_the_clock() -> None:
    h = harness(rejects_bad)
    h.clock.advance(90)
    h.deliver([event(0, bad=True)])
    (body,) = h.dead_letters
    assert body["failed_at"] == "2026-01-01T00:01:30Z"


def test_with_the_real_upload_message() -> None:
    """The retry message built by the project's own builder (no broker needed to build it)."""
    app = Celery("test-delivery", set_as_current=False)
    policy = RetryPolicy(max_retries=8, backoff=1.0, backoff_max=300.0, rng=random.Random(5))
    published: list[Outgoing] = []
    delivery = Delivery(
        client=FakeClient(_unavailable()),  # type: ignore[arg-type]
        policy=policy,
        publish=published.extend,
        retry_message=lambda a, e, n, c: upload_message(app, UPLOAD_QUEUE, a, e, n, c),
        dead_letter_queue=DLQ,
        clock=ManualClock(),
    )
    events = [event(i) for i in range(3)]
    delivery.deliver(ASSET, events, 2)
    (message,) = published
    assert message.queue == UPLOAD_QUEUE
    assert message.headers["task"] == UPLOAD_TASK
    args, kwargs, _ = jsonutil.loads(message.body)
    assert args[0] == ASSET
    assert sorted((jsonutil.loads(t) for t in args[1]), key=key) == events  # as JSON texts
    assert args[2] == 3
    assert "sku-" not in message.headers.get("argsrepr", "")  # Flower shows a summary only


def test_event_texts_are_forwarded_exactly_as_received() -> None:
    texts = ['{"asset_id":"asset-1", "activity_name":"Purchase","timestamp":"2026-01-01T00:00:00Z",'
             '"identity":7,"activity_source":"app","activity_params":{"price":250.10,"n":1E2}}']
    posted: list[Sequence[Any]] = []

    class Recorder(FakeClient):
        def post(self, events: Sequence[Any]) -> None:
            posted.append(list(events))

    h = harness()
    h.delivery.client = Recorder()  # type: ignore[assignment]
    report = h.delivery.deliver(ASSET, texts, 0)
    assert report.delivered == 1
    assert posted == [texts]  # "250.10" and "1E2" untouched: no re-encoding


@pytest.mark.parametrize(
    ("text", "problem"),
    [('{"asset_id":"asset-1","asset_id":"asset-2"}', "duplicate_key"), ('{"n": 1', "not_json")],
)
def test_event_text_that_only_the_strict_parser_refuses_is_dead_lettered_malformed(text: str, problem: str) -> None:
    h = harness()
    report = h.delivery.deliver(ASSET, [text], 0)
    assert report.delivered == 0 and h.client.posts == []
    (dead,) = [jsonutil.loads(m.body) for m in h.messages]
    assert dead["reason"] == "malformed" and dead["raw"] == text and dead["event"] is None
    assert dead["details"]["problem"] == problem

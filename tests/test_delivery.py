"""Delivering one bundle: validation, bisection of rejections, retries in delay queues, the circuit.

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

from config.settings import Settings
from worker.broker.messages import UPLOAD_TASK, Bundle, UploadBatch, read_bundle, upload_message
from worker.broker.publisher import Outgoing
from worker.broker.topology import Topology
from worker.clock import ManualClock
from worker.errors import PublishError, Refused, Rejected, Transient, Unauthorized
from worker.events import jsonutil
from worker.upload.circuit import ASSET_FAILURES_TO_HOLD, Circuit, Permit, State
from worker.upload.concurrency import AdaptiveConcurrency
from worker.upload.delivery import Delivery, Report
from worker.upload.retry import RetryPolicy

pytestmark = pytest.mark.timeout(60)

ASSET = "asset-1"
#: The ManualClock's wall time, where every test starts.
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
NOW_TEXT = "2026-01-01T00:00:00Z"
ENVELOPE_KEYS = {"reason", "error", "event", "details", "asset_id", "attempts", "failed_at"}
SETTINGS = Settings.from_env({"UPLOAD_RETRY_BACKOFF": "1", "UPLOAD_RETRY_BACKOFF_MAX": "300",
                              "NETCORE_API_KEY": "k"}, require_api=False)
TOPOLOGY = Topology.of(SETTINGS)
DLQ = TOPOLOGY.dead_letter
UPLOAD_QUEUE = TOPOLOGY.upload


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
        raise Rejected("the API rejected the event (400 Bad Request)", status=400,
                        body='{"status":"fail"}')


def accepts(events: list[Any]) -> None:
    return None


def unavailable(retry_after: float | None = None, status: int = 503) -> Script:
    def script(events: list[Any]) -> None:
        raise Transient(f"the API answered {status}", status=status, body="busy", retry_after=retry_after)

    return script


class FakeClient:
    """Records every post; answers from ``script``."""

    def __init__(self, script: Script = accepts) -> None:
        self.script = script
        self.posts: list[list[Any]] = []
        self.delivered: list[Any] = []

    def post(self, events: Sequence[Any]) -> None:
        batch = [jsonutil.loads(e) if isinstance(e, str) else e for e in events]
        self.posts.append(batch)
        self.script(batch)
        self.delivered.extend(batch)


@dataclass
class Harness:
    client: FakeClient
    clock: ManualClock
    policy: RetryPolicy
    circuit: Circuit
    published: list[list[Outgoing]] = field(default_factory=list)
    delivery: Delivery = field(init=False)

    def __post_init__(self) -> None:
        app = Celery("test-delivery", set_as_current=False)
        self.delivery = Delivery(
            client=self.client,
            circuit=self.circuit,
            concurrency=AdaptiveConcurrency(ceiling=8, clock=self.clock),
            policy=self.policy,
            topology=TOPOLOGY,
            publish=self.publish,
            retry_message=lambda queue, bundle: upload_message(app, queue, bundle),
            clock=self.clock,
        )

    def publish(self, messages: Sequence[Outgoing]) -> None:
        self.published.append(list(messages))

    def deliver(self, events: list[Any], attempts: int = 0, *, since: float | None = None,
                replays: list[int] | None = None, batch_id: str = "b1") -> Report:
        # as the ingest step sends them: each event's JSON text
        texts = [jsonutil.dumps(e).decode("utf-8") for e in events]
        batch = UploadBatch(ASSET, texts, attempts, since, replays, batch_id)
        return self.delivery.deliver(Bundle([batch], "default"))

    def api_works(self) -> None:
        """Another asset_id's upload went through just now: the API works (failures count)."""
        self.circuit.succeeded(Permit("another-asset"))

    @property
    def messages(self) -> list[Outgoing]:
        return [m for group in self.published for m in group]

    @property
    def dead_letters(self) -> list[dict[str, Any]]:
        return [jsonutil.loads(m.body) for m in self.messages if m.queue == DLQ]

    @property
    def retries(self) -> list[tuple[str, UploadBatch]]:
        """(queue, batch) of every batch put back."""
        out = []
        for message in self.messages:
            if message.queue != DLQ:
                args, _, _ = jsonutil.loads(message.body)
                out += [(message.queue, batch) for batch in read_bundle(args).batches]
        return out


def harness(script: Script = accepts, *, max_retries: int = 8, seed: int = 1, window: float = 6 * 3600) -> Harness:
    clock = ManualClock(wall=NOW)
    policy = RetryPolicy(max_retries=max_retries, backoff=1.0, backoff_max=300.0, window=window,
                         rng=random.Random(seed))
    return Harness(FakeClient(script), clock, policy, Circuit(clock=clock, probe_base=1.0, probe_max=60.0))


def key(e: dict[str, Any]) -> int:
    return e["activity_params"]["i"]


def events_of(batch: UploadBatch) -> list[Any]:
    return [jsonutil.loads(t) for t in batch.events]


def delay_of(queue: str) -> float:
    """Seconds a retry published to ``queue`` waits (0: straight to the upload queue)."""
    return 0.0 if queue == UPLOAD_QUEUE else int(queue.rsplit(".", 1)[1].removesuffix("ms")) / 1000


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
    assert report.delivered + sum(report.dead.values()) + report.retried + report.held == report.received


# --- success and rejections -------------------------------------------------------------------------


def test_all_good_one_request() -> None:
    h = harness()
    events = [event(i) for i in range(1000)]
    report = h.deliver(events)
    assert h.client.posts == [events]
    assert (report.delivered, report.requests, dict(report.dead), report.retried) == (1000, 1, {}, 0)
    assert h.messages == []
    check_adds_up(report)


def test_1000_events_3_rejected_are_isolated() -> None:
    bad = {17, 500, 999}
    events = [event(i, bad=i in bad) for i in range(1000)]
    original = copy.deepcopy(events)
    h = harness(rejects_bad)
    report = h.deliver(events)

    assert report.delivered == 997
    assert report.dead == {"rejected": 3}
    assert report.requests == len(h.client.posts) <= 2 * 3 * 10 + 1
    assert sorted(key(e) for e in h.client.delivered) == [i for i in range(1000) if i not in bad]
    letters = h.dead_letters
    assert sorted(key(b["event"]) for b in letters) == sorted(bad)
    for body in letters:
        check_envelope(body, "rejected", attempts=1)
        assert body["event"] == original[key(body["event"])]
        assert body["details"] == {"status": 400, "response": '{"status":"fail"}'}
    assert len(h.published) == 1  # one confirmed group for the whole bundle
    assert events == original
    assert h.circuit.state is State.CLOSED  # a 400 is an answer: the API is up
    check_adds_up(report)


def test_all_rejected_in_a_batch_of_8() -> None:
    h = harness(rejects_bad)
    report = h.deliver([event(i, bad=True) for i in range(8)])
    assert report.dead == {"rejected": 8}
    assert report.requests == 1 + 2 + 4 + 8
    assert h.client.delivered == []


@pytest.mark.parametrize("seed", range(12))
def test_bisection_bound_and_accounting_random(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 1000)
    k = rng.randint(0, min(n, 6))
    bad = set(rng.sample(range(n), k))
    h = harness(rejects_bad)
    report = h.deliver([event(i, bad=i in bad) for i in range(n)])
    assert report.requests <= 2 * k * max(1, math.ceil(math.log2(n))) + 1
    assert sorted(key(e) for e in h.client.delivered) == sorted(set(range(n)) - bad)
    assert sorted(key(b["event"]) for b in h.dead_letters) == sorted(bad)
    check_adds_up(report)


def test_413_splits_then_refuses_the_one_too_big() -> None:
    def too_big(events: list[Any]) -> None:
        if any(e["activity_params"].get("huge") for e in events):
            raise Refused("the API refused the request (413)", status=413)

    events = [event(i) for i in range(6)]
    events[4]["activity_params"]["huge"] = "x"
    h = harness(too_big)
    report = h.deliver(events)
    assert report.delivered == 5 and report.dead == {"refused": 1}
    (body,) = h.dead_letters
    assert key(body["event"]) == 4 and body["details"]["status"] == 413


def test_401_dead_letters_every_event_after_one_request() -> None:
    def unauthorized(events: list[Any]) -> None:
        raise Unauthorized("the API refused the API key (401 Unauthorized)", status=401)

    events = [event(i) for i in range(50)]
    h = harness(unauthorized)
    report = h.deliver(events)
    assert report.requests == 1 and report.dead == {"unauthorized": 50}
    assert [b["event"] for b in h.dead_letters] == events
    for body in h.dead_letters:
        check_envelope(body, "unauthorized", attempts=1)


@pytest.mark.parametrize("status", [403, 404, 405, 422])
def test_other_permanent_statuses_are_refused_without_splitting(status: int) -> None:
    def refuse(events: list[Any]) -> None:
        raise Refused(f"the API refused the request ({status})", status=status)

    h = harness(refuse)
    report = h.deliver([event(i) for i in range(10)])
    assert report.requests == 1 and report.dead == {"refused": 10}


# --- transient failures: retries wait in delay queues -----------------------------------------------


@pytest.mark.parametrize("attempts", [0, 1, 5])
def test_transient_puts_the_batch_in_a_delay_queue_with_attempts_plus_one(attempts: int) -> None:
    events = [event(i) for i in range(20)]
    h = harness(unavailable())
    h.api_works()
    report = h.deliver(events, attempts=attempts, since=NOW.timestamp() - 5 if attempts else None)
    ((queue, batch),) = h.retries
    assert batch.attempts == attempts + 1
    assert batch.id == "b1"  # the same batch, across its retries
    assert batch.since == (NOW.timestamp() - 5 if attempts else h.clock.now().timestamp())  # the window's start
    assert events_of(batch) == events
    assert queue.startswith(UPLOAD_QUEUE + ".delay.") or queue == UPLOAD_QUEUE
    assert delay_of(queue) <= min(300.0, 2.0**attempts)  # full jitter under the bound, rounded down
    assert report.retried == 20 and report.dead == {} and report.requests == 1
    check_adds_up(report)


def test_transient_honours_retry_after_as_a_floor() -> None:
    h = harness(unavailable(retry_after=42.0, status=503))
    h.deliver([event(0)])
    ((queue, _),) = h.retries
    assert delay_of(queue) >= 42.0


def test_transient_during_bisection_retries_only_what_is_left() -> None:
    bad = {3, 40}
    calls = {"n": 0}

    def flaky(events: list[Any]) -> None:
        calls["n"] += 1
        if calls["n"] > 4:
            raise Transient("the API answered 502", status=502)
        rejects_bad(events)

    h = harness(flaky)
    report = h.deliver([event(i, bad=i in bad) for i in range(64)])
    ((_, batch),) = h.retries
    delivered = {key(e) for e in h.client.delivered}
    dead = {key(b["event"]) for b in h.dead_letters}
    retried = [key(e) for e in events_of(batch)]
    assert len(retried) == len(set(retried))
    assert sorted([*delivered, *dead, *retried]) == list(range(64))  # each event in exactly one place
    assert not delivered & bad
    check_adds_up(report)


def test_exhausted_retries_dead_letter_every_event() -> None:
    events = [event(i) for i in range(5)]
    h = harness(unavailable(), max_retries=3)
    h.api_works()
    report = h.deliver(events, attempts=3, since=NOW.timestamp() - 1)  # the 4th upload: no retry left
    assert h.retries == []
    assert report.dead == {"retries_exhausted": 5}
    assert [b["event"] for b in h.dead_letters] == events
    for body in h.dead_letters:
        check_envelope(body, "retries_exhausted", attempts=4)
        assert body["details"] == {"status": 503, "response": "busy"}
        assert "4 failed attempts" in body["error"]
    check_adds_up(report)


def test_last_retry_left_is_still_scheduled() -> None:
    h = harness(unavailable(), max_retries=3)
    h.api_works()
    h.deliver([event(0)], attempts=2, since=NOW.timestamp() - 1)
    ((_, batch),) = h.retries
    assert batch.attempts == 3 and h.dead_letters == []


def test_the_retry_window_gives_up_whatever_the_attempts() -> None:
    h = harness(unavailable(), window=3600)
    report = h.deliver([event(0), event(1)], attempts=1, since=NOW.timestamp() - 3600)
    assert h.retries == [] and report.dead == {"retries_exhausted": 2}
    assert "UPLOAD_RETRY_WINDOW" in h.dead_letters[0]["error"]


def test_a_429_spends_no_attempt_and_pauses_every_upload() -> None:
    h = harness(unavailable(retry_after=30.0, status=429), max_retries=0)
    h.api_works()
    report = h.deliver([event(0)])
    ((queue, batch),) = h.retries
    assert batch.attempts == 0  # a rate limit is about the API, not the batch
    assert report.dead == {} and report.held == 1
    assert delay_of(queue) >= 30.0
    assert h.circuit.state is State.PAUSED and h.circuit.permit("x") is None  # no other upload starts
    h.clock.advance(30)
    assert h.circuit.poll() is State.HALF_OPEN


def test_a_429_without_retry_after_backs_off_exponentially_and_spends_no_attempt() -> None:
    h = harness(unavailable(status=429), max_retries=0)
    h.api_works()
    pauses = []
    for _ in range(6):
        h.deliver([event(0)])
        pauses.append(round(h.circuit.wait_left(), 3))
        h.clock.advance(h.circuit.wait_left())
        assert h.circuit.poll() is State.HALF_OPEN
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # not every 0.8 s: the API asked to slow down
    assert all(batch.attempts == 0 for _, batch in h.retries) and h.dead_letters == []


# --- counted or not: does the API work? ---------------------------------------------------------------


def test_a_failure_with_no_sign_of_life_from_the_api_spends_no_attempt() -> None:
    h = harness(unavailable(), max_retries=0)
    report = h.deliver([event(0)])  # nothing succeeded yet: it may be an outage
    ((_, batch),) = h.retries
    assert batch.attempts == 0 and report.held == 1 and h.dead_letters == []


def test_a_failure_counts_once_the_api_accepted_another_upload_after_the_batch_first_failed() -> None:
    h = harness(unavailable(), max_retries=2)
    h.deliver([event(0)])  # nothing went through yet: maybe an outage
    ((_, first),) = h.retries
    assert first.attempts == 0 and first.since == NOW.timestamp()
    h.clock.advance(10)
    h.published.clear()
    h.deliver([event(0)], attempts=first.attempts, since=first.since)  # still no sign of life
    ((_, second),) = h.retries
    assert second.attempts == 0
    h.clock.advance(1)
    h.api_works()  # another asset_id went through after this batch first failed: the batch is the problem
    for expected in (1, 2):
        h.clock.advance(100)  # however long after: the evidence stands
        h.published.clear()
        h.deliver([event(0)], attempts=second.attempts, since=second.since)
        ((_, second),) = h.retries
        assert second.attempts == expected


def test_an_asset_id_failing_alone_with_no_sign_of_life_is_held_and_probed_alone() -> None:
    h = harness(unavailable(), max_retries=0)
    for _ in range(ASSET_FAILURES_TO_HOLD):
        h.deliver([event(0)])
    assert h.circuit.state is State.CLOSED and h.circuit.held_assets == 1  # one asset_id: not an outage
    posts = len(h.client.posts)
    h.published.clear()
    h.deliver([event(1)])
    assert len(h.client.posts) == posts  # held: no request
    ((queue, batch),) = h.retries
    assert batch.attempts == 0 and delay_of(queue) <= 1.0  # back about when its probe is due
    assert h.circuit.permit("another-asset") is not None  # the others go on
    h.clock.advance(h.circuit.wait_left(ASSET))
    h.deliver([event(2)])
    assert len(h.client.posts) == posts + 1  # its probe
    h.api_works()  # another asset_id went through: the API works, this asset_id is the problem
    assert h.circuit.held_assets == 0


# --- the circuit: outages are waited out --------------------------------------------------------------


def down(circuit: Circuit) -> None:
    """Five failures from two asset_ids, with no success: the API is down."""
    for n in range(5):
        circuit.failed(circuit.permit(f"asset-{n % 2}") or pytest.fail("closed"), error="503", counted=False)


def test_an_open_circuit_refuses_without_spending_attempts() -> None:
    h = harness(max_retries=0)
    down(h.circuit)
    assert h.circuit.state is State.OPEN
    report = h.deliver([event(i) for i in range(10)], attempts=0)
    assert h.client.posts == []  # nothing sent to a down API
    ((queue, batch),) = h.retries
    assert batch.attempts == 0 and report.held == 10 and report.dead == {}
    assert 0.5 <= delay_of(queue) <= 1.0  # about until the next probe: back in the upload queue before it
    check_adds_up(report)


def test_one_asset_id_failing_alone_does_not_open_the_circuit() -> None:
    h = harness(unavailable(), max_retries=20)
    for attempts in range(10):
        h.api_works()
        h.deliver([event(0)], attempts=attempts, since=NOW.timestamp() - 1, batch_id="the-same-batch")
    assert h.circuit.state is State.CLOSED  # its own problem: its attempts count
    assert [batch.attempts for _, batch in h.retries][-1] == 10


def test_a_failed_probe_spends_no_attempt_and_a_good_one_closes_the_circuit() -> None:
    answers = {"fail": True}

    def script(events: list[Any]) -> None:
        if answers["fail"]:
            raise Transient("the API answered 503", status=503)

    h = harness(script, max_retries=0)
    down(h.circuit)
    h.clock.advance(1.0)
    assert h.circuit.poll() is State.HALF_OPEN
    h.deliver([event(0)], attempts=0)
    ((_, batch),) = h.retries
    assert batch.attempts == 0 and h.dead_letters == []  # the probe failed: not the batch's fault
    assert h.circuit.state is State.OPEN and h.circuit.wait_left() == 2.0  # the next probe waits longer
    h.clock.advance(2.0)
    h.circuit.poll()
    answers["fail"] = False
    report = h.deliver([event(1), event(2)])
    assert report.delivered == 2 and h.circuit.state is State.CLOSED


# --- bundles -------------------------------------------------------------------------------------


def test_a_bundle_delivers_each_batch_in_its_own_request() -> None:
    h = harness(rejects_bad)
    texts = {a: [jsonutil.dumps(event(i, asset_id=a, bad=(a == "b" and i == 1))).decode() for i in range(3)]
             for a in ("a", "b", "c")}
    report = h.delivery.deliver(Bundle([UploadBatch(a, t) for a, t in texts.items()], "default"))
    assert [{e["asset_id"] for e in post} for post in h.client.posts if len(post) == 3] == [{"a"}, {"b"}, {"c"}]
    assert report.delivered == 8 and report.dead == {"rejected": 1} and report.batches == 3


def test_a_bug_in_one_batch_retries_it_and_spares_the_others(caplog: pytest.LogCaptureFixture) -> None:
    def explodes(events: list[Any]) -> None:
        if events[0]["asset_id"] == "boom":
            raise RuntimeError("a bug")

    h = harness(explodes)
    good = [jsonutil.dumps(event(i, asset_id="ok")).decode() for i in range(2)]
    boom = [jsonutil.dumps(event(i, asset_id="boom")).decode() for i in range(3)]
    with caplog.at_level(logging.ERROR):
        report = h.delivery.deliver(Bundle([UploadBatch("boom", boom), UploadBatch("ok", good)], "default"))
    assert report.delivered == 2
    ((_, batch),) = h.retries
    assert batch.asset_id == "boom" and batch.attempts == 1 and batch.events == boom
    assert "unexpected RuntimeError" in caplog.text


def test_replay_counts_travel_to_the_next_dead_letter() -> None:
    h = harness(rejects_bad)
    h.deliver([event(0, bad=True), event(1), event(2, bad=True)], replays=[3, 0, 1])
    assert sorted((key(b["event"]), b["replays"]) for b in h.dead_letters) == [(0, 3), (2, 1)]


def test_replay_counts_travel_through_a_retry() -> None:
    h = harness(unavailable(), max_retries=1)
    h.api_works()
    h.deliver([event(0), event(1)], replays=[0, 2])
    ((_, batch),) = h.retries
    assert batch.replays == [0, 2]
    h2 = harness(unavailable(), max_retries=1)
    h2.clock.advance(1)
    h2.api_works()
    h2.deliver([event(0), event(1)], attempts=batch.attempts, since=batch.since, replays=batch.replays)
    assert [b["replays"] for b in h2.dead_letters] == [0, 2]


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
    assert h.client.posts == [good]
    assert report.invalid == 4 and report.delivered == 4 and report.dead == {"invalid": 4}
    letters = h.dead_letters
    assert [b["event"] for b in letters] == invalid
    for body in letters:
        check_envelope(body, "invalid", attempts=0)
    by_key = {key(b["event"]): b for b in letters}
    assert "activity_source" in by_key[100]["details"] and "activity_source" in by_key[100]["error"]
    assert "activity_params" in by_key[102]["details"]
    assert "timestamp" in by_key[103]["details"]
    assert events == original
    check_adds_up(report)


def test_invalid_and_transient_together() -> None:
    h = harness(unavailable())
    report = h.deliver([event(0), event(1, activity_source="App")])
    assert report.dead == {"invalid": 1}
    ((_, batch),) = h.retries
    assert [key(e) for e in events_of(batch)] == [0]
    check_adds_up(report)


def test_invalid_event_error_does_not_echo_the_identity() -> None:
    h = harness()
    h.deliver([event(0, activity_source="WEB", identity="secret.person@example.com")])
    (body,) = h.dead_letters
    assert "secret.person@example.com" not in body["error"]
    assert "secret.person@example.com" not in jsonutil.dumps(body["details"]).decode()
    assert body["event"]["identity"] == "secret.person@example.com"  # the event itself is kept whole


@pytest.mark.parametrize(
    ("text", "problem"),
    [('{"asset_id":"asset-1","asset_id":"asset-2"}', "duplicate_key"), ('{"n": 1', "not_json")],
)
def test_event_text_that_only_the_strict_parser_refuses_is_dead_lettered_malformed(text: str, problem: str) -> None:
    h = harness()
    report = h.delivery.deliver(Bundle([UploadBatch(ASSET, [text])]))
    assert report.delivered == 0 and h.client.posts == []
    (dead,) = h.dead_letters
    assert dead["reason"] == "malformed" and dead["raw"] == text and dead["event"] is None
    assert dead["details"]["problem"] == problem


def test_event_texts_are_forwarded_exactly_as_received() -> None:
    texts = ['{"asset_id":"asset-1", "activity_name":"Purchase","timestamp":"2026-01-01T00:00:00Z",'
             '"identity":7,"activity_source":"app","activity_params":{"price":250.10,"n":1E2}}']
    posted: list[Sequence[Any]] = []

    class Recorder(FakeClient):
        def post(self, events: Sequence[Any]) -> None:
            posted.append(list(events))

    h = harness()
    h.delivery.client = Recorder()
    report = h.delivery.deliver(Bundle([UploadBatch(ASSET, texts)]))
    assert report.delivered == 1
    assert posted == [texts]  # "250.10" and "1E2" untouched: no re-encoding


# --- stale events -----------------------------------------------------------------------------------


def test_stale_events_are_counted_and_still_sent(caplog: pytest.LogCaptureFixture) -> None:
    two_days_ago = (NOW - timedelta(days=2)).isoformat().replace("+00:00", "Z")
    just_a_day = (NOW - timedelta(hours=24)).isoformat().replace("+00:00", "Z")
    events = [event(0, timestamp=two_days_ago), event(1, timestamp="2025-12-30T05:30:00+05:30"),
              event(2, timestamp=just_a_day), event(3)]
    h = harness()
    with caplog.at_level(logging.WARNING, logger="worker.upload.delivery"):
        report = h.deliver(events)
    assert report.stale == 2 and report.delivered == 4
    assert any("older than 24 hours" in r.getMessage() for r in caplog.records)


# --- publishing -------------------------------------------------------------------------------------


def test_publish_failure_propagates_with_the_messages() -> None:
    h = harness(rejects_bad)

    def refuse(messages: Sequence[Outgoing]) -> None:
        raise PublishError("no confirm", messages=messages)

    h.delivery.publish = refuse
    with pytest.raises(PublishError) as raised:
        h.deliver([event(0, bad=True), event(1)])
    assert [m.queue for m in raised.value.messages] == [DLQ]  # kept by the task, published on redelivery


def test_dead_letters_and_retry_go_out_in_one_group() -> None:
    calls = {"n": 0}

    def flaky(events: list[Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # [0..3] 400, [0,1] 400, [0] 400, then [1] fails
            raise Transient("the API answered 500", status=500)
        rejects_bad(events)

    h = harness(flaky)
    h.deliver([event(i, bad=i == 0) for i in range(4)])
    assert len(h.published) == 1
    assert sorted(m.queue == DLQ for m in h.published[0]) == [False, True]


def test_failed_at_follows_the_clock() -> None:
    h = harness(rejects_bad)
    h.clock.advance(90)
    h.deliver([event(0, bad=True)])
    (body,) = h.dead_letters
    assert body["failed_at"] == "2026-01-01T00:01:30Z"


def test_the_retry_message_is_a_task_with_a_summary_for_flower() -> None:
    h = harness(unavailable())
    h.api_works()
    h.deliver([event(i) for i in range(3)], attempts=2, since=NOW.timestamp() - 1)
    (message,) = [m for m in h.messages if m.queue != DLQ]
    assert message.headers["task"] == UPLOAD_TASK
    assert message.headers["argsrepr"] == "account='default', asset_id='asset-1', 3 events, attempt 4"
    assert "sku-" not in message.headers["argsrepr"]  # Flower shows a summary only


# --- zone-less timestamps (the vendor's own samples) -------------------------------------------------


def test_zone_less_timestamps_are_forwarded_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = harness()
    events = [event(0, timestamp="2025-12-31T16:47:37"), event(1), event(2, timestamp="2025-12-31T16:47:37.5")]
    with caplog.at_level(logging.WARNING, logger="worker.upload.delivery"):
        report = h.deliver(events)
    assert report.delivered == 3 and report.naive == 2
    assert h.client.posts == [events]  # forwarded as they are
    assert "2 events have a timestamp without a zone" in caplog.text


def test_zone_less_timestamps_are_refused_when_the_setting_says_so() -> None:
    h = harness()
    h.delivery.naive_timestamps = "reject"
    report = h.deliver([event(0, timestamp="2025-12-31T16:47:37"), event(1)])
    assert report.delivered == 1 and report.dead == {"invalid": 1}
    (body,) = h.dead_letters
    assert "timestamp" in body["details"] and "ACTIVITY_NAIVE_TIMESTAMPS" in body["error"] + str(body["details"])


# --- every dead letter keeps its event (issue: retries exhausted could drop it) ----------------------


def test_given_up_after_a_bug_each_event_is_kept_whole_even_one_the_strict_parser_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker.upload.delivery as delivery_module

    def broken(events: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in validation")

    monkeypatch.setattr(delivery_module, "screen", broken)
    h = harness(max_retries=0)
    duplicate = '{"asset_id":"asset-1","asset_id":"asset-1","activity_params":{"i":7}}'
    good = jsonutil.dumps(event(1)).decode()
    report = h.delivery.deliver(Bundle([UploadBatch(ASSET, [good, duplicate], replays=[0, 2])], "default"))
    assert report.dead == {"retries_exhausted": 2}
    first, second = h.dead_letters
    assert first["event"] == event(1) and "raw" not in first
    assert second["event"] is None and second["raw"] == duplicate and second["replays"] == 2  # not lost

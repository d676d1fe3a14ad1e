"""Delivery that rides out a failing API: outages waited out, retries held by RabbitMQ, rate limits
obeyed, one bad batch given up on alone, and nothing deleted on a path nobody planned.

Each test runs the real worker against RabbitMQ and the sandbox, gives every event an id, and
checks that ids delivered plus ids dead-lettered equal ids sent.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from urllib.parse import unquote, urlsplit

import pytest
from celery import Celery

from bench.scenarios import probes_allowed
from tests.broker_settings import broker_env, rabbitmqctl
from tests.harness import (
    DeadLetters,
    QueueSet,
    event,
    event_id_of,
    publish_events,
    publish_raw,
)
from worker.broker.messages import Bundle, UploadBatch, upload_message
from worker.broker.topology import Topology
from worker.deadletter.commands import read, replay
from worker.events import jsonutil
from worker.sandbox import Sandbox
from worker.upload.circuit import FAILURES_TO_OPEN

#: Short settings: a retry budget of 0.1 + 0.2 + 0.4 = 0.7 s (three retries, each wait at most).
SHORT = {"UPLOAD_MAX_RETRIES": "3", "UPLOAD_RETRY_BACKOFF": "0.1", "UPLOAD_RETRY_BACKOFF_MAX": "0.4",
         "UPLOAD_PROBE_INTERVAL_MAX": "2", "UPLOAD_CONCURRENCY": "8", "UPLOAD_TIMEOUT": "2"}


def retry_budget(retries: int, base: float, cap: float) -> float:
    """The longest a batch can spend waiting between its attempts before it is given up on."""
    return sum(min(cap, base * 2 ** n) for n in range(retries))


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class Producer:
    """Publishes ``per_round`` events every ``interval`` s until stopped, keeping every id sent."""

    def __init__(self, queue: str, *, per_round: int = 50, interval: float = 0.2, assets: int = 10) -> None:
        self.queue, self.per_round, self.interval, self.assets = queue, per_round, interval, assets
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        round_ = 0
        while not self._stop.is_set():
            ids = [f"r{round_}-{n}" for n in range(self.per_round)]
            publish_events(self.queue, [event(i, asset_id=f"asset-{n % self.assets}") for n, i in enumerate(ids)])
            self.sent += ids
            round_ += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def delivered_ids(sandbox: Sandbox) -> Counter[str | None]:
    return Counter(event_id_of(e) for e in sandbox.accepted())


# --- an outage is waited out ------------------------------------------------------------------------


def test_an_outage_thirty_times_the_retry_budget_is_waited_out(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    budget = retry_budget(3, 0.1, 0.4)
    outage = 30 * budget  # 21 s
    worker = start_worker(**SHORT)
    with Producer(queues.settings.queue) as producer:
        assert sandbox.wait_until(lambda s: s.accepted_count() >= 200, timeout=60)  # flowing
        sandbox.add_fault(status=503)  # the API goes down, producers go on
        down_at = len(sandbox.requests())
        assert worker.wait_for_log("Circuit OPEN", timeout=30)
        producer._stop.wait(outage)
        during = [r for r in sandbox.requests()[down_at:] if r.status == 503]
        sandbox.clear_faults()  # the API comes back
    assert worker.wait_for_log("circuit CLOSED", timeout=30)
    sent = set(producer.sent)
    assert sandbox.wait_until(lambda s: sent <= set(delivered_ids(s)), timeout=120), (
        f"{len(sent - set(delivered_ids(sandbox)))} of {len(sent)} events not delivered")
    dead_letters.settle(quiet=1.0)
    assert dead_letters.envelopes == []  # nothing dead-lettered, nothing lost
    assert set(delivered_ids(sandbox)) == sent
    allowed = FAILURES_TO_OPEN + 8 + probes_allowed(0.1, 2.0, outage + 1) + 1
    print(f"\n{len(sent)} events sent; {len(during)} requests to the down API in {outage:.0f} s "
          f"(allowed {allowed}); peak RSS {peak_rss_mb(worker.process.pid):.0f} MB")
    assert len(during) <= allowed
    assert peak_rss_mb(worker.process.pid) < 300


# --- retries wait in RabbitMQ -----------------------------------------------------------------------


def test_backoffs_longer_than_the_consumer_timeout_never_cost_the_channel(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    ids = [f"c{i}" for i in range(40)]
    # every retry waits at least 4 s (Retry-After is a floor); RabbitMQ closes a channel that holds
    # a delivery unacknowledged for 2 s, and looks every second
    sandbox.add_fault(status=503, retry_after="4", count=3)
    with broker_env(consumer_timeout=2000, channel_tick_interval=1000):
        worker = start_worker(UPLOAD_RETRY_BACKOFF="4", UPLOAD_RETRY_BACKOFF_MAX="6", UPLOAD_MAX_RETRIES="5")
        publish_events(queues.settings.queue, [[event(i) for i in ids]])
        assert sandbox.wait_until(lambda s: s.accepted_count() >= len(ids), timeout=90)
        log = worker.log()
    assert delivered_ids(sandbox) == Counter(ids)
    assert [r.status for r in sandbox.requests()] == [503, 503, 503, 200]
    waits = [b.at - a.at for a, b in zip(sandbox.requests(), sandbox.requests()[1:])]
    assert min(waits) >= 3.9, waits  # each retry waited in RabbitMQ, longer than the timeout
    assert "PRECONDITION_FAILED" not in log and "Connection to broker lost" not in log, log[-3000:]
    assert worker.process.poll() is None
    dead_letters.settle(quiet=0.5)
    assert dead_letters.envelopes == []


def test_a_429_pauses_every_upload_and_spends_no_attempt(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    ids = [f"t{i}" for i in range(300)]
    sandbox.add_fault(status=429, retry_after="2", count=1)
    start_worker(UPLOAD_MAX_RETRIES="0", ACTIVITY_BATCH_SIZE="10")  # no retry allowed: a 429 must not need one
    publish_events(queues.settings.queue, [[event(i, asset_id=f"asset-{n % 30}") for n, i in enumerate(ids)]])
    assert sandbox.wait_until(lambda s: s.accepted_count() >= len(ids), timeout=60)
    requests = sandbox.requests()
    limited = next(n for n, r in enumerate(requests) if r.status == 429)
    later = [r.at - requests[limited].at for r in requests[limited + 1:]]
    started_later = [w for w in later if w > 0.05]  # uploads already in flight when it came are not "later"
    assert started_later and min(started_later) >= 1.9, later  # nobody sent until Retry-After passed
    assert delivered_ids(sandbox) == Counter(ids)
    dead_letters.settle(quiet=0.5)
    assert dead_letters.envelopes == []


# --- one bad batch, and only it, is given up on --------------------------------------------------------


def test_one_batch_failing_while_others_succeed_is_dead_lettered_alone(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    sandbox.add_fault(status=500, asset_id="asset-bad")  # the API fails this tenant only
    bad = [f"bad{i}" for i in range(10)]
    worker = start_worker(**SHORT)
    with Producer(queues.settings.queue, per_round=20, interval=0.1) as producer:
        publish_events(queues.settings.queue, [[event(i, asset_id="asset-bad") for i in bad]])
        assert dead_letters.wait_for(len(bad), timeout=60)
    good = set(producer.sent)
    assert sandbox.wait_until(lambda s: good <= set(delivered_ids(s)), timeout=60)
    dead_letters.settle(quiet=1.0)
    assert sorted(dead_letters.ids()) == sorted(bad)  # that batch, and only it
    assert {(e["reason"], e["attempts"]) for e in dead_letters.envelopes} == {("retries_exhausted", 4)}
    assert "while the API accepted other uploads" in dead_letters.envelopes[0]["error"]
    assert set(delivered_ids(sandbox)) == good
    assert "Circuit OPEN" not in worker.log()


# --- nothing deleted on a path nobody planned -----------------------------------------------------------


def test_an_upload_task_that_raises_outside_its_handler_is_dead_lettered_and_replayable(
    start_worker, queues: QueueSet, sandbox: Sandbox
) -> None:
    ids = [f"x{i}" for i in range(30)]
    texts = [jsonutil.dumps(event(i)).decode() for i in ids]
    worker = start_worker()
    mark = worker.mark
    # a message from another version of the worker: its task takes an argument this one does not
    message = upload_message(Celery("producer", set_as_current=False), queues.settings.upload_queue,
                             Bundle([UploadBatch("asset-1", texts)]))
    args, _, embed = jsonutil.loads(message.body)
    body = jsonutil.dumps([args, {"priority_hint": 3}, embed])
    topology = Topology.of(queues.settings)
    publish_raw(queues.settings.upload_queue, [body], content_type=message.content_type, headers=message.headers,
                encoding="binary", queue_arguments=topology.upload_queue().queue_arguments)
    assert worker.wait_for_log("Salvage: wrote 30 events", timeout=30, start=mark), worker.log()[-3000:]
    letters = read(queues.settings, reasons=["unhandled"])
    assert sorted(event_id_of(e["event"]) for e in letters) == sorted(ids)  # whole events, not a blob
    assert all("dead-lettered" in e["error"] and e["asset_id"] == "asset-1" for e in letters)
    assert sandbox.accepted_count() == 0
    report = replay(queues.settings, reasons=["unhandled"])
    assert report.replayed == 30
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 30, timeout=30)
    assert delivered_ids(sandbox) == Counter(ids)
    assert read(queues.settings) == []


def test_an_undecodable_task_message_is_kept_not_acknowledged(start_worker, queues: QueueSet) -> None:
    worker = start_worker()
    mark = worker.mark
    topology = Topology.of(queues.settings)
    publish_raw(queues.settings.upload_queue, [b"\x80not json at all"], content_type="application/json",
                headers={"task": "activities.upload", "id": "bad-1"},
                queue_arguments=topology.upload_queue().queue_arguments)
    assert worker.wait_for_log("Salvage: wrote 1 events", timeout=30, start=mark), worker.log()[-3000:]
    (letter,) = read(queues.settings)
    assert letter["reason"] == "unhandled"
    assert letter.get("raw_base64") or letter.get("raw")  # the body, kept whole


# --- quorum queues all the way --------------------------------------------------------------------------


@pytest.mark.quorum
def test_retries_work_on_quorum_queues(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    ids = [f"q{i}" for i in range(50)]
    sandbox.add_fault(status=503, count=3)
    start_worker(UPLOAD_RETRY_BACKOFF="0.2", UPLOAD_RETRY_BACKOFF_MAX="0.5")
    publish_events(queues.settings.queue, [[event(i) for i in ids]], queue_arguments={"x-queue-type": "quorum"})
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 50, timeout=60)
    assert delivered_ids(sandbox) == Counter(ids)
    assert [r.status for r in sandbox.requests()] == [503, 503, 503, 200]
    vhost = unquote(urlsplit(queues.broker_url).path[1:]) or "/"
    listed = json.loads(rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--formatter", "json", "-q"))
    types = {q["name"]: q["type"] for q in listed if q["name"].startswith(queues.prefix)}
    topology = Topology.of(queues.settings)
    assert queues.settings.task_queue in types  # a Celery producer in a cluster declares it quorum too
    assert {topology.upload, topology.dead_letter, topology.unhandled, queues.settings.queue} <= set(types)
    assert sum(".delay." in name for name in types) >= 10  # the ladder of delay queues
    assert set(types.values()) == {"quorum"}, types
    # Celery's native delayed delivery (28 quorum queues per vhost) is left out: nothing uses it
    assert not [q["name"] for q in listed if q["name"].startswith("celery_delayed")]

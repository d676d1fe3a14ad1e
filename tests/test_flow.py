"""The upload flow, the queue topology and the upload-task message, without a broker.

The flow steers fakes of each account's upload consumer; the topology and the messages are pure.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from config.settings import Settings
from worker.broker.messages import (
    MAX_BATCHES_PER_BUNDLE,
    Bundle,
    UploadBatch,
    batches_per_bundle,
    bundles,
    read_bundle,
    upload_message,
)
from worker.broker.topology import Topology, delay_ladder
from worker.clock import ManualClock
from worker.events import jsonutil
from worker.runtime import build_runtime
from worker.upload.circuit import FAILURES_TO_OPEN, Permit, State
from worker.upload.concurrency import AdaptiveConcurrency
from worker.upload.flow import RECONSUME_INTERVAL, LaneConsumer, UploadConsumer, UploadFlow
from worker.upload.lanes import Lane

pytestmark = pytest.mark.timeout(30)


class FakeConsumer:
    def __init__(self) -> None:
        self.on = False
        self.count = 0
        self.calls: list[str] = []

    def consuming(self) -> bool:
        return self.on

    def pause(self) -> None:
        self.on = False
        self.calls.append("pause")

    def resume(self) -> None:
        self.on = True
        self.calls.append("resume")

    def prefetch(self) -> int:
        return self.count

    def set_prefetch(self, count: int) -> None:
        self.count = count


class Rig:
    """Two accounts' lanes (a runtime built from settings with an accounts file), a fake consumer each."""

    def __init__(self, tmp_path: Any) -> None:
        self.clock = ManualClock()
        accounts = tmp_path / "accounts.toml"
        accounts.write_text('[accounts.brand-b]\napi_key_env = "B_KEY"\nregion = "eu"\nasset_ids = ["b-1"]\n')
        settings = Settings.from_env({"NETCORE_API_KEY": "a-key", "NETCORE_ACCOUNTS_FILE": str(accounts),
                                      "B_KEY": "b-key", "UPLOAD_RETRY_BACKOFF": "1",
                                      "UPLOAD_PROBE_INTERVAL_MAX": "8"})
        self.runtime = build_runtime(Celery("test-flow", set_as_current=False), settings, clock=self.clock)
        self.lanes = {lane.name: lane for lane in self.runtime.lanes}
        self.consumers = {name: FakeConsumer() for name in self.lanes}
        steered: list[tuple[Lane, UploadConsumer]] = [(lane, self.consumers[name]) for name, lane in self.lanes.items()]
        self.flow = UploadFlow(steered)

    def outage(self, account: str) -> None:
        circuit = self.lanes[account].circuit
        for n in range(FAILURES_TO_OPEN):
            circuit.failed(circuit.permit(f"asset-{n % 2}") or pytest.fail("refused"), error="503", counted=False)

    def close(self) -> None:
        self.runtime.publishers.close()


@pytest.fixture
def rig(tmp_path: Any) -> Any:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def test_each_accounts_adaptive_limit_becomes_its_upload_consumers_prefetch(rig: Rig) -> None:
    rig.flow.tick()
    assert all(c.count == 1 and c.on for c in rig.consumers.values())
    concurrency = rig.lanes["default"].concurrency
    started = concurrency.started()
    rig.clock.advance(0.1)
    concurrency.finished(started, congested=False)
    rig.flow.tick()
    assert rig.consumers["default"].count == 2 and rig.consumers["brand-b"].count == 1  # its own limit


def test_an_accounts_outage_stops_its_consumer_only_then_a_probe_with_prefetch_one(rig: Rig) -> None:
    rig.flow.tick()
    rig.outage("brand-b")
    rig.flow.tick()
    assert rig.consumers["brand-b"].calls == ["resume", "pause"]
    assert rig.consumers["default"].on  # the other account goes on
    assert set(rig.flow.paused()) == {"brand-b"} and "circuit open" in rig.flow.paused()["brand-b"]
    rig.flow.tick()
    assert rig.consumers["brand-b"].calls == ["resume", "pause"]  # nothing more while open
    rig.clock.advance(1.0)
    rig.flow.tick()  # half-open: one task, the probe
    assert rig.consumers["brand-b"].calls[-1] == "resume" and rig.consumers["brand-b"].count == 1


def test_a_429_pauses_that_accounts_consumer_only(rig: Rig) -> None:
    rig.flow.tick()
    circuit = rig.lanes["default"].circuit
    circuit.failed(circuit.permit("x") or pytest.fail("refused"), error="429", counted=False, rate_limited=True)
    rig.flow.tick()
    assert not rig.consumers["default"].on and rig.consumers["brand-b"].on
    assert "429" in rig.flow.paused()["default"]


def test_closing_restarts_the_accounts_ramp_from_one(rig: Rig) -> None:
    lane = rig.lanes["default"]
    for _ in range(4):
        starts = [lane.concurrency.started() for _ in range(lane.concurrency.limit)]
        rig.clock.advance(0.1)
        for started in starts:
            lane.concurrency.finished(started, congested=False)
    assert lane.concurrency.limit == 16
    rig.outage("default")
    rig.flow.tick()
    rig.clock.advance(1.0)
    rig.flow.tick()
    probe = lane.circuit.permit("x")
    assert probe is not None
    lane.circuit.succeeded(probe)
    rig.flow.tick()
    assert lane.concurrency.limit == 1 and rig.consumers["default"].count == 1 and rig.consumers["default"].on
    assert lane.circuit.state is State.CLOSED and rig.flow.paused() == {}


def test_a_held_asset_id_stops_no_consumer(rig: Rig) -> None:
    rig.flow.tick()
    circuit = rig.lanes["default"].circuit
    for _ in range(10):
        permit = circuit.permit("sick")
        if permit is None:
            break
        circuit.failed(permit, error="503", counted=False)
    rig.flow.tick()
    assert circuit.held_assets == 1 and all(c.on for c in rig.consumers.values())
    assert circuit.permit("healthy") == Permit("healthy")


def topology(**env: str) -> Topology:
    return Topology.of(Settings.from_env(env, require_api=False))


def test_the_delay_ladder_covers_the_longest_wait() -> None:
    assert delay_ladder(1.0) == (100, 200, 400, 800, 1600)
    rungs = topology(UPLOAD_RETRY_BACKOFF_MAX="300").rungs
    assert rungs[0] == 100 and rungs[-1] >= 300_000 and rungs[-2] < 300_000


def test_a_wait_rounds_down_to_a_rung_or_up_when_it_is_a_floor() -> None:
    t = topology(UPLOAD_RETRY_BACKOFF_MAX="10", UPLOAD_PROBE_INTERVAL_MAX="10")
    assert t.rung_for(0.0) is None and t.rung_for(0.05) is None
    assert t.rung_for(0.05, at_least=True) == 100
    assert t.rung_for(1.0) == 800 and t.rung_for(1.0, at_least=True) == 1600
    assert t.rung_for(3600, at_least=True) == t.rungs[-1]


def test_every_queue_the_worker_declares_is_quorum_when_asked_and_dead_letters_at_least_once() -> None:
    t = topology(ACTIVITY_QUEUE_TYPE="quorum")
    assert all(q.queue_arguments and q.queue_arguments["x-queue-type"] == "quorum" for q in t.all_queues())
    for queue in [t.upload_queue(), *t.delay_queues()]:
        assert queue.queue_arguments["x-dead-letter-strategy"] == "at-least-once"
    assert t.upload_queue().queue_arguments["x-dead-letter-routing-key"] == t.unhandled
    delay = t.delay_queue(400).queue_arguments
    assert (delay["x-message-ttl"], delay["x-dead-letter-routing-key"]) == (400, t.upload)
    assert t.task_source_queue().queue_arguments == {"x-queue-type": "quorum"}  # task_default_queue_type


def test_each_account_has_an_upload_queue_and_a_delay_ladder_of_its_own() -> None:
    t = Topology(source="a", task_source="c", upload="up", quarantine="q", dead_letter="d", unhandled="u",
                 quorum=False, rungs=(100, 200), accounts=("default", "brand-b"))
    assert t.upload_for("default") == "up" and t.upload_for("brand-b") == "up.brand-b"
    assert t.delay_queue(200, "brand-b").queue_arguments["x-dead-letter-routing-key"] == "up.brand-b"
    assert t.delay_name(100, "brand-b") == "up.brand-b.delay.100ms"
    names = {q.name for q in t.all_queues()}
    assert {"up", "up.delay.100ms", "up.brand-b", "up.brand-b.delay.200ms"} <= names


def test_classic_queues_carry_no_quorum_arguments_and_activities_none_at_all() -> None:
    t = topology()
    assert t.source_queue().queue_arguments is None  # producers declare it bare: it must match
    assert "x-queue-type" not in (t.upload_queue().queue_arguments or {})


# --- the upload-task message ------------------------------------------------------------------------


def test_bundles_group_small_batches_and_leave_full_ones_alone() -> None:
    small = [UploadBatch(f"a{n}", ["{}"] * 10) for n in range(50)]
    full = UploadBatch("big", ["{}"] * 1000)
    grouped = list(bundles([small[0], full, *small[1:]], max_events=1000, max_bytes=1 << 30))
    assert [len(b.batches) for b in grouped] == [1, 1, MAX_BATCHES_PER_BUNDLE, MAX_BATCHES_PER_BUNDLE, 9]
    assert grouped[1].batches == [full]
    assert sum(b.events for b in grouped) == 1500


def test_bundles_respect_the_byte_limit() -> None:
    batches = [UploadBatch(f"a{n}", ["x" * 99] * 10) for n in range(5)]
    grouped = list(bundles(batches, max_events=1000, max_bytes=2000))
    assert [len(b.batches) for b in grouped] == [2, 2, 1]


def test_a_slow_api_gets_fewer_batches_per_bundle_so_a_task_holds_its_message_briefly() -> None:
    assert batches_per_bundle(None) == 1  # nothing measured yet: the real API's round trip is assumed
    assert batches_per_bundle(0.005) == MAX_BATCHES_PER_BUNDLE  # a nearby API: the cap
    assert batches_per_bundle(0.15) == 1  # the real API: one request per task
    assert batches_per_bundle(0.05) == 3
    assert batches_per_bundle(2.0) == 1
    small = [UploadBatch(f"a{n}", ["{}"] * 10) for n in range(7)]
    grouped = list(bundles(small, max_events=1000, max_bytes=1 << 30, max_batches=batches_per_bundle(0.05)))
    assert [len(b.batches) for b in grouped] == [3, 3, 1]


def test_the_round_trip_the_bundles_follow_is_the_limits_moving_average() -> None:
    clock = ManualClock()
    concurrency = AdaptiveConcurrency(ceiling=4, clock=clock)
    assert concurrency.round_trip is None
    started = concurrency.started()
    clock.advance(0.15)
    concurrency.finished(started, congested=False)
    assert concurrency.round_trip == pytest.approx(0.15)


def test_a_round_trip_counts_before_its_first_window_closes() -> None:
    clock = ManualClock()
    concurrency = AdaptiveConcurrency(ceiling=4, clock=clock)
    started = concurrency.started()
    clock.advance(0.003)  # a nearby API, answering before the first window (MIN_WINDOW) is over
    concurrency.finished(started, congested=False)
    assert concurrency.round_trip == pytest.approx(0.003)
    assert batches_per_bundle(concurrency.round_trip) == MAX_BATCHES_PER_BUNDLE


def test_the_message_round_trips_and_shows_only_a_summary() -> None:
    app = Celery("test-flow", set_as_current=False)
    bundle = Bundle([UploadBatch("a", ['{"identity":"x@example.com"}'], 2, 1.5, [1], "id-a"),
                     UploadBatch("b", ["{}", "{}"]), UploadBatch("c", ["{}"]), UploadBatch("d", ["{}"])])
    message = upload_message(app, "up", bundle)
    args, kwargs, _ = jsonutil.loads(message.body)
    again = read_bundle(args)
    assert [(b.asset_id, b.events, b.attempts, b.since, b.replays, b.id) for b in again.batches][0] == (
        "a", ['{"identity":"x@example.com"}'], 2, 1.5, [1], "id-a")
    assert message.headers["argsrepr"] == "4 batches, 5 events: 'a', 'b', 'c' (+1), attempt 3"
    assert again.account is None  # no account named: an older worker's bundle, routed by its asset_ids


def test_the_account_travels_with_the_bundle_and_shows_in_the_summary() -> None:
    app = Celery("test-flow", set_as_current=False)
    message = upload_message(app, "up", Bundle([UploadBatch("a", ["{}"], since=12.5)], "brand-b"))
    args, _, _ = jsonutil.loads(message.body)
    again = read_bundle(args)
    assert again.account == "brand-b" and again.batches[0].since == 12.5
    assert message.headers["argsrepr"] == "account='brand-b', asset_id='a', 1 events"
    assert "example.com" not in jsonutil.dumps(message.headers).decode()


def test_an_older_workers_message_is_read_as_one_batch() -> None:
    bundle = read_bundle(["asset-1", ['{"a":1}'], 3])
    assert [(b.asset_id, b.events, b.attempts) for b in bundle.batches] == [("asset-1", ['{"a":1}'], 3)]


@pytest.mark.parametrize("args", [[], [1, 2, 3, 4], [[{"asset_id": 1, "events": []}]], [["not a batch"]]])
def test_anything_else_is_refused_with_a_sentence(args: list[Any]) -> None:
    with pytest.raises(ValueError, match="batch|argument"):
        read_bundle(args)


# --- an account's upload consumer, on a channel of its own ---------------------------------------------


class FakeChannel:
    def __init__(self) -> None:
        self.qos: list[tuple[int, bool]] = []

    def basic_qos(self, size: int, count: int, global_: bool) -> None:
        self.qos.append((count, global_))


class FakeKombuConsumer:
    def __init__(self) -> None:
        self.channel = FakeChannel()
        self.calls: list[str] = []

    def consume(self) -> None:
        self.calls.append("consume")

    def cancel(self) -> None:
        self.calls.append("cancel")


def test_on_a_classic_queue_a_new_prefetch_applies_to_the_channel_at_once() -> None:
    kombu = FakeKombuConsumer()
    consumer = LaneConsumer(kombu, quorum=False, clock=ManualClock())  # type: ignore[arg-type]
    consumer.set_prefetch(3)
    consumer.resume()
    consumer.set_prefetch(7)
    assert kombu.channel.qos == [(3, True), (7, True)] and kombu.calls == ["consume"]
    consumer.set_prefetch(0)
    assert kombu.channel.qos[-1] == (1, True)  # 0 would mean "no limit" to RabbitMQ


def test_on_a_quorum_queue_a_new_prefetch_takes_a_new_consumer_at_most_so_often() -> None:
    clock = ManualClock()
    kombu = FakeKombuConsumer()
    consumer = LaneConsumer(kombu, quorum=True, clock=clock)  # type: ignore[arg-type]
    consumer.resume()
    consumer.set_prefetch(4)
    assert kombu.calls == ["consume", "cancel", "consume"] and kombu.channel.qos == [(4, False)]
    consumer.set_prefetch(8)
    assert len(kombu.calls) == 3  # too soon: the next one carries it
    assert consumer.prefetch() == 4  # and says so, so that the flow asks again at its next tick
    consumer.set_prefetch(1)
    assert len(kombu.calls) == 5  # a probe: at once
    clock.advance(RECONSUME_INTERVAL)
    consumer.set_prefetch(2)
    assert len(kombu.calls) == 7 and consumer.prefetch() == 2


def test_the_flow_applies_a_prefetch_a_quorum_consumer_put_off_once_the_interval_passed() -> None:
    """A limit that grew too soon after the last re-consume is applied at a later tick, never dropped
    (it was: the consumer kept its first prefetch, and a quorum worker uploaded one task at a time)."""
    clock = ManualClock()
    kombu = FakeKombuConsumer()
    consumer = LaneConsumer(kombu, quorum=True, clock=clock)  # type: ignore[arg-type]
    consumer.resume()
    consumer.set_prefetch(2)
    consumer.set_prefetch(9)  # put off
    clock.advance(RECONSUME_INTERVAL)
    if consumer.prefetch() != 9:  # what UploadFlow.tick does
        consumer.set_prefetch(9)
    assert kombu.channel.qos[-1] == (9, False) and kombu.calls[-2:] == ["cancel", "consume"]

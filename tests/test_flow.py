"""The upload flow, the queue topology and the upload-task message, without a broker.

The flow steers fakes of Celery's upload consumer and of the queue depths; the topology and the
messages are pure.
"""

from __future__ import annotations

from types import SimpleNamespace
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
from worker.gate import Gate
from worker.runtime import build_runtime
from worker.upload.circuit import FAILURES_TO_OPEN, Circuit, Permit, State
from worker.upload.concurrency import AdaptiveConcurrency
from worker.upload.flow import BACKLOG_EVENTS_MIN, BACKLOG_EVENTS_PER_SLOT, TaskSizes, UploadFlow
from worker.upload.step import UploadFlowStep

pytestmark = pytest.mark.timeout(30)


class FakeConsumer:
    def __init__(self) -> None:
        self.on = True
        self.count = 32
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


class FakeDepths:
    def __init__(self) -> None:
        self.ready: int | None = 0
        self.waiting: int | None = 0

    def upload_ready(self) -> int | None:
        return self.ready

    def delayed(self) -> int | None:
        return self.waiting


class Rig:
    def __init__(self) -> None:
        self.clock = ManualClock()
        self.circuit = Circuit(clock=self.clock, probe_base=1.0, probe_max=8.0)
        self.concurrency = AdaptiveConcurrency(ceiling=16, clock=self.clock)
        self.gate = Gate()
        self.consumer = FakeConsumer()
        self.depths = FakeDepths()
        self.task_sizes = TaskSizes(initial=1000)
        self.flow = UploadFlow(circuit=self.circuit, concurrency=self.concurrency, gate=self.gate,
                               consumer=self.consumer, depths=self.depths, clock=self.clock,
                               task_sizes=self.task_sizes)

    def outage(self) -> None:
        for n in range(FAILURES_TO_OPEN):
            self.circuit.failed(Permit(), batch=n, error="503")


def test_the_adaptive_limit_becomes_the_upload_queue_prefetch() -> None:
    rig = Rig()
    rig.flow.tick()
    assert rig.consumer.count == 1 and rig.gate.is_open
    starts = [rig.concurrency.started() for _ in range(1)]
    rig.clock.advance(0.1)
    for started in starts:
        rig.concurrency.finished(started, congested=False)
    rig.flow.tick()
    assert rig.consumer.count == 2


def test_an_open_circuit_stops_uploads_and_the_consumer_then_a_probe_with_prefetch_one() -> None:
    rig = Rig()
    rig.depths.ready = 3
    rig.outage()
    rig.flow.tick()
    assert rig.consumer.calls == ["pause"] and not rig.gate.is_open
    rig.flow.tick()
    assert rig.consumer.calls == ["pause"]  # nothing more while open
    rig.clock.advance(1.0)
    rig.flow.tick()  # half-open: one task, the probe
    assert rig.consumer.calls == ["pause", "resume"] and rig.consumer.count == 1
    assert not rig.gate.is_open  # there are tasks to probe with: events stay in RabbitMQ


def test_half_open_with_nothing_to_probe_lets_the_consumer_make_a_task() -> None:
    rig = Rig()
    rig.outage()
    rig.flow.tick()
    rig.clock.advance(1.0)
    rig.depths.ready = 0
    rig.flow.tick()
    assert rig.circuit.state is State.HALF_OPEN and rig.gate.is_open


def test_closing_restarts_the_ramp_from_one() -> None:
    rig = Rig()
    for _ in range(4):
        starts = [rig.concurrency.started() for _ in range(rig.concurrency.limit)]
        rig.clock.advance(0.1)
        for started in starts:
            rig.concurrency.finished(started, congested=False)
    assert rig.concurrency.limit == 16
    rig.outage()
    rig.flow.tick()
    rig.clock.advance(1.0)
    rig.flow.tick()
    probe = rig.circuit.permit()
    assert probe is not None
    rig.circuit.succeeded(probe)
    rig.flow.tick()
    assert rig.concurrency.limit == 1 and rig.consumer.count == 1 and rig.gate.is_open


#: Upload tasks of full batches (1000 events) that make the smallest backlog that pauses the consumer.
FULL_TASKS = BACKLOG_EVENTS_MIN // 1000


def test_backpressure_pauses_the_consumer_with_hysteresis() -> None:
    rig = Rig()
    rig.depths.ready = FULL_TASKS
    rig.flow.tick()
    assert not rig.gate.is_open and "backpressure" in rig.gate.reason
    assert f"about {BACKLOG_EVENTS_MIN} events in {FULL_TASKS} upload tasks" in rig.gate.reason
    rig.depths.ready = FULL_TASKS // 2 + 1
    rig.flow.tick()
    assert not rig.gate.is_open  # not yet: below half
    rig.depths.ready = FULL_TASKS // 2
    rig.flow.tick()
    assert rig.gate.is_open


def test_backpressure_counts_events_so_small_tasks_do_not_starve_the_uploads() -> None:
    rig = Rig()
    for _ in range(200):  # 1000 asset_ids against a slow API: two batches of 17 events a task
        rig.task_sizes.add(34)
    assert rig.task_sizes.mean == pytest.approx(34, abs=1)
    rig.depths.ready = FULL_TASKS  # as many tasks as would pause full batches: 1,088 events
    rig.flow.tick()
    assert rig.gate.is_open
    rig.depths.ready = BACKLOG_EVENTS_MIN // 34 + 1
    rig.flow.tick()
    assert not rig.gate.is_open


def test_backpressure_grows_with_the_requests_in_flight() -> None:
    rig = Rig()
    while rig.concurrency.limit < 16:
        starts = [rig.concurrency.started() for _ in range(rig.concurrency.limit)]
        rig.clock.advance(0.1)
        for started in starts:
            rig.concurrency.finished(started, congested=False)
    high = 16 * BACKLOG_EVENTS_PER_SLOT
    assert high > BACKLOG_EVENTS_MIN
    rig.depths.ready = high // 1000 - 1
    rig.flow.tick()
    assert rig.gate.is_open
    rig.depths.ready = high // 1000
    rig.flow.tick()
    assert not rig.gate.is_open


def test_task_sizes_follow_the_bundles_handed_on() -> None:
    sizes = TaskSizes(initial=1000)
    assert sizes.events_in(3) == 3000  # nothing handed on yet: full batches assumed
    for _ in range(200):
        sizes.add(20)
    assert sizes.events_in(10) == pytest.approx(200, abs=10)
    sizes.add(1000)
    assert 20 < sizes.mean < 100  # one large bundle moves it, a little


def test_an_unreadable_depth_changes_nothing() -> None:
    rig = Rig()
    rig.depths.ready = FULL_TASKS
    rig.flow.tick()
    rig.depths.ready = None
    rig.flow.tick()
    assert not rig.gate.is_open and f"in {FULL_TASKS} upload tasks" in rig.gate.reason


# --- the topology ----------------------------------------------------------------------------------


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
    assert "example.com" not in jsonutil.dumps(message.headers).decode()


def test_an_older_workers_message_is_read_as_one_batch() -> None:
    bundle = read_bundle(["asset-1", ['{"a":1}'], 3])
    assert [(b.asset_id, b.events, b.attempts) for b in bundle.batches] == [("asset-1", ['{"a":1}'], 3)]


@pytest.mark.parametrize("args", [[], [1, 2, 3, 4], [[{"asset_id": 1, "events": []}]], [["not a batch"]]])
def test_anything_else_is_refused_with_a_sentence(args: list[Any]) -> None:
    with pytest.raises(ValueError, match="batch|argument"):
        read_bundle(args)


# --- Celery's consumer of the upload queue ------------------------------------------------------------


class FakeQoS:
    def __init__(self, value: int) -> None:
        self.value = value
        self.prev = value
        self.applied: list[int] = []

    def update(self) -> None:
        if self.prev != self.value:
            self.applied.append(self.value)
            self.prev = self.value


class FakeTaskConsumer:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.queues = {"up"}

    def consuming_from(self, name: str) -> bool:
        return name in self.queues

    def cancel_by_queue(self, name: str) -> None:
        self.calls.append("cancel")
        self.queues.discard(name)

    def add_queue(self, queue: Any) -> None:
        self.calls.append("add")
        self.queues.add(queue)

    def consume(self) -> None:
        self.calls.append("consume")


class FakeC:
    def __init__(self, qos_global: bool) -> None:
        self.qos = FakeQoS(32)
        self.qos_global = qos_global
        self.task_consumer = FakeTaskConsumer()
        self.app = type("App", (), {"amqp": type("Amqp", (), {"queues": {"up": "up"}})()})()


def test_a_new_prefetch_is_applied_by_setting_celerys_value_too() -> None:
    from worker.upload.flow import CeleryUploadConsumer

    c = FakeC(qos_global=True)
    CeleryUploadConsumer(c, "up").set_prefetch(3)
    assert (c.qos.value, c.qos.applied) == (3, [3])  # Celery's loop would otherwise put its own back
    assert c.task_consumer.calls == []  # channel-wide prefetch: applies at once


def test_per_consumer_prefetch_takes_a_new_consumer_at_most_so_often() -> None:
    from worker.upload.flow import RECONSUME_INTERVAL, CeleryUploadConsumer

    clock = ManualClock()
    c = FakeC(qos_global=False)  # quorum queues
    consumer = CeleryUploadConsumer(c, "up", clock=clock)
    consumer.set_prefetch(4)
    assert c.task_consumer.calls == ["cancel", "add", "consume"]
    consumer.set_prefetch(8)
    assert len(c.task_consumer.calls) == 3  # too soon: the next one carries it
    consumer.set_prefetch(1)
    assert len(c.task_consumer.calls) == 6  # a probe: at once
    clock.advance(RECONSUME_INTERVAL)
    consumer.set_prefetch(2)
    assert len(c.task_consumer.calls) == 9


def test_the_flow_step_counts_events_with_the_sizes_the_consumer_feeds() -> None:
    settings = Settings.from_env({"ACTIVITY_BATCH_SIZE": "400"}, require_api=False)
    app = Celery("test-flow-step", set_as_current=False)
    runtime = build_runtime(app, settings, clock=ManualClock())
    assert runtime.task_sizes.mean == 400  # before any hand-off: a full batch per task
    ticks: list[Any] = []
    qos = SimpleNamespace(value=0, update=lambda: None)
    c = SimpleNamespace(app=SimpleNamespace(runtime=lambda: runtime), qos=qos, qos_global=True,
                        timer=SimpleNamespace(call_repeatedly=lambda interval, fn: ticks.append(fn)))
    step = UploadFlowStep.__new__(UploadFlowStep)
    step._timer = step._depths = None
    step.start(c)
    try:
        (tick,) = ticks
        flow = tick.__self__
        assert flow.task_sizes is runtime.task_sizes and qos.value == runtime.concurrency.limit
    finally:
        step.shutdown(c)
        runtime.publishers.close()

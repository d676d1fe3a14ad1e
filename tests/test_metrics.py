"""The Prometheus metrics: counted once each, by the part that knows, and adding up.

Events go through the real :class:`~worker.ingest.Ingest` and
:class:`~worker.upload.delivery.Delivery` with fakes around them (a broker that is a list, a
scripted API, a ManualClock); the metrics are a fresh :class:`~worker.ops.metrics.Metrics` per test,
fed the way the worker feeds them (the consumer's functions, the delivery's listener).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from celery import Celery

from config.settings import Settings, SettingsError
from tests.fakes import Immediate
from worker.broker.messages import Bundle, UploadBatch, read_bundle, upload_message
from worker.broker.publisher import Outgoing
from worker.broker.topology import Topology
from worker.clock import ManualClock
from worker.errors import PublishError, Rejected, Transient
from worker.events import jsonutil
from worker.ingest.acks import Acker
from worker.ingest.batching import Batcher, Ticket
from worker.ingest.pipeline import Ingest
from worker.ops import metrics
from worker.upload.circuit import Circuit
from worker.upload.concurrency import AdaptiveConcurrency
from worker.upload.delivery import Delivery
from worker.upload.retry import RetryPolicy

pytestmark = pytest.mark.timeout(60)

SETTINGS = Settings.from_env({"ACTIVITY_BATCH_WAIT": "1", "NETCORE_API_KEY": "k"}, require_api=False)
TOPOLOGY = Topology.of(SETTINGS)
UPLOAD, DLQ = TOPOLOGY.upload, TOPOLOGY.dead_letter
#: Timestamps around the ManualClock's wall time (2026-01-01T00:00:00Z).
FRESH, STALE = "2025-12-31T18:00:00Z", "2025-12-01T00:00:00Z"


@pytest.fixture(autouse=True)
def fresh() -> Iterator[metrics.Metrics]:
    """Every test counts from zero in metrics of its own, fed through the listener, as the
    runtime wires it."""
    global CURRENT, LISTENER
    CURRENT = metrics.Metrics()
    LISTENER = metrics.MetricsListener(CURRENT)
    yield CURRENT


#: This test's metrics, and the listener the worker's parts report to.
CURRENT = metrics.Metrics()
LISTENER = metrics.MetricsListener(CURRENT)


def value(name: str, **labels: str) -> float:
    """One sample as a scrape would show it (0 when absent)."""
    return CURRENT.registry.get_sample_value(metrics.PREFIX + name, labels) or 0.0


def total(name: str, **labels: str) -> float:
    """The sum of a labelled counter's samples matching ``labels``."""
    found = 0.0
    for family in CURRENT.registry.collect():
        for sample in family.samples:
            if sample.name == metrics.PREFIX + name and labels.items() <= sample.labels.items():
                found += sample.value
    return found


def event(event_id: str, asset_id: Any = "asset-a", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "activity_name": "Purchase", "asset_id": asset_id, "timestamp": FRESH, "identity": "c-1",
        "activity_source": "web", "activity_params": {"event_id": event_id},
    }
    body.update(overrides)
    return body


class Message:
    """What the ingest step reads of a kombu message."""

    def __init__(self, body: bytes, tag: int, headers: dict[str, Any] | None = None) -> None:
        self.body, self.delivery_tag, self.headers = body, tag, headers or {}
        self.content_type, self.content_encoding = "application/json", "utf-8"


class Api:
    """The API: 400 for a request holding an event marked ``reject``; one 503 first if asked."""

    def __init__(self, fail_first: bool = False) -> None:
        self.fail_first = fail_first
        self.requests: list[int] = []

    def post(self, events: Sequence[Any]) -> None:
        self.requests.append(len(events))
        if self.fail_first:
            self.fail_first = False
            raise Transient("the API answered 503", status=503)
        if any(jsonutil.loads(e)["activity_params"].get("reject") for e in events):
            raise Rejected("the API rejected the event (400 Bad Request)", status=400)


def delivery(api: Any, clock: ManualClock, publish: Any) -> Delivery:
    app = Celery("test-metrics", set_as_current=False)
    return Delivery(
        client=api, circuit=Circuit(clock=clock, probe_base=1.0, probe_max=8.0),
        concurrency=AdaptiveConcurrency(ceiling=4, clock=clock),
        policy=RetryPolicy(max_retries=3, backoff=0.0, backoff_max=0.0), topology=TOPOLOGY, publish=publish,
        retry_message=lambda queue, bundle: upload_message(app, queue, bundle), clock=clock,
        listener=LISTENER,
    )


def run_pipeline() -> tuple[Api, list[Outgoing]]:
    """A mix of messages through ingest, then every upload (and retry) through delivery."""
    clock = ManualClock()
    published: list[Outgoing] = []
    batcher = Batcher(max_events=1000, max_wait=1.0, max_bytes=4 << 20, max_buffered=10_000, clock=clock)

    app = Celery("test-metrics-ingest", set_as_current=False)

    def upload(bundle: Bundle) -> Outgoing:
        return upload_message(app, UPLOAD, bundle)

    ingest = Ingest(settings=SETTINGS, batcher=batcher, acker=Acker(lambda tag, multiple: None),
                    publisher=Immediate(published.extend), upload_message=upload, clock=clock, max_outstanding=10_000,
                    quarantine_queue=TOPOLOGY.quarantine, listener=LISTENER)
    good = [event(f"a{i}") for i in range(6)] + [event("s1", timestamp=STALE), event("s2", timestamp=STALE)]
    good.append(event("r1", activity_params={"event_id": "r1", "reject": True}))
    bodies: list[tuple[bytes, dict[str, Any]]] = [
        (jsonutil.dumps(good), {}),
        (jsonutil.dumps([event("b1", "asset-b"), event("bad-time", "asset-b", timestamp="yesterday")]), {}),
        (jsonutil.dumps([event("no-asset", None), event("huge", activity_params={"x": "y" * 600_000})]), {}),
        (b'{"activity_name": "Purchase", "asset_id": "asset-b", "asset_id": "asset-b"}', {}),  # malformed later
        (b"{not json", {}),
        (jsonutil.dumps(event("p1")), {"x-delivery-count": 10}),  # a suspect: to quarantine, counted there
    ]
    for tag, (body, headers) in enumerate(bodies, 1):
        ingest.on_message(Message(body, tag, headers))
    clock.advance(1.5)
    ingest.tick()
    LISTENER.observe_batcher(batcher)
    api = Api(fail_first=True)
    uploader = delivery(api, clock, published.extend)
    done = 0
    while any(m.queue == UPLOAD or ".delay." in m.queue for m in published[done:]):
        message = next(m for m in published[done:] if m.queue == UPLOAD or ".delay." in m.queue)
        done = published.index(message) + 1
        uploader.deliver(read_bundle(jsonutil.loads(message.body)[0]))
    return api, published


def test_every_event_is_counted_once_and_the_sums_add_up() -> None:
    api, published = run_pipeline()
    dead = [json.loads(m.body)["reason"] for m in published if m.queue == DLQ]
    assert sorted(dead) == ["invalid", "invalid", "invalid", "malformed", "malformed", "rejected"]
    assert [m.queue for m in published].count(TOPOLOGY.quarantine) == 1

    received, batched = value("events_received_total"), value("events_batched_total")
    assert (received, batched) == (15, 12)  # 14 events read, an unreadable body (the suspect: not yet)
    assert received == batched + total("events_dead_lettered_total", stage="ingest")
    assert batched == total("events_valid_total") + total("events_invalid_total", stage="delivery")
    assert value("events_valid_total", account="default") == 10
    assert value("events_delivered_total", account="default") == 9
    assert total("events_delivered_total") + total("events_dead_lettered_total") == received
    assert value("events_stale_total", account="default") == 2
    assert value("events_invalid_total", stage="ingest", reason="missing_asset_id") == 1
    assert value("events_invalid_total", stage="ingest", reason="too_large") == 1
    assert value("events_invalid_total", stage="ingest", reason="malformed") == 1
    assert value("events_invalid_total", stage="delivery", reason="invalid") == 1
    assert value("events_invalid_total", stage="delivery", reason="malformed") == 1
    assert value("events_dead_lettered_total", stage="ingest", reason="poison", account="") == 0
    assert value("events_dead_lettered_total", stage="delivery", reason="rejected", account="default") == 1
    assert total("events_dead_lettered_total", stage="delivery", reason="refused") == 0
    assert value("retries_scheduled_total", account="default") == 1
    assert value("uploads_total", account="default", status="503", outcome="transient") == 1
    assert total("uploads_total") == len(api.requests) == value("upload_batch_size_count", account="default")
    assert value("upload_batch_size_sum", account="default") == sum(api.requests)
    assert value("upload_duration_seconds_count", account="default") == len(api.requests)
    assert value("oldest_event_age_seconds") == 0 and value("events_buffered") == 0


def test_requests_are_counted_by_status_whatever_the_answer() -> None:
    class Script:
        def __init__(self, answers: list[BaseException | None]) -> None:
            self.answers = answers

        def post(self, events: Sequence[Any]) -> None:
            answer = self.answers.pop(0)
            if answer is not None:
                raise answer

    clock = ManualClock()
    answers: list[BaseException | None] = [None, Transient("timeout"), Transient("500", status=500),
                                           Rejected("400", status=400), RuntimeError("a bug")]
    uploader = delivery(Script(answers), clock, lambda messages: None)
    texts = [jsonutil.dumps(event(f"e{i}")).decode() for i in range(1000)]
    for size in (1000, 3, 2, 1, 1):
        uploader.deliver(Bundle([UploadBatch("asset-a", texts[:size])], "default"))
    d = {"account": "default"}
    assert value("uploads_total", status="200", outcome="success", **d) == 1
    assert value("uploads_total", status="error", outcome="transient", **d) == 1
    assert value("uploads_total", status="500", outcome="transient", **d) == 1
    assert value("uploads_total", status="400", outcome="permanent", **d) == 1
    assert value("uploads_total", status="error", outcome="error", **d) == 1
    assert value("upload_batch_size_count", **d) == 5 and value("upload_batch_size_sum", **d) == 1007
    assert value("upload_batch_size_bucket", le="1.0", **d) == 2
    assert value("upload_batch_size_bucket", le="500.0", **d) == 4


def test_oldest_event_age_follows_the_oldest_open_batch() -> None:
    clock = ManualClock()
    batcher = Batcher(max_events=1000, max_wait=1.0, max_bytes=1 << 20, max_buffered=10_000, clock=clock)
    ticket = Ticket(lambda: None)
    LISTENER.observe_batcher(batcher)
    assert value("oldest_event_age_seconds") == 0
    batcher.add("asset-a", "{}", 2, ticket)
    clock.advance(0.5)
    batcher.add("asset-b", "{}", 2, ticket)
    batcher.add("asset-b", "{}", 2, ticket)
    clock.advance(0.25)
    LISTENER.observe_batcher(batcher)
    assert value("oldest_event_age_seconds") == pytest.approx(0.75)
    assert value("events_buffered") == 3
    clock.advance(0.2)
    released = batcher.release_oldest()  # backpressure: the oldest batch goes alone
    assert released is not None and released.asset_id == "asset-a"
    clock.advance(0.1)
    LISTENER.observe_batcher(batcher)
    assert value("oldest_event_age_seconds") == pytest.approx(0.55)
    batcher.drain()
    LISTENER.observe_batcher(batcher)
    assert value("oldest_event_age_seconds") == 0 and value("events_buffered") == 0


def test_each_accounts_circuit_is_seen_in_the_metrics_under_its_name() -> None:
    clock = ManualClock()
    circuit = Circuit(clock=clock, probe_base=1.0, probe_max=8.0, account="brand-b", listeners=[LISTENER])
    metrics.watch(CURRENT.circuit_state.labels("brand-b"), lambda: metrics.CIRCUIT_STATES[circuit.state.value])
    b = {"account": "brand-b"}
    assert value("circuit_state", **b) == 0
    for n in range(5):
        circuit.failed(circuit.permit(f"a{n % 2}") or pytest.fail("refused"), error="503", counted=False)
    assert value("circuit_state", **b) == 3 and value("circuit_opened_total", **b) == 1
    clock.advance(1.0)
    circuit.poll()
    assert value("circuit_state", **b) == 1
    probe = circuit.permit("p")
    assert probe is not None
    circuit.failed(probe, error="503", counted=False)
    clock.advance(2.0)
    circuit.poll()
    probe = circuit.permit("p")
    assert probe is not None
    circuit.succeeded(probe)
    assert value("probes_total", result="failed", **b) == 1 and value("probes_total", result="ok", **b) == 1
    assert value("circuit_state") == 0


def test_metrics_port_0_turns_the_endpoint_off() -> None:
    assert metrics.setup(Settings.from_env({"METRICS_PORT": "0"}, require_api=False), CURRENT) is None


def test_a_port_in_use_is_reported_and_the_worker_runs_on(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings.from_env({"METRICS_PORT": str(port)}, require_api=False)
        with caplog.at_level(logging.ERROR, logger="worker.ops.metrics"):
            assert metrics.setup(settings, CURRENT) is None
    assert "METRICS_PORT" in caplog.text and str(port) in caplog.text
    LISTENER.events_read(received=1, batched=1)  # still counts, in memory
    CURRENT.flush()
    assert value("events_received_total") == 1


def test_settings() -> None:
    default = Settings.from_env({}, require_api=False)
    assert (default.metrics_port, default.metrics_address) == (9808, "127.0.0.1")
    chosen = Settings.from_env({"METRICS_PORT": "9100", "METRICS_ADDRESS": "0.0.0.0"}, require_api=False)
    assert (chosen.metrics_port, chosen.metrics_address) == (9100, "0.0.0.0")
    with pytest.raises(SettingsError, match="METRICS_PORT=70000"):
        Settings.from_env({"METRICS_PORT": "70000"}, require_api=False)


def test_a_delivery_whose_outcome_the_broker_refused_is_counted_once_when_it_happened() -> None:
    """What was delivered is delivered, whatever the broker says of the dead letters next; the
    task publishes the kept outcome again without uploading (worker.upload.task): counted once."""
    def refuse(messages: Sequence[Outgoing]) -> None:
        raise PublishError("not confirmed", messages=messages)

    uploader = delivery(Api(), ManualClock(), refuse)
    bad = event("r1", activity_params={"event_id": "r1", "reject": True})
    with pytest.raises(PublishError):
        uploader.deliver(Bundle([UploadBatch("asset-a", [jsonutil.dumps(e).decode() for e in (event("e1"), bad)])]))
    assert total("uploads_total") == 3  # the requests did happen: 400, then 200 and 400
    assert total("events_delivered_total") == 1 and total("events_valid_total") == 2
    assert total("events_dead_lettered_total") == 1

"""Every event accounted for on every path: what a review and a first-time user found, each path
tried with the real worker, RabbitMQ and the sandbox, and a ledger of ids.
"""

from __future__ import annotations

import socket
from collections import Counter

import amqp
from kombu import Connection

from config.settings import Settings
from tests.broker_settings import broker_env
from tests.harness import DeadLetters, QueueSet, event, event_id_of, publish_events
from worker.broker.topology import Topology
from worker.deadletter import commands as dlq_commands
from worker.sandbox import Sandbox


def test_every_queue_of_the_contract_exists_as_soon_as_the_worker_started(start_worker, queues: QueueSet) -> None:
    worker = start_worker()
    topology = Topology.of(Settings.from_env(worker.env, require_api=False))
    with Connection(queues.broker_url, heartbeat=0) as connection:
        for queue in topology.all_queues():
            channel = connection.channel()
            try:
                channel.queue_declare(queue.name, passive=True)  # raises NotFound when missing
            except amqp.exceptions.NotFound:
                raise AssertionError(f"{queue.name} does not exist after start-up") from None
            channel.close()
    counts = dlq_commands.count(queues.settings)  # a monitor pointed at it from the start
    assert counts.total == 0


def test_a_replayed_event_dead_again_says_how_often_it_was_replayed_whichever_stage(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    rejected = event("r1")
    rejected["activity_params"]["sandbox_reject"] = True  # passes our checks, the API says 400
    invalid = event("i1", activity_source="WEB")  # caught by validation on the upload side
    fine = event("f1")
    publish_events(queues.settings.queue, [rejected, invalid, fine], headers={"x-replays": 2})
    start_worker()
    assert dead_letters.wait_for(2, timeout=60)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 1, timeout=30)
    by_reason = {e["reason"]: e for e in dead_letters.envelopes}
    assert by_reason["rejected"]["replays"] == 2 and event_id_of(by_reason["rejected"]["event"]) == "r1"
    assert by_reason["invalid"]["replays"] == 2 and event_id_of(by_reason["invalid"]["event"]) == "i1"
    assert [event_id_of(e) for e in sandbox.accepted()] == ["f1"]


def test_upload_messages_over_the_brokers_max_message_size_are_split_and_the_consumer_goes_on(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    ids = [f"m{i}" for i in range(3000)]
    padding = "p" * 700  # about 1 KB per event: a full batch is about a megabyte
    events = [event(i, asset_id=f"asset-{n % 3}", note=padding) for n, i in enumerate(ids)]
    with broker_env(max_message_size=262_144):  # 256 KiB: the worker's batches are four times that
        worker = start_worker(ACTIVITY_BATCH_MAX_BYTES=str(8 * 1024 * 1024))
        publish_events(queues.settings.queue, [events[k:k + 100] for k in range(0, 3000, 100)])
        assert sandbox.wait_until(lambda s: s.accepted_count() >= len(ids), timeout=120), worker.log()[-3000:]
        assert worker.wait_for_log("refuses messages over 262144 bytes", timeout=10)
        probe = socket.create_connection(("127.0.0.1", 5672), timeout=5)  # the broker is still fine
        probe.close()
    dead_letters.settle(quiet=0.5)
    assert dead_letters.envelopes == []
    assert Counter(event_id_of(e) for e in sandbox.accepted()) == Counter(ids)  # each once
    assert worker.process.poll() is None

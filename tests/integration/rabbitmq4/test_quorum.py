"""Quorum queues on RabbitMQ 4.x: the delivery count the worker's poison detection relies on,
the broker's own delivery limit, and the worker's quarantine.

What RabbitMQ 4.0 does (found by experiment on 4.0.5, pinned down by the first tests here):

- every hand-back of a message (its consumer's connection or channel closed, a reject or nack
  with requeue) adds one to its ``x-delivery-count``, which a first delivery does not carry
  (3.10 says 0);
- after 20 hand-backs (the default delivery limit, new in 4.0) the next one takes the message
  out of the queue: dead-lettered (reason ``delivery_limit``) where the queue has a target (the
  worker's upload and quarantine queues), dropped where it has none (``activities`` and Celery's
  queue, declared as producers declare them, and the dead-letter queues);
- the count belongs to the message: dead-lettered into another queue, it arrives there with it,
  and a first delivery keeps whatever ``x-delivery-count`` its publisher set (3.10 overwrote it
  with 0).

The worker moves a message delivered ``ACTIVITY_DELIVERY_LIMIT`` times (10 by default, below
20) to the quarantine queue, so ``activities`` never gets to drop one, and it publishes it there
without its count, so that it is handled alone from zero. The tests of
``tests/integration/test_quorum.py`` run here too (imported below), on this package's 4.x nodes.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from config.settings import Settings
from tests.harness import DeadLetters, QueueSet, event, event_id_of, publish_events, publish_raw
from tests.integration.test_quorum import (  # noqa: F401  (collected here: run on RabbitMQ 4.x)
    test_a_message_the_worker_died_holding_alone_is_set_aside_whole,
    test_innocent_messages_a_crash_left_over_the_delivery_limit_are_delivered,
)
from worker.broker.messages import Bundle, UploadBatch, upload_message
from worker.broker.topology import QUORUM, Topology, dead_letter_arguments
from worker.events import jsonutil
from worker.sandbox import Sandbox

pytestmark = [pytest.mark.timeout(300), pytest.mark.quorum]

#: RabbitMQ 4.0's default delivery limit of a quorum queue: hand-backs a message survives.
BROKER_LIMIT = 20

#: Seconds to wait for messages to arrive.
DEADLINE = 30.0

#: The ways a consumer hands messages back unacknowledged.
HAND_BACKS = ("connection closed", "rejected", "channel closed")


def hand_back(url: str, queue: Queue, *, count: int, how: str = "connection closed") -> list[int | None]:
    """Take ``count`` messages of ``queue`` and give them back unacknowledged, ``how``: the
    consumer's connection closed (a worker killed with them in hand), each rejected with
    requeue, or the channel closed (how ``python -m worker.dlq`` hands back what it read).
    Return the ``x-delivery-count`` of each (None: the message had none)."""
    taken: list[Message] = []
    with Connection(url, heartbeat=0) as connection:
        channel = connection.channel()
        consumer = Consumer(channel, [queue], prefetch_count=count, on_message=taken.append)
        consumer.consume()
        while len(taken) < count:
            try:
                connection.drain_events(timeout=DEADLINE)
            except socket.timeout:
                raise AssertionError(f"{len(taken)} of {count} messages came") from None
        if how == "rejected":
            consumer.cancel()  # or the broker hands them straight back to this consumer
            for message in taken:
                message.reject(requeue=True)
        elif how == "channel closed":
            channel.close()
    return [(m.headers or {}).get("x-delivery-count") for m in taken]


def publish(queues: QueueSet, queue: Queue, events: list[Any]) -> None:
    """Publish events to ``queue`` of the test's node, declaring it as ``queue`` says."""
    publish_events(queue.name, events, queue_arguments=queue.queue_arguments, broker_url=queues.broker_url)


def declare(queues: QueueSet, *declared: Queue) -> None:
    with Connection(queues.broker_url, heartbeat=0) as connection:
        for queue in declared:
            queue(connection.default_channel).declare()


def ledger(sent: list[str], delivered: list[str | None], dead: list[str | None]) -> tuple[set[str], int]:
    """(ids lost, ids seen more than once) of ``sent`` against what was delivered and dead-lettered."""
    seen = Counter(delivered) + Counter(dead)
    return set(sent) - set(seen), sum(n - 1 for n in seen.values() if n > 1)


@pytest.mark.parametrize("how", HAND_BACKS)
def test_rabbitmq_4_counts_each_hand_back_and_takes_the_message_out_after_twenty(how: str, queues: QueueSet) -> None:
    # the target as the worker declares a dead-letter queue (the reader below declares it so too)
    target = Queue(f"{queues.prefix}.target", durable=True, queue_arguments=dead_letter_arguments(True))
    source = Queue(f"{queues.prefix}.source", durable=True, queue_arguments={
        **QUORUM, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": target.name})
    declare(queues, target, source)
    publish(queues, source, [event("m1")])
    counts = [hand_back(queues.broker_url, source, count=1, how=how)[0] for _ in range(BROKER_LIMIT + 1)]
    assert counts == [None, *range(1, BROKER_LIMIT + 1)]  # no header at first, then one per hand-back
    letters = DeadLetters(target.name, broker_url=queues.broker_url, quorum=True)
    try:
        assert letters.wait_for(1, timeout=DEADLINE), "the 21st hand-back did not take the message out"
        assert [event_id_of(body) for body in letters.envelopes] == ["m1"]
    finally:
        letters.close()
    assert queues.depth(source.name) == 0


def test_a_first_delivery_keeps_the_count_its_publisher_gave_it(queues: QueueSet) -> None:
    """Why the worker takes the count off a message it moves to quarantine."""
    queue = Queue(f"{queues.prefix}.forwarded", durable=True, queue_arguments=QUORUM)
    publish_raw(queue.name, [jsonutil.dumps(event("f1"))], headers={"x-delivery-count": 15},
                queue_arguments=queue.queue_arguments, broker_url=queues.broker_url)
    assert hand_back(queues.broker_url, queue, count=1) == [15]
    assert hand_back(queues.broker_url, queue, count=1) == [1]


def test_messages_handed_back_twenty_times_are_delivered_not_dropped(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    """A crash loop's riders, one hand-back away from being dropped by RabbitMQ 4: the worker
    with its default settings reads them once more, sets them aside and delivers them all."""
    assert Settings.from_env({}, require_api=False).delivery_limit < BROKER_LIMIT
    ids = [f"r{n}" for n in range(50)]
    source = Topology.of(queues.settings).source_queue()
    publish(queues, source, [event(i, asset_id=f"asset-{n % 3}") for n, i in enumerate(ids)])
    for crash in range(BROKER_LIMIT):
        assert set(hand_back(queues.broker_url, source, count=len(ids))) == {crash or None}
    worker = start_worker()
    assert sandbox.wait_until(lambda s: s.accepted_count() >= len(ids), timeout=120), worker.log()[-3000:]
    dead_letters.settle(quiet=1.0)
    assert dead_letters.envelopes == []
    assert ledger(ids, [event_id_of(e) for e in sandbox.accepted()], dead_letters.ids()) == (set(), 0)
    assert "delivered 20 times without being handled: moving it to" in worker.log()


def test_an_upload_task_handed_back_past_the_limit_is_dead_lettered_not_dropped(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    """RabbitMQ 4 dead-letters an upload task message after 20 hand-backs (crashes holding it)
    to ``activities.dead.unhandled``; the worker writes each of its events to the dead-letter
    queue, whole and replayable."""
    ids = [f"u{n}" for n in range(30)]
    texts = [jsonutil.dumps(event(i)).decode() for i in ids]
    topology = Topology.of(queues.settings)
    upload = topology.upload_queue()
    declare(queues, topology.unhandled_queue(), upload)
    message = upload_message(Celery("producer", set_as_current=False), upload.name,
                             Bundle([UploadBatch("asset-1", texts)]))
    publish_raw(upload.name, [message.body], content_type=message.content_type, headers=message.headers,
                encoding="binary", queue_arguments=upload.queue_arguments, broker_url=queues.broker_url)
    for _ in range(BROKER_LIMIT + 1):
        hand_back(queues.broker_url, upload, count=1)
    worker = start_worker()
    assert dead_letters.wait_for(len(ids), timeout=60), worker.log()[-3000:]
    dead_letters.settle(quiet=1.0)
    assert dead_letters.by_reason() == {"unhandled": len(ids)}
    assert all("delivery_limit" in e["error"] for e in dead_letters.envelopes), dead_letters.envelopes[0]["error"]
    assert ledger(ids, [event_id_of(e) for e in sandbox.accepted()], dead_letters.ids()) == (set(), 0)


def test_messages_dead_lettered_into_activities_with_their_count_are_delivered_through_quarantine(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    """Messages a producer's own quorum queue dead-lettered into ``activities`` after its delivery
    limit bring their count (21) along: suspects at once. Moved to the quarantine queue without
    that count (a first delivery would keep it on RabbitMQ 4, and make each one poison at once),
    each is handled alone and delivered."""
    ids = [f"o{n}" for n in range(20)]
    source = Topology.of(queues.settings).source_queue()
    outbox = Queue(f"{queues.prefix}.outbox", durable=True, queue_arguments={
        **QUORUM, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": source.name})
    declare(queues, source, outbox)
    publish(queues, outbox, [event(i) for i in ids])
    for _ in range(BROKER_LIMIT + 1):
        hand_back(queues.broker_url, outbox, count=len(ids))
    worker = start_worker()
    assert sandbox.wait_until(lambda s: s.accepted_count() >= len(ids), timeout=60), worker.log()[-3000:]
    dead_letters.settle(quiet=1.0)
    assert dead_letters.envelopes == []  # none called poison
    assert ledger(ids, [event_id_of(e) for e in sandbox.accepted()], dead_letters.ids()) == (set(), 0)
    assert worker.log().count("delivered 21 times without being handled: moving it to") == len(ids)


def test_dead_letters_survive_the_dead_letter_command_reading_them_again_and_again(queues: QueueSet) -> None:
    """The dead-letter command reads each dead letter and hands it back (count, list, a dry run);
    on 4.x each hand-back counts, and at RabbitMQ's default limit of 20 the message would be
    dropped. The worker declares its dead-letter queues without that limit (worker.broker.topology)."""
    from datetime import datetime, timezone

    from worker.deadletter import cli as dlq
    from worker.deadletter import envelopes as deadletter

    settings = queues.settings
    failed_at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    bodies = [deadletter.envelope(reason="invalid", error="e", failed_at=failed_at, event=event(f"d{n}"))
              for n in range(5)]
    publish_raw(settings.dead_letter_queue, [jsonutil.dumps(body) for body in bodies],
                queue_arguments=Topology.of(settings).dead_letter_queue().queue_arguments)
    totals = [dlq.count(settings).total for _ in range(BROKER_LIMIT + 5)]
    assert totals == [5] * (BROKER_LIMIT + 5)

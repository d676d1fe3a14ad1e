"""``activities`` as a quorum queue: a message the worker dies holding, again and again, ends
in the dead-letter queue as ``poison`` instead of a crash loop; the rest flows on.
"""

from __future__ import annotations

import socket

import pytest
from kombu import Connection, Consumer

from config.settings import Settings
from tests.harness import DeadLetters, QueueSet, event, event_id_of, publish_events, publish_raw
from worker.broker.topology import Topology
from worker.events import jsonutil
from worker.sandbox import Sandbox

QUORUM = {"x-queue-type": "quorum"}


def die_holding_it(queues: QueueSet, *, quarantine: bool = False, count: int = 1) -> list[int]:
    """Take the first ``count`` messages of ``activities`` (or of the quarantine queue) and drop
    the connection without acknowledging them, as a worker killed with them in hand would;
    return the delivery counts the broker gave them."""
    seen: list[int] = []
    with Connection(queues.broker_url) as connection:
        settings = Settings.from_env({**queues.env, "ACTIVITY_QUEUE_TYPE": "quorum"}, require_api=False)
        topology = Topology.of(settings)
        queue = topology.quarantine_queue() if quarantine else topology.source_queue()
        consumer = Consumer(connection.channel(), [queue], prefetch_count=count,
                            on_message=lambda m: seen.append((m.headers or {}).get("x-delivery-count", 0)))
        consumer.consume()
        while len(seen) < count:
            try:
                connection.drain_events(timeout=10)
            except socket.timeout:
                raise AssertionError("the messages never came") from None
    return seen


@pytest.mark.quorum
def test_innocent_messages_a_crash_left_over_the_delivery_limit_are_delivered(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    """A crash raises the delivery count of every message in the prefetch window: over the
    limit, they are suspects, handled alone, and delivered; none is called poison."""
    ids = [f"i{n}" for n in range(50)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 3}") for n, i in enumerate(ids)],
                   queue_arguments=QUORUM)
    for crash in range(3):
        assert set(die_holding_it(queues, count=len(ids))) == {crash}  # every message in hand counted
    worker = start_worker(ACTIVITY_QUEUE_TYPE="quorum", ACTIVITY_DELIVERY_LIMIT=3)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= len(ids), timeout=60), worker.log()[-3000:]
    dead_letters.settle(quiet=1.0)
    assert dead_letters.envelopes == []
    assert sorted(event_id_of(e) for e in sandbox.accepted()) == sorted(ids)
    assert "moving it to" in worker.log()


@pytest.mark.quorum
def test_a_message_the_worker_died_holding_alone_is_set_aside_whole(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    poison = jsonutil.dumps(event("poison"))
    topology = Topology.of(queues.settings)
    publish_raw(topology.quarantine, [poison], headers={"x-suspect-deliveries": 10},
                queue_arguments=topology.quarantine_queue().queue_arguments)
    assert die_holding_it(queues, quarantine=True) + die_holding_it(queues, quarantine=True) == [0, 1]
    publish_events(queues.settings.queue, [event("after")], queue_arguments=QUORUM)
    start_worker(ACTIVITY_QUEUE_TYPE="quorum", ACTIVITY_DELIVERY_LIMIT=3)
    assert dead_letters.wait_for(1, timeout=30)
    (envelope,) = dead_letters.envelopes
    assert envelope["reason"] == "poison"
    assert envelope["details"] == {"deliveries": 12}
    assert envelope["raw"].encode() == poison  # kept whole, replayable
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 1, timeout=30)
    assert [event_id_of(e) for e in sandbox.accepted()] == ["after"]  # the rest flows on

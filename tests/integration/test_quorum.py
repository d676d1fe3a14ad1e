"""``activities`` as a quorum queue: a message the worker dies holding, again and again, ends
in the dead-letter queue as ``poison`` instead of a crash loop; the rest flows on.
"""

from __future__ import annotations

import socket

from kombu import Connection, Consumer

from config.settings import Settings
from tests.harness import DeadLetters, QueueSet, event, event_id_of, publish_events
from worker.parsing import raw_text
from worker.runtime import source_queue
from worker import jsonutil
from worker.sandbox import Sandbox

QUORUM = {"x-queue-type": "quorum"}


def die_holding_it(queues: QueueSet) -> int:
    """Take the first message and drop the connection without acknowledging it, as a worker
    killed with the message in hand would; return the delivery count the broker gave it."""
    seen: list[int] = []
    with Connection(queues.broker_url) as connection:
        settings = Settings.from_env({**queues.env, "ACTIVITY_QUEUE_TYPE": "quorum"}, require_api=False)
        queue = source_queue(settings)
        consumer = Consumer(connection.channel(), [queue], prefetch_count=1,
                            on_message=lambda m: seen.append((m.headers or {}).get("x-delivery-count", 0)))
        consumer.consume()
        while not seen:
            try:
                connection.drain_events(timeout=10)
            except socket.timeout:
                raise AssertionError("the message never came") from None
    return seen[0]


def test_a_message_that_kills_the_worker_every_time_is_set_aside(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    poison = event("poison")
    publish_events(queues.settings.queue, [poison], queue_arguments=QUORUM)
    counts = [die_holding_it(queues) for _ in range(3)]
    assert counts == [0, 1, 2]  # the broker counts every delivery that died
    publish_events(queues.settings.queue, [event("after")], queue_arguments=QUORUM)
    start_worker(ACTIVITY_QUEUE_TYPE="quorum", ACTIVITY_DELIVERY_LIMIT=3)
    assert dead_letters.wait_for(1, timeout=30)
    (envelope,) = dead_letters.envelopes
    assert envelope["reason"] == "poison"
    assert envelope["details"] == {"deliveries": 3}
    assert envelope["raw"] == raw_text(jsonutil.dumps(poison))  # kept whole, replayable by hand
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 1, timeout=30)
    assert [event_id_of(e) for e in sandbox.accepted()] == ["after"]  # the rest flows on

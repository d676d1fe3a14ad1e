"""The broker side: queues of this run only, the preload, and the bare drain (the limit).

Every queue name starts with this run's prefix and is deleted at the end, whatever happens,
so a benchmark never reads or leaves anyone else's messages (the tests' ``QueueSet`` idea;
the test harness itself is not imported: it prepares a broker user of the tests' own). A
worker declares more queues than the four it is given names for (the delay ladder of its
retries, the ``.unhandled`` queue of its dead letters, the quarantine): :meth:`Queues.worker_env` notes every
one of them, as the worker's own topology names them, for the longest ladder any setting
allows (a shorter ladder is the start of the longest one).

The preload publishes the way a careful producer does (persistent, confirmed, in groups),
and the worker starts only once the whole backlog is in the queue: what is timed is the
worker draining a backlog, not the publisher. One preload fills the bare drain's queue and
the worker's queue at once (a fanout exchange): the same bytes, half the publishing time.

The bare drain is the reference every consumer is held against: the same messages, read by
a plain kombu consumer that looks at nothing and acknowledges a thousand at a time. Nothing
that does real work with the bodies can be faster, so "ratio to bare drain" says how much of
the broker's capacity the worker turns into delivered events. Its CPU (the consuming thread's,
and the broker's over the same span) is the yardstick of the worker's CPU per event.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import amqp
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from bench.procs import CpuMeter, broker_pid
from config.settings import MAX_BACKOFF, Settings
from worker.broker.publisher import Outgoing, Publisher
from worker.broker.topology import QUORUM, Topology, delay_ladder

#: The broker, as the worker finds it.
BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//")

#: The worker's queue settings, by role (the queues a worker run gets of its own).
QUEUE_ROLES: dict[str, str] = {
    "ACTIVITY_QUEUE": "activities",
    "ACTIVITY_DEAD_LETTER_QUEUE": "dead",
    "ACTIVITY_TASK_QUEUE": "celery",
    "ACTIVITY_UPLOAD_QUEUE": "upload",
}

#: Messages per confirmed group of the preload (one confirm round trip per group).
PRELOAD_GROUP = 1000

#: Seconds to wait for the broker's confirms of one preload group.
PRELOAD_CONFIRM_TIMEOUT = 60.0

#: Unacknowledged messages the broker may hand the bare consumer.
DRAIN_PREFETCH = 2000

#: The bare consumer acknowledges with ``multiple=True`` once every this many messages.
DRAIN_ACK_EVERY = 1000

#: Seconds without a message after which the bare drain gives up (the queue should be full).
DRAIN_IDLE_TIMEOUT = 30.0

#: Messages read at most from a dead-letter queue for the ledger (a run that dead-letters
#: more than this is broken anyway; the count comes from the queue's depth, not from this).
DEAD_LETTERS_READ_MAX = 200_000


@dataclass
class Queues:
    """The queue names of one benchmark run; :meth:`delete_all` removes every one."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    names: set[str] = field(default_factory=set)

    def worker_env(self, label: str, *, quorum: bool = False) -> dict[str, str]:
        """Fresh queues for one worker run: its source, dead-letter, task and upload queues (and
        every queue the worker derives from them, noted for :meth:`delete_all`); all quorum
        queues when ``quorum``."""
        env = {name: f"bench-{self.run_id}-{label}.{role}" for name, role in QUEUE_ROLES.items()}
        if quorum:
            env["ACTIVITY_QUEUE_TYPE"] = "quorum"
        self.names.update(worker_queues(env))
        return env

    def single(self, label: str) -> str:
        """A fresh queue name of this run, for one bare drain or the naive app."""
        name = f"bench-{self.run_id}-{label}"
        self.names.add(name)
        return name

    def delete_all(self) -> None:
        """Delete every queue of this run, and the exchanges named after them that Celery
        declares for its queues (missing ones are fine: deleting them is a no-op)."""
        if not self.names:
            return
        with Connection(BROKER_URL, connect_timeout=5) as connection:
            channel = connection.channel()
            for name in sorted(self.names):
                for delete in (channel.queue_delete, channel.exchange_delete):
                    try:
                        delete(name)
                    except Exception:  # a channel error closes the channel: open another
                        channel = connection.channel()
        self.names.clear()


def worker_queues(env: Mapping[str, str]) -> list[str]:
    """Every queue a worker with these queue settings may declare: the four named, the
    ``.unhandled`` and quarantine queues and the delay ladder of the longest backoff a setting allows."""
    topology = Topology.of(Settings.from_env({"CELERY_BROKER_URL": BROKER_URL, **env}, require_api=False))
    return [topology.source, topology.task_source, topology.upload, topology.dead_letter, topology.unhandled,
            topology.quarantine,
            *(topology.delay_name(rung) for rung in delay_ladder(MAX_BACKOFF))]


def account_queues(env: Mapping[str, str], account: str) -> list[str]:
    """The upload queue of ``account`` and its delay ladder, for a worker with these queue settings."""
    topology = Topology.of(Settings.from_env({"CELERY_BROKER_URL": BROKER_URL, **env}, require_api=False))
    return [topology.upload_for(account),
            *(topology.delay_name(rung, account) for rung in delay_ladder(MAX_BACKOFF))]


def delay_queues(env: Mapping[str, str]) -> list[str]:
    """The delay queues of the ladder a worker run with environment ``env`` declares."""
    topology = Topology.of(Settings.from_env({"CELERY_BROKER_URL": BROKER_URL, **env}, require_api=False))
    return [topology.delay_name(rung) for rung in topology.rungs]


def read_all(queue: str, limit: int = DEAD_LETTERS_READ_MAX) -> list[bytes]:
    """Take every message out of ``queue`` (one of the run's own; they are removed) and return
    the bodies; nothing when it does not exist."""
    bodies: list[bytes] = []
    try:
        with Connection(BROKER_URL, connect_timeout=5) as connection:
            channel = connection.channel()
            while len(bodies) < limit:
                message = channel.basic_get(queue, no_ack=True)
                if message is None:
                    break
                body = message.body
                bodies.append(body if isinstance(body, bytes) else str(body).encode())
    except amqp.exceptions.NotFound:
        pass
    return bodies


def preload(queues: Sequence[str], bodies: Sequence[bytes], *, quorum: Collection[str] = ()) -> float:
    """Publish ``bodies`` once into every queue of ``queues`` (declared durable; a quorum queue
    when named in ``quorum``), persistent and confirmed in groups; return the seconds taken.

    With several queues the messages go through a fanout exchange of their own: the broker
    copies each message into every queue, and the Python side, slower than the broker here,
    publishes the backlog once instead of once per queue.
    """
    exchange, routing_key = "", queues[0]
    with Connection(BROKER_URL, heartbeat=0, connect_timeout=10) as connection:
        channel = connection.channel()
        for name in queues:
            Queue(name, durable=True, queue_arguments=dict(QUORUM) if name in quorum else None)(channel).declare()
        if len(queues) > 1:
            exchange, routing_key = f"{queues[0]}.fanout", ""
            channel.exchange_declare(exchange, "fanout", durable=False, auto_delete=False)
            for name in queues:
                channel.queue_bind(name, exchange)
        publisher = Publisher(BROKER_URL, confirm_timeout=PRELOAD_CONFIRM_TIMEOUT)
        started = time.perf_counter()
        try:
            for first in range(0, len(bodies), PRELOAD_GROUP):
                publisher.publish([Outgoing(routing_key, body, exchange=exchange)
                                   for body in bodies[first:first + PRELOAD_GROUP]])
            return time.perf_counter() - started
        finally:
            publisher.close()
            if exchange:
                channel.exchange_delete(exchange)


def depth(queue: str) -> int | None:
    """Messages ready in ``queue``; None when it does not exist."""
    try:
        with Connection(BROKER_URL, connect_timeout=5) as connection:
            _, count, _ = connection.default_channel.queue_declare(queue, passive=True)
            return int(count)
    except Exception:  # not declared (yet), or the broker refuses: nothing to count
        return None


@dataclass
class DrainResult:
    """What the bare consumer did: messages read, the seconds it took, the CPU it and the broker used."""

    messages: int
    seconds: float
    cpu_seconds: float = 0.0  #: the consuming thread's user + system time over the same span
    broker_cpu_seconds: float | None = None  #: the broker's, when its process is on this machine

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def cpu_us_per_message(self) -> float:
        return self.cpu_seconds * 1e6 / self.messages if self.messages else 0.0

    def broker_cpu_us_per_message(self) -> float | None:
        if self.broker_cpu_seconds is None or not self.messages:
            return None
        return self.broker_cpu_seconds * 1e6 / self.messages


def bare_drain(queue: str, expected: int) -> DrainResult:
    """Consume ``expected`` messages from ``queue`` doing nothing with them; time it.

    The clock runs from the ``basic.consume`` to the last message's arrival, like the worker's
    runs from "ready" to the last upload; CPU is measured over the same span.
    """
    received = 0
    last_tag = 0
    last_acked = 0

    def on_message(message: Message) -> None:
        nonlocal received, last_tag, last_acked
        received += 1
        last_tag = message.delivery_tag
        if received % DRAIN_ACK_EVERY == 0:
            message.channel.basic_ack(last_tag, multiple=True)
            last_acked = last_tag

    with Connection(BROKER_URL, heartbeat=0) as connection:
        channel = connection.channel()
        consumer = Consumer(channel, [Queue(queue, durable=True)], on_message=on_message,
                            prefetch_count=DRAIN_PREFETCH, no_ack=False)
        pid = broker_pid()
        broker_cpu = CpuMeter()
        broker_cpu.start([pid] if pid else [])
        started, cpu_started = time.perf_counter(), time.thread_time()
        finished, cpu_finished = started, cpu_started
        consumer.consume()
        while received < expected:
            try:
                connection.drain_events(timeout=DRAIN_IDLE_TIMEOUT)
            except TimeoutError:
                break
            finished, cpu_finished = time.perf_counter(), time.thread_time()
        broker_seconds = broker_cpu.stop([pid]) if pid else None
        if last_tag > last_acked:
            channel.basic_ack(last_tag, multiple=True)
        consumer.cancel()
    return DrainResult(received, finished - started, cpu_finished - cpu_started, broker_seconds)


class QueueWatch:
    """Ready-message counts of a few queues, read often on one connection during a run.

    The worker's stages show in them: the source queue empties as the consumer reads the
    backlog, the upload queue fills when batches are made faster than the pool uploads them.
    """

    def __init__(self, queues: Sequence[str]) -> None:
        self.queues = list(queues)
        self._connection = Connection(BROKER_URL, heartbeat=0, connect_timeout=5)
        self._channel: amqp.Channel | None = None

    def sample(self) -> dict[str, int | None]:
        counts: dict[str, int | None] = {}
        for name in self.queues:
            try:
                if self._channel is None or not self._channel.is_open:
                    self._channel = self._connection.channel()
                counts[name] = int(self._channel.queue_declare(name, passive=True)[1])
            except Exception:  # not declared yet, or the broker closed the channel
                self._channel = None
                counts[name] = None
        return counts

    def close(self) -> None:
        try:
            self._connection.release()
        except Exception:  # already broken: nothing to release
            pass

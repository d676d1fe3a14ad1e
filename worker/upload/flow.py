"""Steering what the worker takes from RabbitMQ by how the API is doing: the upload flow.

Every :data:`TICK` seconds, on the worker's event loop (the only thread that may touch the
consumers' channels), :meth:`UploadFlow.tick`:

- applies the adaptive limit (:mod:`worker.upload.concurrency`) as the upload queue's prefetch:
  RabbitMQ hands over no more upload tasks than may be in flight, so none waits in the worker;
- stops consuming the upload queue while the circuit is open or paused (the API is down or
  asked to wait), and consumes it with a prefetch of one while half-open (one task, the probe);
- closes the ingest gate (:mod:`worker.gate`) while the circuit is not closed, or while events
  in upload tasks pile up in RabbitMQ faster than they are uploaded (backpressure): events then
  wait in ``activities`` as they arrived. The upload queue's depth is read in tasks and counted
  in events (:class:`TaskSizes`): a task carries one full batch or a few small ones, as many as
  the API's round trip allows (:func:`~worker.broker.messages.batches_per_bundle`). In
  half-open with no task to probe with, the gate opens, so that new events make one;
- reads the depths of the upload queue and of the delay queues, for the above and for metrics.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import amqp
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from worker.broker.connection import connect
from worker.broker.topology import Topology
from worker.clock import Clock
from worker.gate import Gate
from worker.upload.circuit import Circuit, State
from worker.upload.concurrency import AdaptiveConcurrency

logger = logging.getLogger(__name__)

#: Seconds between two ticks.
TICK = 0.1

#: Seconds between two readings of the delay queues' depths (a request per rung).
DELAY_READ_INTERVAL = 5.0

#: Shortest interval between two re-consumes that apply a new per-consumer prefetch (quorum).
RECONSUME_INTERVAL = 0.25

#: Events waiting in upload tasks in RabbitMQ past which the consumer stops taking messages:
#: this many per upload in flight, and at least :data:`BACKLOG_EVENTS_MIN` (a few full batches
#: per request in flight: enough that uploads never wait for the consumer). It resumes below
#: half of it.
BACKLOG_EVENTS_PER_SLOT = 4_000
BACKLOG_EVENTS_MIN = 32_000

#: Weight of the newest bundle in :class:`TaskSizes`' moving average.
TASK_SIZE_WEIGHT = 0.05


class TaskSizes:
    """Events per upload task: a moving average of the bundles this process hands on.

    RabbitMQ counts the upload queue in messages; backpressure counts events, since a task
    carries from one event to a full batch of 1000, in one to twenty batches. Written by the
    consumer and read by the flow, both on the worker's event loop.
    """

    def __init__(self, *, initial: float = 1000.0, weight: float = TASK_SIZE_WEIGHT) -> None:
        #: The mean before any bundle is seen: a full batch (tasks left by an earlier run).
        self.mean = float(initial)
        self.weight = weight

    def add(self, events: int) -> None:
        self.mean += self.weight * (events - self.mean)

    def events_in(self, tasks: int) -> int:
        """About how many events ``tasks`` upload tasks carry."""
        return round(tasks * self.mean)


class UploadConsumer(Protocol):
    """What the flow needs of the worker's consumer of the upload queue."""

    def consuming(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def prefetch(self) -> int: ...

    def set_prefetch(self, count: int) -> None: ...


class FlowListener(Protocol):
    """What the flow reads, for the metrics."""

    def upload_queue_ready(self, count: int) -> None: ...

    def retries_waiting(self, count: int) -> None: ...


class Depths(Protocol):
    """Ready messages in the worker's queues, or None when they cannot be read right now."""

    def upload_ready(self) -> int | None: ...

    def delayed(self) -> int | None: ...


class UploadFlow:
    """See the module docstring."""

    def __init__(
        self,
        *,
        circuit: Circuit,
        concurrency: AdaptiveConcurrency,
        gate: Gate,
        consumer: UploadConsumer,
        depths: Depths,
        clock: Clock,
        task_sizes: TaskSizes,
        listener: FlowListener | None = None,
    ) -> None:
        self.circuit = circuit
        self.concurrency = concurrency
        self.gate = gate
        self.consumer = consumer
        self.depths = depths
        self.clock = clock
        #: The same object the consumer's hand-offs feed (the process's runtime holds it).
        self.task_sizes = task_sizes
        self.listener = listener
        self._state = circuit.state
        self._backlogged = False
        self._ready = self._waiting = 0
        self._next_delay_read = 0.0

    def tick(self) -> None:
        state = self.circuit.poll()
        if state is State.CLOSED and self._state is not State.CLOSED:
            self.concurrency.restart()  # after an outage: ramp up from one again
        self._state = state
        ready = self.depths.upload_ready()
        if self.listener is not None and ready is not None:
            self.listener.upload_queue_ready(ready)
        self._steer_uploads(state)
        self._steer_ingest(state, ready)
        self._read_delays()

    def _steer_uploads(self, state: State) -> None:
        consumer = self.consumer
        if state in (State.OPEN, State.PAUSED):
            if consumer.consuming():
                consumer.pause()
            return
        wanted = 1 if state is State.HALF_OPEN else self.concurrency.limit
        if consumer.prefetch() != wanted:
            consumer.set_prefetch(wanted)
        if not consumer.consuming():
            consumer.resume()

    def _steer_ingest(self, state: State, ready: int | None) -> None:
        high = max(BACKLOG_EVENTS_MIN, BACKLOG_EVENTS_PER_SLOT * self.concurrency.limit)
        if ready is not None:  # unreadable: the last reading stands
            self._ready, self._waiting = ready, self.task_sizes.events_in(ready)
            if self._waiting >= high:
                self._backlogged = True
            elif self._waiting <= high // 2:
                self._backlogged = False
        if state in (State.OPEN, State.PAUSED):
            opened, reason = False, "the API is down or asked to wait: events wait in RabbitMQ"
        elif state is State.HALF_OPEN:
            opened, reason = ready == 0, "probing the API"  # no task to probe with: let events make one
        else:
            opened, reason = not self._backlogged, (f"about {self._waiting} events in {self._ready} upload tasks are "
                                                    "waiting in RabbitMQ (backpressure)")
        if self.gate.set(opened, reason):
            logger.info("Consumer %s%s", "resumed" if opened else "paused: ", "" if opened else reason)

    def _read_delays(self) -> None:
        now = self.clock.monotonic()
        if now < self._next_delay_read:
            return
        self._next_delay_read = now + DELAY_READ_INTERVAL
        delayed = self.depths.delayed()
        if self.listener is not None and delayed is not None:
            self.listener.retries_waiting(delayed)


class CeleryUploadConsumer:
    """:class:`UploadConsumer` over Celery's task consumer (``c``, the worker's Consumer).

    On quorum queues Celery uses per-consumer prefetch, which RabbitMQ applies to consumers
    created after it is set: a new prefetch then takes a new consumer (a ``basic.cancel`` and a
    ``basic.consume``; deliveries in hand stay valid), at most every :data:`RECONSUME_INTERVAL`
    seconds, at once when it falls to one (a probe).
    """

    def __init__(self, c: Any, queue: str, *, clock: Clock | None = None) -> None:
        self.c = c
        self.queue = queue
        self.clock = clock
        self._reconsumed_at = float("-inf")

    def consuming(self) -> bool:
        return bool(self.c.task_consumer.consuming_from(self.queue))

    def pause(self) -> None:
        self.c.cancel_task_queue(self.queue)

    def resume(self) -> None:
        self.c.add_task_queue(self.queue)

    def prefetch(self) -> int:
        return int(self.c.qos.value)

    def set_prefetch(self, count: int) -> None:
        # Celery's loop re-applies ``qos.value`` whenever it differs from what was set last: both
        # change together. 0 would mean "no limit" to RabbitMQ.
        qos = self.c.qos
        qos.value = max(1, count)
        qos.update()
        if getattr(self.c, "qos_global", True) is False and self.consuming():
            now = self.clock.monotonic() if self.clock is not None else 0.0
            if count <= 1 or now - self._reconsumed_at >= RECONSUME_INTERVAL:
                self._reconsumed_at = now
                consumer = self.c.task_consumer
                consumer.cancel_by_queue(self.queue)
                consumer.add_queue(self.c.app.amqp.queues[self.queue])
                consumer.consume()


class BrokerDepths:
    """:class:`Depths` read with passive declarations, on a connection of its own."""

    def __init__(self, broker_url: str, topology: Topology) -> None:
        self.broker_url = broker_url
        self.topology = topology
        self._connection: Connection | None = None
        self._channel: Any = None

    def upload_ready(self) -> int | None:
        return self._ready([self.topology.upload])

    def delayed(self) -> int | None:
        return self._ready([self.topology.delay_name(rung) for rung in self.topology.rungs])

    def _ready(self, names: list[str]) -> int | None:
        try:
            channel = self._ensure()
            total: int = sum(channel.queue_declare(name, passive=True).message_count for name in names)
            return total
        except (amqp.exceptions.AMQPError, OperationalError, OSError) as exc:
            logger.debug("Cannot read queue depths (%r); will try again", exc)
            self.close()
            return None

    def _ensure(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._connection = connect(self.broker_url, timeout=5.0, retries=0)
            self._channel = self._connection.channel()
        return self._channel

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # already broken
                pass

"""Who may stop whom, and why: the flow of one worker process, in one place.

A worker takes events from RabbitMQ and gives them to Netcore. Each part of it may stop taking
work for one reason only, and stops nothing else:

=================================  ======================================  ====================
who stops                           when                                   what waits, where
=================================  ======================================  ====================
the consumer of ``activities`` and  its hand-offs are not confirmed: the   events, in
``celery`` (worker.ingest)          *broker* is in trouble                 ``activities``
an account's upload consumer        its circuit is open or paused: *its    its upload tasks, in
(this module)                       API* is down or rate-limits it         its upload queue
an asset_id's uploads               it fails alone with no sign the API    its batches, in the
(worker.upload.circuit)             works                                  account's delay queues
=================================  ======================================  ====================

Nothing about the API ever stops the consumer of ``activities``: an account that is down keeps
receiving its events, batched, in its own upload queue, while the others flow. What bounds memory
is RabbitMQ's prefetch, one number per consumer: ``ACTIVITY_PREFETCH`` messages for the source
queues (open batches leave early when they near it: worker.ingest.batching), and for each
account's upload queue its adaptive limit (:mod:`worker.upload.concurrency`), set as the
consumer's prefetch, so that no upload task ever waits in the worker for a turn. Each account has
its own adaptive limit, circuit and ``Retry-After`` pause (worker.upload.lanes): one account's
outage, rate limit or revoked key never slows another's deliveries.

Every :data:`TICK` seconds, on the worker's event loop (the only thread that may touch the
consumers' channels), :meth:`UploadFlow.tick` reads each account's circuit and limit and steers
its consumer: cancelled while open or paused, one task at a time while half-open (the probe), its
limit while closed. Reading the queues' depths is for the metrics only, on a thread of its own
(:mod:`worker.broker.watch`): nothing here waits on the network.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from kombu.messaging import Consumer

from worker.clock import Clock
from worker.upload.circuit import State
from worker.upload.lanes import Lane

logger = logging.getLogger(__name__)

#: Seconds between two ticks.
TICK = 0.1

#: Shortest interval between two re-consumes that apply a new per-consumer prefetch (quorum).
RECONSUME_INTERVAL = 0.25


class UploadConsumer(Protocol):
    """What the flow needs of one account's upload consumer."""

    def consuming(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def prefetch(self) -> int: ...

    def set_prefetch(self, count: int) -> None: ...


class UploadFlow:
    """Steers each account's upload consumer by its circuit and its adaptive limit."""

    def __init__(self, steered: list[tuple[Lane, UploadConsumer]]) -> None:
        self.steered = steered
        self._states = {lane.name: lane.circuit.state for lane, _ in steered}

    def tick(self) -> None:
        for lane, consumer in self.steered:
            state = lane.circuit.poll()
            if state is State.CLOSED and self._states[lane.name] is not State.CLOSED:
                lane.concurrency.restart()  # after an outage: ramp up from one again
            self._states[lane.name] = state
            if state in (State.OPEN, State.PAUSED):
                if consumer.consuming():
                    consumer.pause()
                continue
            wanted = 1 if state is State.HALF_OPEN else lane.concurrency.limit
            if consumer.prefetch() != wanted:
                consumer.set_prefetch(wanted)
            if not consumer.consuming():
                consumer.resume()

    def paused(self) -> dict[str, str]:
        """The accounts whose upload consumer is stopped, and why (for the health check)."""
        return {lane.name: _why(lane) for lane, _ in self.steered if lane.circuit.state is not State.CLOSED}


def _why(lane: Lane) -> str:
    state = lane.circuit.state
    since = f"for {lane.circuit.opened_for():.0f} s"
    if state is State.PAUSED:
        return f"paused: its API asked to slow down (429) {since}"
    if state is State.HALF_OPEN:
        return f"probing: its API was down {since}"
    return f"circuit open: its API is down {since}; its events wait in {lane.queue}"


class LaneConsumer:
    """:class:`UploadConsumer` over a kombu consumer of one account's upload queue, on a channel of
    its own (so that its prefetch is its own). On a classic queue the channel's prefetch changes at
    once; a quorum queue only takes per-consumer prefetch, applied to consumers created after it is
    set: a new prefetch then takes a new consumer (a ``basic.cancel`` and a ``basic.consume``;
    deliveries in hand stay valid), at most every :data:`RECONSUME_INTERVAL` seconds, at once when
    it falls to one (a probe)."""

    def __init__(self, consumer: Consumer, *, quorum: bool, clock: Clock) -> None:
        self.consumer = consumer
        self.quorum = quorum
        self.clock = clock
        self._prefetch = 0
        self._consuming = False
        self._reconsumed_at = float("-inf")

    @property
    def channel(self) -> Any:
        return self.consumer.channel

    def consuming(self) -> bool:
        return self._consuming

    def pause(self) -> None:
        self.consumer.cancel()
        self._consuming = False

    def resume(self) -> None:
        self.consumer.consume()
        self._consuming = True

    def prefetch(self) -> int:
        return self._prefetch

    def set_prefetch(self, count: int) -> None:
        """Apply ``count`` now, or (a quorum queue re-consumed less than :data:`RECONSUME_INTERVAL`
        ago) not yet: :meth:`prefetch` keeps saying the one in force, so the flow asks again."""
        count = max(1, count)  # 0 would mean "no limit" to RabbitMQ
        reconsume = self.quorum and self._consuming
        now = self.clock.monotonic()
        if reconsume and count > 1 and now - self._reconsumed_at < RECONSUME_INTERVAL:
            return
        self.channel.basic_qos(0, count, not self.quorum)
        self._prefetch = count
        if reconsume:
            self._reconsumed_at = now
            self.consumer.cancel()
            self.consumer.consume()

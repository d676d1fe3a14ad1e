"""Dead letters a command held, handed back: waiting until the queue shows every one again.

A dead-letter command reads the queue with ``basic_get`` and holds what it read unacknowledged
(:class:`~worker.deadletter.reader.Reader`). When its channel closes, the broker puts those
messages back, but not at once: it answers the close first. A classic queue puts them back
within a moment; a quorum queue only once its log has recorded the return, which waits for the
disk. Meanwhile the queue reports them neither as ready nor as gone, so a command started a
few milliseconds later counted, listed and replayed fewer dead letters than there were, and
said so in its report ("left 0" while one was still there).

What a command can know for sure is only what the broker reports, and it reports two numbers
(``queue.declare``, passive) that are exact at the moment of the answer:

- the messages **ready**, which is all any reader can see;
- the **consumers**. On a quorum queue every message a client holds through ``basic_get`` counts
  as one consumer until the broker has applied its return or its acknowledgement, even after the
  client's channel closed: so no consumer means that nothing is held, nor in flight back to the
  queue, and that every dead letter is ready. (A classic queue counts only ``basic_consume``
  consumers; what a closed channel held there is back a moment after the close.)

So each command does two things:

1. **At the start** (:func:`wait_until_unheld`), it waits until the queue has no consumers, up
   to :data:`SETTLE_TIMEOUT`. This covers whatever the previous client was: another command, one
   that was killed, a script that read without acknowledging. If consumers are still there at
   the deadline, another client is holding dead letters on purpose (a command running at the
   same time, a consumer someone attached): the command goes on with what is ready, and its
   report says how many consumers it found, since what they hold is not in it.
2. **At the end** (:func:`hand_back`), it returns what it still holds itself, explicitly and at
   once (one ``basic.nack`` with ``requeue``, which RabbitMQ 4.3 and later, unlike a reject, do
   not count as a failed delivery), and waits, up to :data:`SETTLE_TIMEOUT`, until the queue shows as many
   more ready messages as it returned, before it closes its channel and prints its report. A
   concurrent publisher (a worker writing new dead letters) can end that wait early, and a
   concurrent reader can keep it to the deadline; neither loses anything, and the next
   command's first step still waits for what is in flight.

Neither wait can lose a dead letter: waiting only delays the command. The order of a quorum
queue's messages after a return is the broker's (RabbitMQ 3.10 puts returned messages back in
an order of its own, whether the channel closed or returned them); a classic queue puts each
back in its place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import amqp
from amqp import spec

logger = logging.getLogger(__name__)

#: Seconds a command waits for the queue to settle, at its start and at its end.
SETTLE_TIMEOUT = 10.0

#: Seconds between two looks at the queue: the first, doubling up to the last.
POLL_FIRST = 0.001
POLL_LAST = 0.05


class Depth(NamedTuple):
    """What the broker says of the queue at one moment."""

    #: Messages ready: what a reader can get.
    ready: int
    #: Consumers; on a quorum queue each message held through ``basic_get`` counts as one.
    consumers: int


def depth(channel: amqp.Channel, queue: str) -> Depth:
    """The queue's depth now (a passive declaration: it never creates the queue)."""
    _, ready, consumers = channel.queue_declare(queue, durable=True, passive=True)
    return Depth(ready, consumers)


def wait_for(
    channel: amqp.Channel, queue: str, done: Callable[[Depth], bool], *, timeout: float
) -> tuple[Depth, bool]:
    """Look at the queue until ``done`` says yes or ``timeout`` seconds passed: (the last depth, done?)."""
    deadline = time.monotonic() + timeout
    pause = POLL_FIRST
    while not done(now := depth(channel, queue)):
        left = deadline - time.monotonic()
        if left <= 0:
            return now, False
        time.sleep(min(pause, left))
        pause = min(pause * 2, POLL_LAST)
    return now, True


def wait_until_unheld(channel: amqp.Channel, queue: str, *, timeout: float | None = None) -> Depth:
    """Wait until no consumer holds a message of ``queue`` (see the module); the depth then, or at the deadline."""
    timeout = SETTLE_TIMEOUT if timeout is None else timeout
    now, settled = wait_for(channel, queue, lambda d: d.consumers == 0, timeout=timeout)
    if not settled:
        logger.warning(
            "%s still has %d consumers after %g s: another client holds dead letters (a dead-letter command "
            "running at the same time?); this run reads only the %d that are ready", queue, now.consumers,
            timeout, now.ready)
    return now


def hand_back(channel: amqp.Channel, queue: str, *, last_tag: int, held: int, timeout: float | None = None) -> bool:
    """Return every message this channel holds, up to delivery tag ``last_tag`` (``held`` of them),
    and wait until the queue shows them ready again. True once it does; False at the deadline."""
    timeout = SETTLE_TIMEOUT if timeout is None else timeout
    before = depth(channel, queue)
    channel.send_method(spec.Basic.Nack, "Lbb", (last_tag, True, True))  # multiple, requeue
    now, shown = wait_for(channel, queue, lambda d: d.ready >= before.ready + held, timeout=timeout)
    if not shown:
        logger.info("Handed back %d dead letters to %s; after %g s it shows %d more ready (another client may "
                    "have read some)", held, queue, timeout, now.ready - before.ready)
    return shown


def held_elsewhere(other_consumers: int, done: str) -> str:
    """What a report adds when other consumers held dead letters it could not see ("" when none did)."""
    if not other_consumers:
        return ""
    whom = "1 other consumer" if other_consumers == 1 else f"{other_consumers} other consumers"
    return f"; {whom} of the queue held dead letters not {done}"

"""Acknowledging many messages with one frame.

Messages complete out of order (each waits for its own batch), but RabbitMQ's ``multiple``
flag acknowledges every delivery tag up to a given one. :class:`Acker` remembers the tags
received on a channel and, when the oldest ones are complete, acknowledges the longest
complete prefix at once: one ``basic.ack`` for hundreds of messages instead of one each.

A complete message behind an incomplete older one waits. Every tick,
:meth:`Acker.ack_stragglers` acknowledges one by one those that already waited a whole tick,
so that a crash redelivers (duplicates) as little as possible, but only those with at most
:data:`MAX_ACK_ALONE_DEPTH` older deliveries still unacknowledged: RabbitMQ finds the tag of
a ``basic.ack`` without ``multiple`` by walking the channel's unacknowledged deliveries from
the oldest one, in the channel process and again in the queue process, so acknowledging alone
a message behind N others costs it O(N). With 1000 asset_ids, messages complete in random
order across the whole prefetch window; acknowledged one by one, they kept the queue process
busy for tens of seconds (about 270 acks/s behind 30,000 deliveries), delivering nothing
meanwhile. The deeper ones wait for the prefix, whose ``multiple`` ack costs the broker
O(1) per message; that happens within ``ACTIVITY_BATCH_WAIT``, or sooner when the ingest
step releases the oldest batch because :attr:`Acker.outstanding` nears the prefetch window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

#: ``ack(delivery_tag, multiple)``: the channel's ``basic_ack``.
AckFn = Callable[[int, bool], None]

#: Older deliveries still unacknowledged past which a complete message is not acknowledged
#: alone (see the module docstring). RabbitMQ walks about 2 million of them a second, so an
#: ack alone costs it at most some 50 µs more than an ack at the head of the channel.
MAX_ACK_ALONE_DEPTH = 100


class Acker:
    """Acknowledges the complete prefix of a channel's delivery tags."""

    def __init__(self, ack: AckFn, *, max_depth: int = MAX_ACK_ALONE_DEPTH) -> None:
        self._ack = ack
        #: Older deliveries still unacknowledged past which a message is not acknowledged alone.
        self.max_depth = max_depth
        #: Tags received and not acknowledged yet, oldest first (tags grow): the broker's
        #: unacknowledged deliveries of this channel, as far as they reached us.
        self._unacked: deque[int] = deque()
        #: Complete tags waiting behind an older incomplete one: this tick's, and older ones.
        self._waiting: set[int] = set()
        self._waited: set[int] = set()
        #: ``basic.ack`` frames sent.
        self.frames = 0

    @property
    def outstanding(self) -> int:
        """Messages received and not yet acknowledged."""
        return len(self._unacked)

    def received(self, delivery_tag: int) -> None:
        self._unacked.append(delivery_tag)

    def complete(self, delivery_tag: int) -> None:
        """The message is handed on; acknowledge it, with every older one that is too."""
        unacked = self._unacked
        if not unacked or unacked[0] != delivery_tag:
            self._waiting.add(delivery_tag)
            return
        last = unacked.popleft()
        waiting, waited = self._waiting, self._waited
        while unacked:
            tag = unacked[0]
            if tag in waiting:
                waiting.discard(tag)
            elif tag in waited:
                waited.discard(tag)
            else:
                break
            last = unacked.popleft()
        self._send(last, True)

    def ack_stragglers(self) -> int:
        """Acknowledge one by one, oldest first, the complete messages that waited a whole
        tick behind at most ``max_depth`` unacknowledged older ones; return how many."""
        waited, unacked = self._waited, self._unacked
        acked = 0
        if waited:
            older: list[int] = []  # walked past, still unacknowledged: put back in order
            try:
                while unacked and waited and len(older) <= self.max_depth:
                    tag = unacked.popleft()
                    if tag in waited:
                        waited.discard(tag)
                        self._send(tag, False)
                        acked += 1
                    else:
                        older.append(tag)
            finally:
                unacked.extendleft(reversed(older))
        waited |= self._waiting  # the deeper ones keep waiting for the prefix, or a later tick
        self._waiting = set()
        return acked

    def forget(self) -> None:
        """Drop every tag (the channel is gone: its tags mean nothing any more)."""
        self._unacked.clear()
        self._waiting.clear()
        self._waited.clear()

    def _send(self, tag: int, multiple: bool) -> None:
        self._ack(tag, multiple)
        self.frames += 1

"""Acknowledging many messages with one frame.

Messages complete out of order (each waits for its own batch), but RabbitMQ's ``multiple``
flag acknowledges every delivery tag up to a given one. :class:`Acker` remembers the tags
received on a channel and, when the oldest ones are complete, acknowledges the longest
complete prefix at once: one ``basic.ack`` for hundreds of messages instead of one each.

A complete message behind an incomplete older one waits, but not for long: every tick,
:meth:`Acker.ack_stragglers` acknowledges one by one those that already waited a whole tick,
so that a crash redelivers (duplicates) as little as possible. :attr:`Acker.outstanding`
counts unacknowledged messages so the ingest step can release the oldest batch before the
prefetch window fills up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

#: ``ack(delivery_tag, multiple)``: the channel's ``basic_ack``.
AckFn = Callable[[int, bool], None]


class Acker:
    """Acknowledges the complete prefix of a channel's delivery tags."""

    def __init__(self, ack: AckFn) -> None:
        self._ack = ack
        #: Tags received whose message is not covered by an ack yet, oldest first (tags grow).
        self._unacked: deque[int] = deque()
        #: Complete tags waiting behind an older incomplete one: this tick's, and older ones.
        self._waiting: set[int] = set()
        self._waited: set[int] = set()
        #: Tags acknowledged one by one, still in ``_unacked`` until the prefix reaches them.
        self._acked_alone: set[int] = set()
        #: ``basic.ack`` frames sent.
        self.frames = 0

    @property
    def outstanding(self) -> int:
        """Messages received and not yet acknowledged (nor waiting to be dropped from the count)."""
        return len(self._unacked) - len(self._acked_alone)

    def received(self, delivery_tag: int) -> None:
        self._unacked.append(delivery_tag)

    def complete(self, delivery_tag: int) -> None:
        """The message is handed on; acknowledge it, with every older one that is too."""
        unacked = self._unacked
        if not unacked or unacked[0] != delivery_tag:
            self._waiting.add(delivery_tag)
            return
        last = unacked.popleft()
        waiting, waited, alone = self._waiting, self._waited, self._acked_alone
        while unacked:
            tag = unacked[0]
            if tag in alone:
                alone.discard(unacked.popleft())
            elif tag in waiting or tag in waited:
                last = unacked.popleft()
                waiting.discard(last)
                waited.discard(last)
            else:
                break
        self._send(last, True)

    def ack_stragglers(self) -> int:
        """Acknowledge one by one the complete messages that waited a whole tick; return how many."""
        stragglers, self._waited, self._waiting = self._waited, self._waiting, set()
        for tag in sorted(stragglers):
            self._send(tag, False)
        self._acked_alone |= stragglers
        return len(stragglers)

    def forget(self) -> None:
        """Drop every tag (the channel is gone: its tags mean nothing any more)."""
        self._unacked.clear()
        self._waiting.clear()
        self._waited.clear()
        self._acked_alone.clear()

    def _send(self, tag: int, multiple: bool) -> None:
        self._ack(tag, multiple)
        self.frames += 1

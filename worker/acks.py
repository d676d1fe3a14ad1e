"""Acknowledging many messages with one frame.

Messages complete out of order (each waits for its own batch), but RabbitMQ's ``multiple``
flag acknowledges every delivery tag up to a given one. :class:`Acker` remembers the tags
received on a channel and, when the oldest ones are complete, acknowledges the longest
complete prefix at once: one ``basic.ack`` for hundreds of messages instead of one each.

A complete message behind an incomplete older one waits; :attr:`Acker.outstanding` counts
them so the ingest step can release the oldest batch before the prefetch window fills up.
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
        #: Tags received and not yet acknowledged, oldest first (tags only grow on a channel).
        self._unacked: deque[int] = deque()
        #: Tags whose message is complete but which wait behind an older incomplete one.
        self._complete: set[int] = set()
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
            self._complete.add(delivery_tag)
            return
        last = unacked.popleft()
        complete = self._complete
        while unacked and unacked[0] in complete:
            last = unacked.popleft()
            complete.discard(last)
        self._ack(last, True)
        self.frames += 1

    def forget(self) -> None:
        """Drop every tag (the channel is gone: its tags mean nothing any more)."""
        self._unacked.clear()
        self._complete.clear()

"""Batching: events grouped per ``asset_id`` until a batch is full, too big, or old enough.

Pure bookkeeping, no I/O: the consumer step (:mod:`worker.ingest.pipeline`) feeds events in and
publishes what comes out. Time comes from an injectable :class:`~worker.clock.Clock`, so
every rule here is tested without sleeping.

A batch is released when
- it holds ``max_events`` events (the API takes at most 1000);
- one more event would take it over ``max_bytes``;
- the oldest event held in any batch has waited ``max_wait`` seconds: then every open batch
  is released (:meth:`Batcher.due`), so no event waits longer than ``max_wait``;
- the batcher holds ``max_buffered`` events in all (backpressure: the oldest batch goes, so
  the broker's prefetch window never fills up with events that wait for nothing);
- the worker shuts down (:meth:`Batcher.drain`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.clock import Clock


class Ticket:
    """One source message in flight: acknowledged once each of its events is handed on.

    The count starts at one, a hold kept while the message's events are being added, so a
    batch released half-way through a message cannot acknowledge it early.
    """

    __slots__ = ("_ack", "remaining")

    def __init__(self, ack: Callable[[], None]) -> None:
        self._ack = ack
        self.remaining = 1

    def hold(self) -> None:
        """One more event of this message is on its way."""
        self.remaining += 1

    def release(self) -> None:
        """One event (or the initial hold) is handed on; acknowledge after the last one."""
        self.remaining -= 1
        if self.remaining == 0:
            self._ack()


@dataclass(eq=False)
class Batch:
    """Events of one ``asset_id``, with the tickets of the messages they came from."""

    asset_id: str
    opened_at: float
    events: list[Any] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)
    nbytes: int = 2  # the brackets of the JSON array
    #: Per event, how often it was replayed from the dead-letter queue (None: never, for all).
    replays: list[int] | None = None

    def __len__(self) -> int:
        return len(self.events)

    def handed_on(self) -> None:
        """Every event of this batch is now safe in the broker: release their messages."""
        for ticket in self.tickets:
            ticket.release()


class Batcher:
    """Groups events per ``asset_id``; tells which batches are ready to upload."""

    def __init__(
        self,
        *,
        max_events: int,
        max_wait: float,
        max_bytes: int,
        max_buffered: int,
        clock: Clock,
    ) -> None:
        self.max_events = max_events
        self.max_wait = max_wait
        self.max_bytes = max_bytes
        self.max_buffered = max_buffered
        self.clock = clock
        #: Open batches, oldest first (dicts keep insertion order, and a released asset's
        #: next batch is inserted anew at the end).
        self._open: dict[str, Batch] = {}
        #: Events held in all open batches.
        self.buffered = 0

    def add(self, asset_id: str, event: Any, nbytes: int, ticket: Ticket, replays: int = 0) -> list[Batch]:
        """Add one event (replayed ``replays`` times before); return the batches this made ready."""
        ready: list[Batch] = []
        batch = self._open.get(asset_id)
        if batch is not None and batch.events and batch.nbytes + nbytes + 1 > self.max_bytes:
            ready.append(self._release(asset_id))
            batch = None
        if batch is None:
            batch = self._open[asset_id] = Batch(asset_id, self.clock.monotonic())
        ticket.hold()
        if replays or batch.replays is not None:
            if batch.replays is None:
                batch.replays = [0] * len(batch.events)
            batch.replays.append(replays)
        batch.events.append(event)
        batch.tickets.append(ticket)
        batch.nbytes += nbytes + 1
        self.buffered += 1
        if len(batch.events) >= self.max_events:
            ready.append(self._release(asset_id))
        while self.buffered > self.max_buffered:
            ready.append(self._release(next(iter(self._open))))
        return ready

    def due(self) -> list[Batch]:
        """Once the oldest open batch has waited ``max_wait`` seconds, release every open batch.

        All of them, not only the old ones: source messages are acknowledged in order, so a
        batch released alone leaves the messages read after it (whose events were handed on
        in other batches) unacknowledged behind the younger open batches, about half of what
        was read in ``max_wait`` seconds; a crash would upload those twice. Released together,
        every message read so far is acknowledged with one frame. A younger batch leaves a
        little early; for an asset_id that sends steadily its batch opened at the last
        release, so its size hardly changes.
        """
        wait = self.next_due()
        if wait is None or wait > 0:
            return []
        return [self._release(asset_id) for asset_id in list(self._open)]

    def next_due(self) -> float | None:
        """Seconds until the oldest batch is due (0 if overdue), None when nothing waits."""
        for batch in self._open.values():
            return max(0.0, batch.opened_at + self.max_wait - self.clock.monotonic())
        return None

    def oldest_opened_at(self) -> float | None:
        """When the oldest open batch opened (its clock's monotonic seconds), None when none is."""
        for batch in self._open.values():
            return batch.opened_at
        return None

    def release_oldest(self) -> Batch | None:
        """Release the oldest open batch (backpressure), or None when none is open."""
        for asset_id in self._open:
            return self._release(asset_id)
        return None

    def drain(self) -> list[Batch]:
        """Release every open batch (warm shutdown)."""
        return [self._release(asset_id) for asset_id in list(self._open)]

    def discard(self) -> int:
        """Forget every open batch without releasing it; return how many events that was.

        Used when the consuming channel is lost: the broker redelivers those messages, and
        their tickets could not be acknowledged on a new channel anyway.
        """
        dropped = self.buffered
        self._open.clear()
        self.buffered = 0
        return dropped

    def _release(self, asset_id: str) -> Batch:
        batch = self._open.pop(asset_id)
        self.buffered -= len(batch.events)
        return batch

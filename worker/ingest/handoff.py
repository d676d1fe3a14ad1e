"""Handing batches and dead letters to the broker, confirmed, without ever stalling the consumer.

The consumer (:mod:`worker.ingest.pipeline`) hands on what it made of each message: dead letters, and
batches to upload. A hand-off counts once the broker confirmed every message of it; only then
are its callbacks run (they acknowledge the source messages). The hand-off

- publishes at once when nothing waits before it: the common case, one confirm round trip;
- when the broker does not confirm, keeps it (and everything after it, in order), tries again
  on the consumer's ticks with a backoff (doubling from :data:`RETRY_BASE` to :data:`RETRY_MAX`),
  and says it is :attr:`~HandOff.blocked`, so that the consumer stops taking messages instead of
  trying again on each one, blocking the event loop each time;
- when the broker refuses a message for its size (over RabbitMQ's ``max_message_size``), learns
  the limit and renders the batches again in smaller upload messages (fewer batches per bundle,
  then fewer events per batch), so that a setting or a broker that disagree cost nothing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.broker.messages import MAX_BATCHES_PER_BUNDLE, Bundle, UploadBatch, bundles
from worker.broker.publisher import Outgoing, PublishFn
from worker.clock import Clock
from worker.errors import PublishError
from worker.ingest.batching import Batch

logger = logging.getLogger(__name__)

#: Seconds before the first retry of a hand-off the broker did not confirm; doubles each time.
RETRY_BASE = 0.5

#: The longest wait between two retries, seconds.
RETRY_MAX = 30.0

#: Share of a learned ``max_message_size`` an upload message may use (headers and properties
#: count against the limit too).
SIZE_MARGIN = 0.9

#: batches, the largest body a message may have (None: no known limit) -> upload messages.
RenderFn = Callable[[list[Batch], "int | None"], list[Outgoing]]


@dataclass
class Parcel:
    """One hand-off: dead letters and batches, and what to do once the broker confirmed them."""

    dead: list[Outgoing]
    batches: list[Batch]
    then: list[Callable[[], None]] = field(default_factory=list)


class HandOff:
    """See the module docstring."""

    def __init__(self, *, publish: PublishFn, render: RenderFn, clock: Clock) -> None:
        self.publish = publish
        self.render = render
        self.clock = clock
        self._pending: deque[Parcel] = deque()
        self._delay = RETRY_BASE
        self._next_try = 0.0
        #: The broker's ``max_message_size``, once a refusal told it (bytes).
        self.max_message_bytes: int | None = None

    @property
    def blocked(self) -> bool:
        """True while a hand-off waits for the broker: take no new messages."""
        return bool(self._pending)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def send(self, dead: Sequence[Outgoing], batches: Sequence[Batch], then: Sequence[Callable[[], None]]) -> None:
        """Hand these on; run ``then`` once the broker confirmed them (perhaps later)."""
        if not dead and not batches:  # nothing to publish: done already (what a message has in
            for callback in then:     # a waiting hand-off still holds its ticket)
                callback()
            return
        self._pending.append(Parcel(list(dead), list(batches), list(then)))
        if len(self._pending) == 1:
            self._drain()

    def tick(self) -> None:
        """Try the waiting hand-offs again, when their backoff is over."""
        if self._pending and self.clock.monotonic() >= self._next_try:
            self._drain()

    def retry_now(self) -> None:
        """Try the waiting hand-offs again at once (a warm shutdown's last chance)."""
        if self._pending:
            self._drain()

    def forget(self) -> None:
        """Drop what waits (the channel is gone; the broker redelivers the source messages)."""
        self._pending.clear()
        self._delay = RETRY_BASE

    def _drain(self) -> None:
        while self._pending:
            parcel = self._pending[0]
            try:
                self.publish(parcel.dead + self.render(parcel.batches, self._body_limit()))
            except PublishError as exc:
                if exc.too_large is not None and (self.max_message_bytes is None
                                                  or exc.too_large < self.max_message_bytes):
                    self.max_message_bytes = exc.too_large
                    logger.warning("The broker refuses messages over %d bytes (max_message_size): upload messages "
                                   "are made smaller from now on", exc.too_large)
                    continue  # rendered again, smaller
                self._next_try = self.clock.monotonic() + self._delay
                logger.error("The broker did not confirm a hand-off of %d messages (%s); %d hand-offs wait, the "
                             "consumer takes no new message; next try in %.1f s", len(exc.messages) or 1, exc,
                             len(self._pending), self._delay)
                self._delay = min(RETRY_MAX, self._delay * 2)
                return
            self._pending.popleft()
            self._delay = RETRY_BASE
            for callback in parcel.then:
                callback()

    def _body_limit(self) -> int | None:
        return None if self.max_message_bytes is None else int(self.max_message_bytes * SIZE_MARGIN)


class Renderer:
    """Batches released together -> upload task messages: bundled (several small batches of
    different asset_ids per message, :func:`~worker.broker.messages.bundles`), and, under a
    known broker limit, split until every message fits: fewer batches per message, then
    fewer events per batch (a batch of one asset_id can be sent as two)."""

    def __init__(self, *, make: Callable[[Bundle], Outgoing], max_events: int, max_bytes: int,
                 oversized: Callable[[UploadBatch, int], list[Outgoing]],
                 max_batches: Callable[[], int] = lambda: MAX_BATCHES_PER_BUNDLE) -> None:
        self.make = make
        self.max_events = max_events
        self.max_bytes = max_bytes
        #: Batches per bundle, asked at each hand-off (it follows the API's round trip).
        self.max_batches = max_batches
        #: (one event's batch, the limit) -> what to write instead: an event alone over the
        #: broker's limit cannot be uploaded through it (dead letters, in parts).
        self.oversized = oversized

    def __call__(self, batches: list[Batch], limit: int | None) -> list[Outgoing]:
        loads = [UploadBatch(b.asset_id, b.events, replays=b.replays) for b in batches]
        nbytes = {id(load): batch.nbytes for load, batch in zip(loads, batches)}
        cap = self.max_bytes if limit is None else min(self.max_bytes, limit)
        out: list[Outgoing] = []
        for bundle in bundles(loads, max_events=self.max_events, max_bytes=cap, size=lambda b: nbytes[id(b)],
                              max_batches=self.max_batches()):
            out += self._fit(bundle, limit)
        return out

    def _fit(self, bundle: Bundle, limit: int | None) -> list[Outgoing]:
        message = self.make(bundle)
        if limit is None or len(message.body) <= limit:
            return [message]
        if len(bundle.batches) > 1:
            half = len(bundle.batches) // 2
            return self._fit(Bundle(bundle.batches[:half]), limit) + self._fit(Bundle(bundle.batches[half:]), limit)
        (batch,) = bundle.batches
        if len(batch) == 1:
            return self.oversized(batch, limit)
        half = len(batch) // 2
        return (self._fit(Bundle([batch.part(range(half))]), limit)
                + self._fit(Bundle([batch.part(range(half, len(batch)))]), limit))

"""Handing batches and dead letters to the broker, confirmed, without ever stalling the consumer.

The consumer (:mod:`worker.ingest.pipeline`) hands on what it made of each message: dead letters, and
batches to upload. A hand-off counts once the broker confirmed every message of it; only then
are its callbacks run (they acknowledge the source messages). The hand-off

- renders the batches into upload messages and gives them to a background publisher
  (:mod:`worker.broker.background`) at once: the event loop never waits for the broker; the
  result comes back on the loop, and hand-offs may complete in any order (the acknowledgements
  keep theirs: :mod:`worker.ingest.acks`);
- when the broker does not confirm one, keeps it (and hands nothing newer over), tries again on
  the consumer's ticks with a backoff (doubling from :data:`RETRY_BASE` to :data:`RETRY_MAX`),
  and says it is :attr:`~HandOff.blocked`, so that the consumer stops taking messages;
- when the broker refuses a message for its size (over RabbitMQ's ``max_message_size``), learns
  the limit and renders the batches again in smaller upload messages (fewer batches per bundle,
  then fewer events per batch), so that a setting or a broker that disagree cost nothing;
- when rendering itself fails (a bug), writes the batches' events as dead letters instead
  (``fallback``), so that the bug costs those events a detour through the dead-letter queue,
  never the consumer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from config.accounts import DEFAULT
from worker.broker.background import Submitter
from worker.broker.messages import MAX_BATCHES_PER_BUNDLE, Bundle, UploadBatch, bundles
from worker.broker.publisher import Outgoing
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

#: batches that could not be rendered, the error -> dead letters keeping their events whole.
FallbackFn = Callable[[list[Batch], Exception], list[Outgoing]]


@dataclass(eq=False)
class Parcel:
    """One hand-off: dead letters and batches, and what to do once the broker confirmed them."""

    dead: list[Outgoing]
    batches: list[Batch]
    then: list[Callable[[], None]] = field(default_factory=list)
    #: Handed to the publisher and not reported yet.
    in_flight: bool = False
    #: Refused (or unanswered) by the broker: waits for the next try.
    failed: bool = False


class HandOff:
    """See the module docstring."""

    def __init__(self, *, publisher: Submitter, render: RenderFn, clock: Clock,
                 fallback: FallbackFn | None = None) -> None:
        self.publisher = publisher
        self.render = render
        self.fallback = fallback
        self.clock = clock
        #: Hand-offs not confirmed yet, oldest first.
        self._parcels: deque[Parcel] = deque()
        #: Of those, the ones to hand over (new, or to be tried again), oldest first.
        self._unsent: deque[Parcel] = deque()
        #: Of those, how many the broker did not confirm (they wait for the next try).
        self._failed = 0
        self._delay = RETRY_BASE
        self._next_try = 0.0
        #: Bumped by :meth:`forget`: results of hand-offs made before are ignored.
        self._generation = 0
        #: The broker's ``max_message_size``, once a refusal told it (bytes).
        self.max_message_bytes: int | None = None

    @property
    def blocked(self) -> bool:
        """True while a hand-off waits to be tried again: take no new messages."""
        return self._failed > 0

    @property
    def waiting(self) -> int:
        """Hand-offs not confirmed yet (in flight or waiting to be tried again)."""
        return len(self._parcels)

    def send(self, dead: Sequence[Outgoing], batches: Sequence[Batch], then: Sequence[Callable[[], None]]) -> None:
        """Hand these on; run ``then`` once the broker confirmed them (later, on the loop)."""
        if not dead and not batches:  # nothing to publish: done already (what a message has in
            for callback in then:     # a waiting hand-off still holds its ticket)
                callback()
            return
        parcel = Parcel(list(dead), list(batches), list(then))
        self._parcels.append(parcel)
        self._unsent.append(parcel)
        self._pump()

    def tick(self) -> None:
        """Try the waiting hand-offs again, when their backoff is over."""
        if self.blocked and self.clock.monotonic() >= self._next_try:
            self.retry_now()

    def retry_now(self) -> None:
        """Try the waiting hand-offs again at once (and a warm shutdown's last chance)."""
        for parcel in self._parcels:
            parcel.failed = False
        self._failed = 0
        self._unsent = deque(parcel for parcel in self._parcels if not parcel.in_flight)
        self._pump()

    def flush(self, timeout: float) -> bool:
        """Warm shutdown: try what waits once more and wait (``timeout`` s at most) until every
        hand-off is confirmed; False when some are not (their messages are redelivered)."""
        self.retry_now()
        self.publisher.drain(timeout)
        return not self._parcels

    def forget(self) -> None:
        """Drop what waits (the channel is gone; the broker redelivers the source messages)."""
        self._parcels.clear()
        self._unsent.clear()
        self._failed = 0
        self._generation += 1
        self._delay = RETRY_BASE

    def _pump(self) -> None:
        """Hand over, in order, every hand-off not handed over yet, unless one waits for a retry."""
        while self._unsent and not self.blocked:  # a publisher may report at once, changing the queues
            parcel = self._unsent.popleft()
            parcel.in_flight = True
            messages = parcel.dead + self._render(parcel)
            self.publisher.submit(messages, partial(self._done, parcel, self._generation))

    def _render(self, parcel: Parcel) -> list[Outgoing]:
        if not parcel.batches:
            return []
        try:
            return self.render(parcel.batches, self._body_limit())
        except Exception as exc:
            if self.fallback is None:
                raise
            logger.exception("Could not build the upload messages of %d batches (%s); writing their events to the "
                             "dead-letter queue instead", len(parcel.batches), type(exc).__name__)
            return self.fallback(parcel.batches, exc)

    def _done(self, parcel: Parcel, generation: int, error: PublishError | None) -> None:
        if generation != self._generation:
            return  # forgotten: its messages come back from the broker
        parcel.in_flight = False
        if error is None:
            self._parcels.remove(parcel)
            if not self.blocked:
                self._delay = RETRY_BASE
            for callback in parcel.then:
                callback()
            return
        if error.too_large is not None and (self.max_message_bytes is None
                                            or error.too_large < self.max_message_bytes):
            self.max_message_bytes = error.too_large
            logger.warning("The broker refuses messages over %d bytes (max_message_size): upload messages are made "
                           "smaller from now on", error.too_large)
            self._unsent.appendleft(parcel)
            self._pump()  # rendered again, smaller
            return
        if not parcel.failed:
            parcel.failed = True
            self._failed += 1
            self._next_try = self.clock.monotonic() + self._delay
            logger.error("The broker did not confirm a hand-off of %d messages (%s); %d hand-offs wait, the consumer "
                         "takes no new message; next try in %.1f s", len(error.messages) or 1, error,
                         len(self._parcels), self._delay)
            self._delay = min(RETRY_MAX, self._delay * 2)

    def _body_limit(self) -> int | None:
        return None if self.max_message_bytes is None else int(self.max_message_bytes * SIZE_MARGIN)


class Renderer:
    """Batches released together -> upload task messages, per account (each account's in its own
    upload queue): bundled (several small batches of different asset_ids per message,
    :func:`~worker.broker.messages.bundles`, as many as the account's round trip allows), and,
    under a known broker limit, split until every message fits: fewer batches per message, then
    fewer events per batch (a batch of one asset_id can be sent as two)."""

    def __init__(self, *, make: Callable[[Bundle], Outgoing], max_events: int, max_bytes: int,
                 oversized: Callable[[UploadBatch, int], list[Outgoing]],
                 max_batches: Callable[[str], int] = lambda account: MAX_BATCHES_PER_BUNDLE,
                 account_of: Callable[[str], str] = lambda asset_id: DEFAULT) -> None:
        self.make = make
        self.max_events = max_events
        self.max_bytes = max_bytes
        #: Batches per bundle of an account, asked at each hand-off (it follows the account's round trip).
        self.max_batches = max_batches
        #: asset_id -> the name of its account.
        self.account_of = account_of
        #: (one event's batch, the limit) -> what to write instead: an event alone over the
        #: broker's limit cannot be uploaded through it (dead letters, in parts).
        self.oversized = oversized

    def __call__(self, batches: list[Batch], limit: int | None) -> list[Outgoing]:
        by_account: dict[str, list[UploadBatch]] = {}
        nbytes: dict[int, int] = {}
        for batch in batches:
            load = UploadBatch(batch.asset_id, batch.events, replays=batch.replays)
            nbytes[id(load)] = batch.nbytes
            by_account.setdefault(self.account_of(batch.asset_id), []).append(load)
        cap = self.max_bytes if limit is None else min(self.max_bytes, limit)
        out: list[Outgoing] = []
        for account, loads in by_account.items():
            for bundle in bundles(loads, max_events=self.max_events, max_bytes=cap, size=lambda b: nbytes[id(b)],
                                  max_batches=self.max_batches(account), account=account):
                out += self._fit(bundle, limit)
        return out

    def _fit(self, bundle: Bundle, limit: int | None) -> list[Outgoing]:
        message = self.make(bundle)
        if limit is None or len(message.body) <= limit:
            return [message]
        account = bundle.account
        if len(bundle.batches) > 1:
            half = len(bundle.batches) // 2
            return (self._fit(Bundle(bundle.batches[:half], account), limit)
                    + self._fit(Bundle(bundle.batches[half:], account), limit))
        (batch,) = bundle.batches
        if len(batch) == 1:
            return self.oversized(batch, limit)
        half = len(batch) // 2
        return (self._fit(Bundle([batch.part(range(half))], account), limit)
                + self._fit(Bundle([batch.part(range(half, len(batch)))], account), limit))

"""The ingest pipeline: message -> events -> batches -> hand-off -> acknowledgement.

Runs on the worker's event loop, on every message of the ``activities`` queue (plain JSON)
and of Celery's default queue (``activities.ingest`` task messages). It does the cheap work
only, because the event loop is the throughput bottleneck: decode the body once
(:mod:`worker.ingest.decoding`), dead-letter what cannot be read or routed, group the rest by
``asset_id`` (:mod:`worker.ingest.batching`). An event travels on as the text it arrived in; strict
parsing, validation and the upload run on the upload threads (:mod:`worker.upload.delivery`).

A message is acknowledged once each of its events is handed on: published, broker-confirmed,
in an upload-task message or in the dead-letter queue (:class:`~worker.ingest.batching.Ticket`,
:mod:`worker.ingest.handoff`), in order and many at a time (:class:`~worker.ingest.acks.Acker`).

**The ack invariant.** Every delivery of the consumer's channel enters through
:meth:`Ingest.on_message` or :meth:`Ingest.on_undecodable` (kombu's decode-error callback), and
both register its tag with the :class:`~worker.ingest.acks.Acker` first; the Acker is the only
code that acknowledges on that channel, and it acknowledges a tag only once its ticket is
released, i.e. once everything the message held is confirmed by the broker somewhere else.
Nothing is acknowledged on an error path and nothing is rejected: a message this code cannot
hand on stays unacknowledged until the channel closes, and comes back.

What can go wrong costs one message at most, never the consumer:

- a body that cannot be read is dead-lettered whole (``malformed``), also one kombu could not
  even turn into a message (a ``compression`` header its body does not match, or a codec the
  worker does not read: :meth:`Ingest.on_undecodable`);
- another application's task message (on Celery's queue, shared by mistake) is dead-lettered
  whole (``unhandled``), with its headers and properties, never decoded: a pickle is never loaded;
- a bug anywhere in handling a message dead-letters that message whole (``unhandled``, its
  body kept and replayable) and the consumer goes on;
- a message a quorum queue delivered ``ACTIVITY_DELIVERY_LIMIT`` times is a *suspect*: the
  worker died holding it, or merely holding it among thousands of others. It is moved to the
  quarantine queue and handled there alone (:meth:`Ingest.handle_alone`); only if the worker
  dies again while it is the only message in hand is it set aside as ``poison``, body whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from config.settings import Settings
from worker.broker.background import Submitter
from worker.broker.connection import CONNECTION_ERRORS
from worker.broker.headers import SUSPECT_HEADER
from worker.broker.messages import INGEST_TASK, MAX_BATCHES_PER_BUNDLE, Bundle, UploadBatch
from worker.broker.publisher import Outgoing
from worker.clock import Clock
from worker.deadletter import envelopes
from worker.errors import ForeignMessage, MalformedBody, PublishError
from worker.events.parsing import MAX_EVENTS_PER_MESSAGE
from worker.events.validation import validate_event
from worker.ingest.acks import Acker
from worker.ingest.batching import Batch, Batcher, Ticket
from worker.ingest.decoding import (
    Message,
    Routed,
    delivery_count,
    events_of,
    foreign_message_details,
    replays_of,
    undecodable,
)
from worker.ingest.handoff import HandOff, Renderer

logger = logging.getLogger(__name__)

#: The largest event forwarded, in bytes of JSON. The API documents no limit; an event this
#: big is a producer bug (a blob in activity_params), and a batch of them would be huge.
MAX_EVENT_BYTES = 512 * 1024


#: Deliveries of a quarantined message (handled alone) that prove it kills the worker.
QUARANTINE_LIMIT = 2

#: bundle -> the upload-task message that carries it.
UploadMessageFn = Callable[[Bundle], Outgoing]


class IngestListener(Protocol):
    """What the consumer tells the outside (metrics): hooks, so that it imports none of them."""

    def events_read(self, *, received: int, batched: int) -> None:
        """A message held ``received`` events; ``batched`` of them went into batches."""

    def refused_in_ingest(self, invalid_reason: str) -> None:
        """One event dead-lettered ``invalid`` here (``missing_asset_id``, ``too_large``)."""

    def unroutable(self) -> None:
        """One event dead-lettered ``unroutable``: its asset_id is of no account."""

    def unreadable(self, reason: str) -> None:
        """A whole message dead-lettered as ``reason`` (``malformed``, ``poison``, ``unhandled``)."""


class _Silent:
    """The listener when nobody listens."""

    def events_read(self, *, received: int, batched: int) -> None:
        pass

    def refused_in_ingest(self, invalid_reason: str) -> None:
        pass

    def unroutable(self) -> None:
        pass

    def unreadable(self, reason: str) -> None:
        pass


class Ingest:
    """Turns source messages into upload-task messages and dead letters."""

    def __init__(
        self,
        *,
        settings: Settings,
        batcher: Batcher,
        acker: Acker,
        publisher: Submitter,
        upload_message: UploadMessageFn,
        clock: Clock,
        max_outstanding: int,
        release_slack: int = 0,
        quarantine_queue: str | None = None,
        listener: IngestListener | None = None,
        bundle_batches: Callable[[str], int] = lambda account: MAX_BATCHES_PER_BUNDLE,
    ) -> None:
        self.settings = settings
        self.listener: IngestListener = listener or _Silent()
        self.batcher = batcher
        self.acker = acker
        self.clock = clock
        #: Unacknowledged messages past which the oldest batch is released (backpressure).
        self.max_outstanding = max_outstanding
        #: Events released beyond the excess when over the limit, so that the next messages do
        #: not each release one small batch (one confirm round trip per message).
        self.release_slack = release_slack
        #: Where suspects go to be handled alone (None: set aside at once, as ``poison``).
        self.quarantine_queue = quarantine_queue
        self.letters = envelopes.DeadLetters(queue=settings.dead_letter_queue, clock=clock)
        #: asset_id -> its account (None: no account takes it, and there is no default).
        self.route = settings.accounts.route
        self.renderer = Renderer(make=upload_message, max_events=settings.batch_size,
                                 max_bytes=settings.batch_max_bytes, oversized=self._oversized,
                                 max_batches=bundle_batches, account_of=self._account_of)
        self.handoff = HandOff(publisher=publisher, render=self._render, clock=clock, fallback=self._unrenderable)
        self.counts = {"messages": 0, "events": 0, "malformed": 0, "invalid": 0, "batches": 0, "suspects": 0,
                       "unhandled": 0}
        #: An early release (over ``max_outstanding``) waits for its confirm: the next one waits for
        #: it, since only confirms bring the count down (else, with confirms slower than the messages
        #: arriving, as on quorum queues, each message released a batch of its own one event).
        self._releasing = False

    @property
    def blocked(self) -> bool:
        """True while a hand-off waits for the broker: the consumer takes no new message."""
        return self.handoff.blocked

    # --- the steps ------------------------------------------------------------------------------

    def on_message(self, message: Message) -> None:
        """Take one source message: dead-letter or batch each of its events."""
        self.counts["messages"] += 1
        self.acker.received(message.delivery_tag)
        ticket = Ticket(partial(self.acker.complete, message.delivery_tag))
        hold = _Once(ticket.release)  # the message's own hold on its ticket, released once
        try:
            self._take(message, ticket, hold)
        except CONNECTION_ERRORS:
            raise  # the channel is gone: Celery reconnects and the broker redelivers
        except Exception as exc:  # a bug: this message is set aside whole, the consumer goes on
            logger.exception("Unexpected %s handling a message; dead-lettering it whole", type(exc).__name__)
            self._unhandled(message, exc, hold)

    def on_undecodable(self, message: Message, exc: Exception) -> None:
        """kombu could not make a message of this delivery (its ``compression`` header: a body that
        does not match it, a codec this worker does not read, or a body that would expand too
        far): dead-lettered whole, the bytes as they arrived."""
        self.counts["messages"] += 1
        self.acker.received(message.delivery_tag)
        ticket = Ticket(partial(self.acker.complete, message.delivery_tag))
        hold = _Once(ticket.release)
        error, details = undecodable(message, exc)
        try:
            self._malformed(message, error, details, hold)
        except CONNECTION_ERRORS:
            raise
        except Exception as bug:  # the same one place as on_message: never the consumer
            logger.exception("Unexpected %s setting an unreadable message aside", type(bug).__name__)

    def undecodable_alone(self, message: Message, exc: Exception, ack: Callable[[], None]) -> None:
        """:meth:`on_undecodable` for a quarantined message (acknowledged by ``ack``)."""
        error, details = undecodable(message, exc)
        self._malformed(message, error, details, _Once(ack))

    def _take(self, message: Message, ticket: Ticket, hold: _Once) -> None:
        deliveries = delivery_count(message)
        limit = self.settings.delivery_limit
        if limit and deliveries is not None and deliveries >= limit:
            self._suspect(message, deliveries, hold)
            return
        try:
            events = events_of(message)
        except MalformedBody as exc:
            self._malformed(message, exc.error, exc.details, hold)
            return
        except ForeignMessage as exc:
            self._foreign(message, exc.task, hold)
            return
        self.counts["events"] += len(events)
        replays = replays_of(message)
        dead, ready = self._route(events, replays,
                                  lambda asset_id, text, size: self.batcher.add(asset_id, text, size, ticket, replays))
        excess = self.acker.outstanding - self.max_outstanding
        then: list[Callable[[], None]] = [hold]
        if excess > 0 and not self._releasing:  # release the oldest batches: the excess, and some slack
            released = 0
            while released < excess + self.release_slack and self.batcher.buffered:
                batch = self.batcher.release_oldest()
                assert batch is not None
                ready.append(batch)
                released += len(batch)
            if released:
                self._releasing = True
                then.append(self._released)
        self._send(dead, ready, then)

    def _released(self) -> None:
        """The early release was confirmed (a release :meth:`discard` forgot never reports:
        the hand-off drops what it forgot)."""
        self._releasing = False

    def _route(self, events: list[Routed], replays: int,
               batch: Callable[[str, str, int], list[Batch]]) -> tuple[list[Outgoing], list[Batch]]:
        """Dead-letter what cannot be routed or is too big; ``batch(asset_id, text, size)`` the
        rest (it returns the batches that are ready)."""
        dead: list[Outgoing] = []
        ready: list[Batch] = []
        route = self.route
        for asset_id, text, event, size in events:
            if asset_id is None:
                dead.append(self._invalid(event, replays))
            elif size > MAX_EVENT_BYTES:
                dead.append(self._too_large(event, asset_id, size, replays))
            elif route(asset_id) is None:
                dead.append(self._unroutable(event, asset_id, replays))
            else:
                ready += batch(asset_id, text, size)
        self.listener.events_read(received=len(events), batched=len(events) - len(dead))
        return dead, ready

    def tick(self) -> None:
        """Called often by a timer: retry unconfirmed hand-offs, acknowledge stragglers,
        release batches due."""
        self.handoff.tick()
        self.acker.ack_stragglers()
        due = self.batcher.due()
        if due:
            self._send([], due, [])

    def flush_all(self, timeout: float) -> None:
        """Hand on every open batch and wait for the broker (warm shutdown; ``timeout`` seconds at
        most); raises PublishError if it did not confirm everything in time."""
        self._send([], self.batcher.drain(), [])
        if not self.handoff.flush(timeout):
            raise PublishError(f"{self.handoff.waiting} hand-offs were not confirmed by the broker")

    def discard(self) -> int:
        """Forget everything in memory (the channel is gone; the broker redelivers it all)."""
        self.handoff.forget()
        self.acker.forget()
        self._releasing = False
        return self.batcher.discard()

    def _send(self, dead: list[Outgoing], batches: list[Batch], then: list[Callable[[], None]]) -> None:
        self.counts["batches"] += len(batches)
        self.handoff.send(dead, batches, [b.handed_on for b in batches] + then)

    def _render(self, batches: list[Batch], limit: int | None) -> list[Outgoing]:
        return self.renderer(batches, limit) if batches else []

    def _unrenderable(self, batches: list[Batch], exc: Exception) -> list[Outgoing]:
        """Batches a bug kept from becoming upload messages: their events, whole, as dead letters."""
        self.listener.unreadable(envelopes.UNHANDLED)
        error = (f"The worker failed to hand this event on for upload ({type(exc).__name__}) and set it aside so "
                 "the rest could go on; see its log at failed_at. Replay it once the cause is fixed.")
        details = {"problem": "internal_error", "exception": type(exc).__name__}
        return [self.letters.event_text(envelopes.UNHANDLED, error, text, details=details, asset_id=batch.asset_id,
                                        replays=batch.replays[index] if batch.replays else 0)
                for batch in batches for index, text in enumerate(batch.events)]

    # --- suspects: handled alone before being called poison ---------------------------------------

    def _suspect(self, message: Message, deliveries: int, hold: _Once) -> None:
        """Delivered ``deliveries`` times without being handled: the worker died holding it, or
        holding it among thousands of others. Prove which, alone, in the quarantine queue."""
        if self.quarantine_queue is None:
            self._poison(message, deliveries, hold)
            return
        self.counts["suspects"] += 1
        logger.warning("A message was delivered %d times without being handled: moving it to %s, where it is "
                       "handled alone", deliveries, self.quarantine_queue)
        headers = {**(message.headers or {}), SUSPECT_HEADER: deliveries}
        headers.pop("x-delivery-count", None)
        body = message.body.encode("utf-8", "surrogatepass") if isinstance(message.body, str) else bytes(message.body)
        moved = Outgoing(self.quarantine_queue, body, headers, message.content_type or "",
                         content_encoding=message.content_encoding or None)
        self._send([moved], [], [hold])

    def handle_alone(self, message: Message, ack: Callable[[], None]) -> None:
        """A quarantined message, the only one in hand: handled and handed on at once, so that
        a crash meanwhile implicates it alone. Delivered :data:`QUARANTINE_LIMIT` times here,
        it is what kills the worker: set aside as ``poison``, its body whole and replayable."""
        deliveries = delivery_count(message) or 0
        hold = _Once(ack)  # one acknowledgement, whichever path gets there
        if deliveries >= QUARANTINE_LIMIT:
            before = (message.headers or {}).get(SUSPECT_HEADER, 0)
            self._poison(message, (before if isinstance(before, int) else 0) + deliveries, hold)
            return
        try:
            try:
                events = events_of(message)
            except MalformedBody as exc:
                self._malformed(message, exc.error, exc.details, hold)
                return
            except ForeignMessage as exc:
                self._foreign(message, exc.task, hold)
                return
            ticket = Ticket(hold)
            replays = replays_of(message)
            alone = Batcher(max_events=self.settings.batch_size, max_wait=0.0, max_bytes=self.settings.batch_max_bytes,
                            max_buffered=MAX_EVENTS_PER_MESSAGE + 1, clock=self.clock)
            # batches of the message alone, as the batcher cuts them (size, bytes), all handed on at once
            dead, full = self._route(events, replays,
                                     lambda asset_id, text, size: alone.add(asset_id, text, size, ticket, replays))
            self._send(dead, full + alone.drain(), [ticket.release])
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:
            logger.exception("Unexpected %s handling a quarantined message; dead-lettering it whole",
                             type(exc).__name__)
            self._unhandled(message, exc, hold)

    # --- dead letters ---------------------------------------------------------------------------

    def _malformed(self, message: Message, error: str, details: dict[str, Any], hold: _Once) -> None:
        self.counts["malformed"] += 1
        self.listener.unreadable(envelopes.MALFORMED)
        logger.warning("Dead-lettering an unreadable message: %s", error)
        dead = self.letters.body(envelopes.MALFORMED, error, raw=message.body, details=details,
                                 replays=replays_of(message))
        self._send(dead, [], [hold])

    def _foreign(self, message: Message, task: str, hold: _Once) -> None:
        """Another application's task: none of ours to read. Kept whole, with what it takes to
        send it on to where it belongs (``details.message``: its queue, headers and properties)."""
        self.counts["unhandled"] += 1
        self.listener.unreadable(envelopes.UNHANDLED)
        queue = str((getattr(message, "delivery_info", None) or {}).get("routing_key") or "")
        logger.warning("Dead-lettering a task message for %r that reached %s (this worker runs only %s)", task,
                       queue or "a queue of the worker", INGEST_TASK)
        error = (f"A task message for {task!r} reached {queue or 'a queue of this worker'}, which this worker consumes "
                 f"for {INGEST_TASK!r} only: it was set aside, unread. Send that application's tasks to a queue of "
                 "its own (or give this worker another ACTIVITY_TASK_QUEUE); then replay it to where it belongs.")
        details = {"problem": "foreign_task", "task": task, "replay_body": False,
                   "message": foreign_message_details(message, queue)}
        dead = self.letters.body(envelopes.UNHANDLED, error, raw=message.body, details=details,
                                 replays=replays_of(message))
        self._send(dead, [], [hold])

    def _poison(self, message: Message, deliveries: int, hold: _Once) -> None:
        """Proven to kill the worker: never read again, set aside whole."""
        self.counts["malformed"] += 1
        self.listener.unreadable(envelopes.POISON)
        error = (
            f"This message was delivered {deliveries} times and the worker died each time before handling it, "
            "the last times while it was the only message in hand. It was set aside so that it cannot crash the "
            "worker again: look at the worker's logs around failed_at, then replay it once the cause is fixed."
        )
        logger.error("Dead-lettering a message delivered %d times (poison)", deliveries)
        dead = self.letters.body(envelopes.POISON, error, raw=message.body, details={"deliveries": deliveries},
                                 attempts=deliveries, replays=replays_of(message))
        self._send(dead, [], [hold])

    def _unhandled(self, message: Message, exc: Exception, hold: _Once) -> None:
        """A bug met this message: keep it whole (replayable when it is a producer's body)."""
        self.listener.unreadable(envelopes.UNHANDLED)
        error = (f"The worker failed on this message ({type(exc).__name__}) and set it aside whole so the rest "
                 "could go on; see its log at failed_at. Replay it once the cause is fixed.")
        details = {"problem": "internal_error", "exception": type(exc).__name__,
                   "replay_body": "task" not in (message.headers or {})}
        dead = self.letters.body(envelopes.UNHANDLED, error, raw=message.body, details=details,
                                 replays=replays_of(message))
        try:
            self.handoff.send(dead, [], [hold])
        except CONNECTION_ERRORS:
            raise
        except Exception:  # the hand-off itself is broken: leave the message unacknowledged
            logger.exception("Could not even set the message aside; it stays unacknowledged")

    def _account_of(self, asset_id: str) -> str:
        account = self.route(asset_id)
        assert account is not None, "only routable events are batched"
        return account.name

    def _unroutable(self, event: Any, asset_id: str, replays: int) -> Outgoing:
        self.counts["invalid"] += 1
        self.listener.unroutable()
        error = (f"asset_id {asset_id!r} belongs to no account of NETCORE_ACCOUNTS_FILE, and there is no default "
                 "account (NETCORE_API_KEY is not set). Add it to its account's asset_ids and restart the workers, "
                 "then replay the reason 'unroutable'.")
        details = {"asset_id": asset_id, "accounts": self.settings.accounts.names}
        return self.letters.event(envelopes.UNROUTABLE, error, event=event, details=details, asset_id=asset_id,
                                  replays=replays)

    def _invalid(self, event: Any, replays: int = 0) -> Outgoing:
        self.counts["invalid"] += 1
        self.listener.refused_in_ingest("missing_asset_id")
        errors = validate_event(event) or {"asset_id": ["asset_id is missing or not a string."]}
        error = f"The event cannot be routed: {'; '.join(m for ms in errors.values() for m in ms)}"
        return self.letters.event(envelopes.INVALID, error, event=event, details=errors, replays=replays)

    def _too_large(self, event: Any, asset_id: str, size: int, replays: int = 0) -> Outgoing:
        self.counts["invalid"] += 1
        self.listener.refused_in_ingest("too_large")
        error = (f"The event is {size} bytes of JSON, over the {MAX_EVENT_BYTES}-byte limit per event: send large "
                 "data by reference, not inside activity_params.")
        details = {"_schema": ["event too large"], "size": size, "max_bytes": MAX_EVENT_BYTES}
        return self.letters.event(envelopes.INVALID, error, event=event, details=details, asset_id=asset_id,
                                  replays=replays)

    def _oversized(self, batch: UploadBatch, limit: int) -> list[Outgoing]:
        """One event whose upload message is over the broker's ``max_message_size``: it cannot
        travel through this broker; kept whole in dead letters of parts under the limit."""
        self.listener.refused_in_ingest("too_large")
        error = (f"The event's upload message is over the broker's max_message_size ({limit} bytes): it cannot be "
                 "uploaded through this RabbitMQ. Send large data by reference, or raise max_message_size.")
        return self.letters.body(envelopes.INVALID, error, raw=batch.events[0],
                                 details={"_schema": ["event too large for the broker"], "max_bytes": limit},
                                 asset_id=batch.asset_id, replays=batch.replays_of(0), part_bytes=max(1024, limit // 4))


class _Once:
    """Calls ``callback`` the first time it is called, never again (a message's own hold)."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback: Callable[[], None] | None = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()




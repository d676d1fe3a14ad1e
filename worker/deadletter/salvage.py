"""The salvage: what RabbitMQ dead-lettered out of the upload queue, written to the dead-letter queue.

The upload queue dead-letters what a worker rejects to ``activities.dead.unhandled``
(:mod:`worker.broker.topology`): a task that raised before it could handle its bundle
(arguments from another version, a bug), a message Celery could not decode, an outcome the
broker refused again and again. Those messages hold events nobody else has, so nothing may
delete them, and a person must be able to find and replay them with the dead-letter command.

This consumer step turns each into the contract's envelopes, one per event, with reason
``unhandled`` (the events intact, replayable), or, when the message holds no readable bundle,
one envelope with its whole body in ``raw``; it acknowledges the message once the broker
confirmed them. If the broker does not, the message stays unacknowledged and comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from kombu.messaging import Consumer

from worker.broker.background import Submitter
from worker.broker.messages import UPLOAD_TASK, read_bundle
from worker.broker.publisher import Outgoing
from worker.clock import Clock, SystemClock
from worker.deadletter import envelopes
from worker.errors import PublishError
from worker.events import jsonutil

logger = logging.getLogger(__name__)

#: Messages taken at once (each may hold a thousand events).
PREFETCH = 4

#: Seconds before a salvage the broker did not confirm is tried again; doubles up to RETRY_MAX.
RETRY_BASE = 1.0
RETRY_MAX = 60.0


def dead_letters(body: bytes | str, headers: dict[str, Any], letters: envelopes.DeadLetters, *,
                 why: str | None = None) -> list[Outgoing]:
    """The dead letters for one dead-lettered message (see the module docstring): its events
    (written for the bundle's account), or its whole body. ``why``: the sentence of an upload
    task's events, when it was not RabbitMQ that dead-lettered it."""
    death = _first_death(headers)
    where = f"{death.get('queue', 'the upload queue')} ({death.get('reason', 'rejected')})"
    task = headers.get("task")
    bundle = None
    try:
        payload = jsonutil.loads(body)
        if task in (UPLOAD_TASK, None) and isinstance(payload, list) and payload and isinstance(payload[0], list):
            bundle = read_bundle(payload[0])
    except ValueError:
        bundle = None
    details = {"dead_lettered_from": where, "task": task}
    if bundle is None:
        error = (f"RabbitMQ dead-lettered this message from {where}: the worker could not handle it and could "
                 "not read events out of it. Its whole body is in raw; see the worker's log at failed_at.")
        return letters.body(envelopes.UNHANDLED, error, raw=body, details=details)
    if why is None and death.get("reason") == "delivery_limit":
        why = (f"RabbitMQ dead-lettered this upload task from {where}: it was delivered too often without being "
               "handled (RabbitMQ's delivery limit), so a worker died holding it again and again (see the workers' "
               "logs and exits at failed_at). The event may or may not have reached Netcore; replay it once the "
               "cause is fixed.")
    error = why or (f"RabbitMQ dead-lettered this upload task from {where}: the worker failed on it without "
                    "handling the failure (see its log and Sentry at failed_at). The event may or may not have "
                    "reached Netcore; replay it once the cause is fixed.")
    if bundle.account is not None:
        letters = envelopes.DeadLetters(queue=letters.queue, clock=letters.clock, account=bundle.account)
    out = []
    for batch in bundle.batches:
        for index, text in enumerate(batch.events):
            out.append(letters.event_text(envelopes.UNHANDLED, error, text, details=details,
                                          asset_id=batch.asset_id, attempts=batch.attempts,
                                          replays=batch.replays_of(index)))
    return out


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        first = deaths[-1]  # RabbitMQ puts the most recent first
        return {"queue": first.get("queue"), "reason": first.get("reason")}
    return {"queue": headers.get("x-first-death-queue"), "reason": headers.get("x-first-death-reason")}


class Salvage:
    """Handles each dead-lettered message: envelopes published, then the message acknowledged.

    Publishing goes through the loop's background publisher; a group the broker does not confirm
    is tried again after a backoff (doubling from :data:`RETRY_BASE` to :data:`RETRY_MAX`), the
    message unacknowledged meanwhile. After a lost connection (:meth:`forget`) what was in hand
    is left to the broker, which delivers it again.
    """

    def __init__(self, *, publisher: Submitter, dead_letter_queue: str, clock: Clock,
                 later: Callable[[float, Callable[[], None]], Any],
                 kept_outcome: Callable[[str], list[Outgoing] | None] = lambda task_id: None,
                 counted: Callable[[str | None, int], None] = lambda account, events: None) -> None:
        self.publisher = publisher
        self.later = later
        #: (account, events) of a readable upload task's events written here (for the metrics).
        self.counted = counted
        #: task id -> the dead letters of the outcome this process could not publish for it (only
        #: what was not delivered), or None: then every event of the message is written.
        self.kept_outcome = kept_outcome
        self.letters = envelopes.DeadLetters(queue=dead_letter_queue, clock=clock)
        self._generation = 0

    def on_message(self, message: Any) -> None:
        headers = dict(message.headers or {})
        try:
            task_id = headers.get("id")
            kept = self.kept_outcome(task_id) if isinstance(task_id, str) else None
            letters = kept if kept is not None else dead_letters(message.body, headers, self.letters)
        except Exception:  # a bug here: keep the message whole rather than lose it
            logger.exception("Salvage: could not read a dead-lettered message; writing it whole")
            letters = self.letters.body(envelopes.UNHANDLED, "The worker could not read this dead-lettered message.",
                                        raw=message.body)
        self._publish(message, letters, _first_death(headers), RETRY_BASE)

    def on_undecodable(self, message: Any, exc: Exception) -> None:
        """kombu could not make a message of it (its ``compression`` header): kept whole."""
        headers = dict(message.headers or {})
        error = (f"RabbitMQ dead-lettered this message from {_first_death(headers).get('queue')}; kombu could not "
                 f"read it ({type(exc).__name__}: its compression header). Its whole body is in raw.")
        letters = self.letters.body(envelopes.UNHANDLED, error, raw=message.body,
                                    details={"problem": "compression", "error": type(exc).__name__})
        self._publish(message, letters, _first_death(headers), RETRY_BASE)

    def forget(self) -> None:
        """The channel is gone: results and retries of what was in hand no longer matter."""
        self._generation += 1

    def _count(self, letters: list[Outgoing]) -> None:
        """Count the events written (not the bodies kept whole: no event of those was counted
        as received), by account."""
        by_account: dict[str | None, int] = {}
        for letter in letters:
            body = jsonutil.loads(letter.body)
            if body.get("event") is not None and body.get("reason") == envelopes.UNHANDLED:
                account = body.get(envelopes.ACCOUNT)
                by_account[account] = by_account.get(account, 0) + 1
        for account, events in by_account.items():
            self.counted(account, events)

    def _publish(self, message: Any, letters: list[Outgoing], death: dict[str, Any], delay: float) -> None:
        generation = self._generation

        def done(error: PublishError | None) -> None:
            if generation != self._generation:
                return
            if error is None:
                logger.error("Salvage: wrote %d events of a message RabbitMQ dead-lettered (%s) to %s as 'unhandled'",
                             len(letters), death, self.letters.queue)
                self._count(letters)
                _ack(message)
                return
            logger.error("Salvage: the broker did not confirm %d dead letters (%s); trying again in %.1f s",
                         len(letters), error, delay)
            self.later(delay, lambda: self._retry(message, letters, death, min(RETRY_MAX, delay * 2), generation))

        self.publisher.submit(letters, done)

    def _retry(self, message: Any, letters: list[Outgoing], death: dict[str, Any], delay: float,
               generation: int) -> None:
        if generation == self._generation:
            self._publish(message, letters, death, delay)


def _ack(message: Any) -> None:
    try:
        message.ack()
    except Exception as exc:  # the channel closed meanwhile: the broker delivers it again
        logger.warning("Salvage: could not acknowledge a salvaged message (%r); it comes back", exc)


class SalvageStep(bootsteps.ConsumerStep):
    """Consumes ``activities.dead.unhandled`` on a channel of its own."""

    name = "netcore.Salvage"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime = c.app.runtime()
        self.topology = self.runtime.topology
        self.salvage: Salvage | None = None

    def start(self, c: Any) -> None:
        self.salvage = Salvage(publisher=self.runtime.background(c.hub.call_soon),
                               dead_letter_queue=self.topology.dead_letter, clock=SystemClock(),
                               later=lambda seconds, fn: c.timer.call_after(seconds, fn),
                               kept_outcome=self.runtime.kept_outcome, counted=self.runtime.listener.salvaged)
        super().start(c)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        assert self.salvage is not None
        channel.auto_decode = False
        return [Consumer(channel, queues=[self.topology.unhandled_queue()], on_message=self.salvage.on_message,
                         on_decode_error=self.salvage.on_undecodable, prefetch_count=PREFETCH, no_ack=False)]

    def stop(self, c: Any) -> None:
        if self.salvage is not None:
            self.salvage.forget()
        super().stop(c)

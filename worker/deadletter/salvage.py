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
from typing import Any

from celery import bootsteps
from kombu.messaging import Consumer

from worker.broker.messages import UPLOAD_TASK, read_bundle
from worker.broker.publisher import Outgoing, Publisher, PublishFn
from worker.clock import Clock, SystemClock
from worker.deadletter import envelopes
from worker.errors import PublishError
from worker.events import jsonutil

logger = logging.getLogger(__name__)

#: Messages taken at once (each may hold a thousand events).
PREFETCH = 4


def dead_letters(body: bytes | str, headers: dict[str, Any], letters: envelopes.DeadLetters) -> list[Outgoing]:
    """The dead letters for one dead-lettered message (see the module docstring)."""
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
    error = (f"RabbitMQ dead-lettered this upload task from {where}: the worker failed on it without handling "
             "the failure (see its log and Sentry at failed_at). The event may or may not have reached Netcore; "
             "replay it once the cause is fixed.")
    out = []
    for batch in bundle.batches:
        for index, text in enumerate(batch.events):
            event, raw = _event_of(text)
            out.append(letters.event(envelopes.UNHANDLED, error, event=event, raw=raw, details=details,
                                     asset_id=batch.asset_id, attempts=batch.attempts,
                                     replays=batch.replays_of(index)))
    return out


def _event_of(text: Any) -> tuple[Any, str | None]:
    """(event, None) for an event's JSON text, or (None, the text) when it is not an object."""
    if not isinstance(text, str):
        return (text, None) if isinstance(text, dict) else (None, jsonutil.dumps(text).decode("utf-8", "replace"))
    try:
        value = jsonutil.loads(text)
    except ValueError:
        return None, text
    return (value, None) if isinstance(value, dict) else (None, text)


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        first = deaths[-1]  # RabbitMQ puts the most recent first
        return {"queue": first.get("queue"), "reason": first.get("reason")}
    return {"queue": headers.get("x-first-death-queue"), "reason": headers.get("x-first-death-reason")}


class Salvage:
    """Handles each dead-lettered message: envelopes published, then the message acknowledged."""

    def __init__(self, *, publish: PublishFn, dead_letter_queue: str, clock: Clock) -> None:
        self.publish = publish
        self.letters = envelopes.DeadLetters(queue=dead_letter_queue, clock=clock)

    def on_message(self, message: Any) -> None:
        headers = dict(message.headers or {})
        try:
            letters = dead_letters(message.body, headers, self.letters)
        except Exception:  # a bug here: keep the message whole rather than lose it
            logger.exception("Salvage: could not read a dead-lettered message; writing it whole")
            letters = self.letters.body(envelopes.UNHANDLED, "The worker could not read this dead-lettered message.",
                                        raw=message.body)
        try:
            self.publish(letters)
        except PublishError as exc:
            logger.error("Salvage: the broker did not confirm %d dead letters (%s); the message stays in %s",
                         len(letters), exc, message.delivery_info.get("routing_key"))
            return  # unacknowledged: it comes back with the channel
        logger.error("Salvage: wrote %d events of a message RabbitMQ dead-lettered (%s) to %s as 'unhandled'",
                     len(letters), _first_death(headers), self.letters.queue)
        message.ack()


class SalvageStep(bootsteps.ConsumerStep):
    """Consumes ``activities.dead.unhandled`` on a channel of its own."""

    name = "netcore.Salvage"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        runtime = c.app.runtime()
        self.topology = runtime.topology
        self.publisher = Publisher(runtime.settings.broker_url, declare=[self.topology.dead_letter_queue()])
        self.salvage = Salvage(publish=self.publisher.publish, dead_letter_queue=self.topology.dead_letter,
                               clock=SystemClock())

    def get_consumers(self, channel: Any) -> list[Consumer]:
        channel.auto_decode = False
        return [Consumer(channel, queues=[self.topology.unhandled_queue()], on_message=self.salvage.on_message,
                         prefetch_count=PREFETCH, no_ack=False)]

    def shutdown(self, c: Any) -> None:
        super().shutdown(c)
        self.publisher.close()

"""Delivering one batch: validate -> upload (bisecting rejections) -> dead-letter or retry.

This runs inside the ``activities.upload`` task, in a pool process, so the costly parts
(marshmallow, HTTP) are spread over the pool while the consumer only parses and batches.

Bisection: when the API answers 400 to a batch, it is split in halves and each half is sent
again, until every rejected event stands alone and is dead-lettered while its neighbours are
delivered. With ``k`` rejected events among ``n``, that takes at most ``2·k·⌈log2 n⌉ + 1``
requests (61 for 3 in 1000). A transient failure stops the bisection: what is left is retried
as one batch later.

:meth:`Delivery.deliver` returns only after the dead letters and the retry message are
confirmed by the broker; then the task's message may be acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker import deadletter, jsonutil, metrics
from worker.client import ApiClient
from worker.clock import Clock
from worker.errors import Permanent, Transient
from worker.observability import report_failure
from worker.publisher import Outgoing, PublishFn
from worker.retry import RetryPolicy
from worker.parsing import MalformedBody, parse_body
from worker.validation import NaiveTimestamps, is_stale, validate_event

logger = logging.getLogger(__name__)

#: Builds the message of a retried batch: (asset_id, events, attempts, countdown) -> message.
RetryMessageFn = Callable[[str, list[Any], int, float], Outgoing]

#: An event as it travels: the JSON text it arrived in (forwarded as is), and its value.
Item = tuple[str, Any]


@dataclass
class Report:
    """What became of one batch's events; they always add up to the batch."""

    asset_id: str
    received: int
    delivered: int = 0
    invalid: int = 0
    stale: int = 0
    dead: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    requests: int = 0
    statuses: list[int | None] = field(default_factory=list)


class Delivery:
    """Delivers batches through ``client``; hands failures to ``publish``."""

    def __init__(
        self,
        *,
        client: ApiClient,
        policy: RetryPolicy,
        publish: PublishFn,
        retry_message: RetryMessageFn,
        dead_letter_queue: str,
        clock: Clock,
        naive_timestamps: NaiveTimestamps = "forward",
    ) -> None:
        self.client = client
        self.policy = policy
        self.publish = publish
        self.retry_message = retry_message
        self.dead_letter_queue = dead_letter_queue
        self.clock = clock
        #: ACTIVITY_NAIVE_TIMESTAMPS: forward zone-less timestamps, or dead-letter them as invalid.
        self.naive_timestamps: NaiveTimestamps = naive_timestamps

    def deliver(self, asset_id: str, events: Sequence[Any], attempts: int = 0) -> Report:
        """Deliver one batch that has already been tried ``attempts`` times.

        ``events`` are the events' JSON texts, as the ingest step sends them; values that
        are not strings are taken as events already parsed.
        """
        started = time.monotonic()
        report = Report(asset_id, len(events))
        now = self.clock.now()
        dead: list[Outgoing] = []
        valid: list[Item] = []
        for item in events:
            text, event, problem = _read(item)
            if problem is not None:
                report.invalid += 1
                dead.append(self._malformed(problem, text, asset_id))
                continue
            errors = validate_event(event, naive_timestamps=self.naive_timestamps)
            if errors:
                report.invalid += 1
                dead.append(self._dead(deadletter.INVALID, _invalid_sentence(errors), event, asset_id, 0, errors))
            else:
                valid.append((text, event))
                if is_stale(event, now):
                    report.stale += 1
        retry, retry_after, last_error = self._upload(valid, report, dead, attempts + 1)
        if retry:
            texts = [text for text, _ in retry]
            dead.extend(self._retry_or_give_up(asset_id, texts, attempts + 1, retry_after, last_error, report))
        for message in dead:
            if message.queue == self.dead_letter_queue:
                reason = message.headers[deadletter.REASON_HEADER]
                report.dead[reason] = report.dead.get(reason, 0) + 1
        self.publish(dead)
        metrics.batch_done(report, dead, self.dead_letter_queue, first_attempt=attempts == 0)
        _log(report, attempts + 1, time.monotonic() - started)
        return report

    def reschedule(self, asset_id: str, events: list[Any], attempts: int, error: Exception) -> None:
        """After an unexpected error (a bug, not an answer): retry the batch later, like a
        transient failure, so that it is never acknowledged unhandled nor retried forever."""
        report = Report(asset_id, len(events))
        failure = Transient(f"unexpected {type(error).__name__} in the worker")
        messages = self._retry_or_give_up(asset_id, list(events), attempts + 1, None, failure, report)
        self.publish(messages)
        metrics.batch_done(report, messages, self.dead_letter_queue, first_attempt=False)

    def _upload(
        self, events: list[Item], report: Report, dead: list[Outgoing], attempt: int
    ) -> tuple[list[Item], float | None, Transient | None]:
        """Send ``events``, bisecting on rejection; return what must be retried."""
        pending = [events] if events else []
        while pending:
            part = pending.pop()
            report.requests += 1
            try:
                metrics.timed_post(self.client, [text for text, _ in part])
            except Transient as exc:
                report.statuses.append(exc.status)
                retry = [item for chunk in pending for item in chunk] + part
                return retry, exc.retry_after, exc
            except Permanent as exc:
                report.statuses.append(exc.status)
                if exc.status in (400, 413) and len(part) > 1:
                    half = len(part) // 2
                    pending += [part[half:], part[:half]]
                    continue
                details = {"status": exc.status, "response": exc.body}
                dead.extend(
                    self._dead(exc.reason, str(exc), event, report.asset_id, attempt, details) for _, event in part
                )
                report_failure(exc.reason, exc.status, report.asset_id, len(part), str(exc))
            else:
                report.statuses.append(200)
                report.delivered += len(part)
        return [], None, None

    def _retry_or_give_up(
        self,
        asset_id: str,
        events: list[Any],
        attempts: int,
        retry_after: float | None,
        error: Transient | None,
        report: Report,
    ) -> list[Outgoing]:
        if self.policy.exhausted(attempts):
            sentence = (
                f"Gave up after {attempts} attempts; the last failure: {error}. Replay these "
                "events once the API is reachable again."
            )
            details = {"status": error.status if error else None, "response": error.body if error else ""}
            report_failure(deadletter.RETRIES_EXHAUSTED, details["status"], asset_id, len(events), sentence)
            return [
                self._dead(deadletter.RETRIES_EXHAUSTED, sentence, _read(item)[1], asset_id, attempts, details)
                for item in events
            ]
        delay = self.policy.delay(attempts, retry_after)
        report.retried = len(events)
        logger.warning(
            "Upload of %d events for asset_id=%s failed (%s); retry %d of %d in %.1f s",
            len(events), asset_id, error, attempts, self.policy.max_retries, delay,
        )
        return [self.retry_message(asset_id, events, attempts, delay)]

    def _malformed(self, problem: MalformedBody, text: str, asset_id: str) -> Outgoing:
        body = deadletter.envelope(
            reason=deadletter.MALFORMED, error=problem.error, raw=text, details=problem.details,
            asset_id=asset_id, failed_at=self.clock.now(),
        )
        return deadletter.message(self.dead_letter_queue, body)

    def _dead(
        self, reason: str, error: str, event: Any, asset_id: str, attempts: int, details: dict[str, Any]
    ) -> Outgoing:
        body = deadletter.envelope(
            reason=reason,
            error=error,
            event=event,
            details=details,
            asset_id=asset_id,
            attempts=attempts,
            failed_at=self.clock.now(),
        )
        return deadletter.message(self.dead_letter_queue, body)


def _read(item: Any) -> tuple[str, Any, MalformedBody | None]:
    """(text, event, problem) of one item of a batch: strict parsing of an event's text
    (duplicate keys, huge numbers... that the consumer's fast parser lets through)."""
    if not isinstance(item, str):
        return jsonutil.dumps(item).decode("utf-8"), item, None
    try:
        values = parse_body(item)
    except MalformedBody as exc:
        return item, None, exc
    if len(values) != 1:
        return item, None, MalformedBody("Expected one event here, found an array.", {"problem": "not_object"})
    return item, values[0], None


def _invalid_sentence(errors: dict[str, list[str]]) -> str:
    fields = ", ".join(sorted(errors))
    first = next(iter(errors.values()))[0]
    return f"The event breaks the API's rules ({fields}): {first}"


def _log(report: Report, attempt: int, duration: float) -> None:
    logger.info(
        "batch asset_id=%s events=%d delivered=%d dead=%s retried=%d requests=%d statuses=%s "
        "attempt=%d duration=%.3fs",
        report.asset_id, report.received, report.delivered, report.dead or "{}", report.retried,
        report.requests, ",".join(str(s) for s in report.statuses) or "-", attempt, duration,
    )
    if report.stale:
        logger.warning(
            "asset_id=%s: %d events are older than 24 hours: Netcore stores them but they "
            "will not trigger a journey",
            report.asset_id, report.stale,
        )

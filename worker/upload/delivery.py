"""Delivering one bundle: validate -> upload each batch (bisecting rejections) -> dead letters, retries.

This runs in the ``activities.upload`` task, on one of the pool's threads, for one Netcore
account (each account has its own :class:`Delivery`: its API client, circuit, adaptive limit and
queues, :mod:`worker.upload.lanes`). For each batch:

1. every event is parsed strictly and validated (:mod:`worker.events.screening`); what fails is
   dead-lettered (``malformed``, ``invalid``) and its neighbours go on; a retried batch was
   screened before, and is not again;
2. the valid events are posted, one request at a time, each with the circuit's leave
   (:mod:`worker.upload.circuit`) and counted in flight (:mod:`worker.upload.concurrency`);
3. a 400 splits the batch in halves, again and again, until every rejected event stands
   alone: with ``k`` rejected among ``n``, at most ``2·k·⌈log2 n⌉ + 1`` requests; it and only
   it is dead-lettered (``rejected``); other permanent answers dead-letter the part that got
   them (``unauthorized``, ``refused``);
4. a transient failure ends the batch's attempt: what is left waits in a RabbitMQ delay queue
   of the account and comes back to its upload queue (:meth:`Delivery.retry_messages`). It
   spends an attempt only when the circuit says it counts (the API accepted other uploads since
   the batch first failed: :meth:`~worker.upload.circuit.Circuit.counts`); a request the
   circuit refused waits the same way, without spending one.

An unexpected error (a bug) in one batch is retried like a transient failure, counted, so that
it is neither acknowledged unhandled nor retried for ever; the other batches go on.
:meth:`Delivery.deliver` returns once every dead letter and retry is confirmed by the broker:
then, and only then, may the task's message be acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.broker.headers import REASON_HEADER
from worker.broker.messages import Bundle, UploadBatch, bundles
from worker.broker.publisher import Outgoing, PublishFn
from worker.broker.topology import Topology
from worker.clock import Clock
from worker.deadletter import envelopes
from worker.errors import Permanent, Refused, Rejected, Transient, Unauthorized
from worker.events.screening import read_event, screen
from worker.events.validation import NaiveTimestamps
from worker.upload.circuit import Circuit
from worker.upload.concurrency import AdaptiveConcurrency
from worker.upload.retry import RetryPolicy

logger = logging.getLogger(__name__)

#: The dead-letter reason of each kind of permanent answer.
PERMANENT_REASONS: dict[type[Permanent], str] = {
    Rejected: envelopes.REJECTED, Unauthorized: envelopes.UNAUTHORIZED, Refused: envelopes.REFUSED,
}

#: (queue, bundle) -> the task message that carries ``bundle`` to ``queue``.
RetryMessageFn = Callable[[str, Bundle], Outgoing]

#: Why a batch waits when the circuit refused it leave to go.
_HELD = "the API is down, or this asset_id fails with no sign the API works (the circuit holds it)"


class Poster(Protocol):
    """What delivery needs of :class:`~worker.upload.client.ApiClient`."""

    def post(self, events: Sequence[Any]) -> None: ...


class DeliveryListener(Protocol):
    """Hooks for metrics, logs and Sentry, so that delivery imports none of them."""

    def request_done(self, *, account: str, status: str, outcome: str, events: int, seconds: float) -> None: ...

    def bundle_done(self, report: Report, *, first_attempt_events: int) -> None: ...

    def gave_up(self, *, account: str, reason: str, status: int | None, asset_id: str, events: int,
                error: str) -> None: ...


@dataclass
class Report:
    """What became of one bundle's events; they always add up to ``received``."""

    batches: int
    received: int
    asset_ids: list[str] = field(default_factory=list)
    #: The account the bundle was delivered for.
    account: str = "default"
    delivered: int = 0
    invalid: int = 0
    stale: int = 0
    #: Valid events whose timestamp has no zone (forwarded as the vendor's samples send them).
    naive: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    #: Events put back with an attempt counted (a failure while the API otherwise worked).
    retried: int = 0
    #: Events put back without an attempt counted (the circuit refused them, a probe, a 429).
    held: int = 0
    requests: int = 0
    statuses: list[int | None] = field(default_factory=list)
    #: Retry messages published (for the metrics: batches put back).
    retry_messages: int = 0


@dataclass
class _Retry:
    """A batch (or what is left of it) to try again."""

    batch: UploadBatch
    counted: bool
    error: str
    status: int | None = None
    body: str = ""
    retry_after: float | None = None


class Delivery:
    """Delivers bundles through ``client``; hands dead letters and retries to ``publish``."""

    def __init__(
        self,
        *,
        client: Poster,
        circuit: Circuit,
        concurrency: AdaptiveConcurrency,
        policy: RetryPolicy,
        topology: Topology,
        publish: PublishFn,
        retry_message: RetryMessageFn,
        clock: Clock,
        account: str = "default",
        max_bundle_events: int = 1000,
        max_bundle_bytes: int = 4 * 1024 * 1024,
        naive_timestamps: NaiveTimestamps = "forward",
        listener: DeliveryListener | None = None,
    ) -> None:
        self.client = client
        self.circuit = circuit
        self.concurrency = concurrency
        self.policy = policy
        self.topology = topology
        self.publish = publish
        self.retry_message = retry_message
        self.clock = clock
        self.max_bundle_events = max_bundle_events
        self.max_bundle_bytes = max_bundle_bytes
        #: ACTIVITY_NAIVE_TIMESTAMPS: forward zone-less timestamps (counted), or dead-letter them.
        self.naive_timestamps: NaiveTimestamps = naive_timestamps
        self.listener = listener
        #: The account's name: its queues, its metrics' label, each dead letter's ``account``.
        self.account = account
        self.letters = envelopes.DeadLetters(queue=topology.dead_letter, clock=clock, account=account)

    def deliver(self, bundle: Bundle) -> Report:
        """Deliver every batch of ``bundle``; publish its dead letters and retries; report."""
        started = time.monotonic()
        report = Report(len(bundle.batches), bundle.events, [b.asset_id for b in bundle.batches], self.account)
        dead: list[Outgoing] = []
        retries: list[_Retry] = []
        first_attempt_events = 0
        for batch in bundle.batches:
            if batch.attempts == 0 and batch.since is None:
                first_attempt_events += len(batch)
            try:
                self._deliver_batch(batch, report, dead, retries)
            except Exception as exc:  # a bug: retried (counted) like a transient failure, never lost
                logger.exception("asset_id=%s: unexpected %s delivering %d events", batch.asset_id,
                                 type(exc).__name__, len(batch))
                retries.append(_Retry(batch, True, f"unexpected {type(exc).__name__} in the worker"))
        messages = dead + self.retry_messages(retries, report, dead)
        for message in dead:
            report.dead[message.headers.get(REASON_HEADER, "unknown")] += 1
        # told before publishing: what was delivered is delivered, whatever the broker says next
        # (an outcome it refuses is published again by the task: worker.upload.task)
        if self.listener is not None:
            self.listener.bundle_done(report, first_attempt_events=first_attempt_events)
        _log(report, bundle, time.monotonic() - started)
        self.publish(messages)
        return report

    # --- one batch ----------------------------------------------------------------------------

    def _deliver_batch(self, batch: UploadBatch, report: Report, dead: list[Outgoing], retries: list[_Retry]) -> None:
        batch = self._screen(batch, report, dead)
        pending = [list(range(len(batch)))] if len(batch) else []
        while pending:
            part = pending.pop()
            with self.circuit.request(batch.asset_id) as permit:
                if permit is None:  # the API (or this asset_id) is held: wait, without spending an attempt
                    left = sorted(part + [i for chunk in pending for i in chunk])
                    retries.append(_Retry(batch.part(left), False, _HELD))
                    return
                report.requests += 1
                began = self.concurrency.started()
                try:
                    self.client.post([batch.events[i] for i in part])
                except Transient as exc:
                    self._request_done(began, exc.status, "transient", len(part), congested=True)
                    rate_limited = exc.rate_limited
                    counted = self.circuit.counts(permit, rate_limited=rate_limited, since=batch.since)
                    self.circuit.failed(permit, error=str(exc), counted=counted, rate_limited=rate_limited,
                                        retry_after=exc.retry_after if rate_limited else None)
                    left = sorted(part + [i for chunk in pending for i in chunk])
                    retries.append(_Retry(batch.part(left), counted, str(exc), exc.status, exc.body, exc.retry_after))
                    report.statuses.append(exc.status)
                    return
                except Permanent as exc:
                    self._request_done(began, exc.status, "permanent", len(part), congested=False)
                    self.circuit.succeeded(permit)  # the API answered: it is up
                    report.statuses.append(exc.status)
                    if (isinstance(exc, Rejected) or exc.status == 413) and len(part) > 1:
                        half = len(part) // 2
                        pending += [part[half:], part[:half]]
                        continue
                    details = {"status": exc.status, "response": exc.body}
                    reason = PERMANENT_REASONS.get(type(exc), envelopes.REFUSED)
                    dead.extend(self._dead(reason, str(exc), batch, i, details, attempts=batch.attempts + 1)
                                for i in part)
                    if self.listener is not None:
                        self.listener.gave_up(account=self.account, reason=reason, status=exc.status,
                                              asset_id=batch.asset_id, events=len(part), error=str(exc))
                except BaseException:
                    self._request_done(began, None, "error", len(part), congested=False)
                    raise
                else:
                    self._request_done(began, 200, "success", len(part), congested=False)
                    self.circuit.succeeded(permit)
                    report.statuses.append(200)
                    report.delivered += len(part)

    def _screen(self, batch: UploadBatch, report: Report, dead: list[Outgoing]) -> UploadBatch:
        """The batch's valid events, marked as screened (its retries skip this); the rest dead-lettered."""
        if batch.checked:
            return batch
        found = screen(batch.events, now=self.clock.now(), naive_timestamps=self.naive_timestamps)
        for refused in found.refused:
            report.invalid += 1
            reason = envelopes.MALFORMED if refused.malformed else envelopes.INVALID
            dead.append(self._dead(reason, refused.error, batch, refused.index, refused.details,
                                   event=refused.event, raw=refused.raw))
        if batch.attempts == 0 and batch.since is None:  # stale and zone-less events: counted once
            report.stale += found.stale
            report.naive += found.naive
        return batch.part(found.valid, checked=True)

    def _request_done(self, began: float, status: int | None, outcome: str, events: int, *, congested: bool) -> None:
        self.concurrency.finished(began, congested=congested)
        if self.listener is not None:
            self.listener.request_done(account=self.account, status="error" if status is None else str(status),
                                       outcome=outcome, events=events, seconds=self.clock.monotonic() - began)

    # --- retries ------------------------------------------------------------------------------

    def retry_messages(self, retries: Sequence[_Retry], report: Report, dead: list[Outgoing]) -> list[Outgoing]:
        """Each batch to retry, to the delay queue of its wait; or, when its attempts or its
        window are spent, to ``dead`` as ``retries_exhausted``."""
        now = self.clock.now().timestamp()
        waiting: dict[str, list[UploadBatch]] = {}
        for retry in retries:
            batch = retry.batch
            attempts = batch.attempts + (1 if retry.counted else 0)
            since = batch.since if batch.since is not None else now
            gave_up = self._give_up_sentence(retry, attempts, since, now)
            if gave_up is not None:
                details = {"status": retry.status, "response": retry.body}
                dead.extend(self._dead(envelopes.RETRIES_EXHAUSTED, gave_up, batch, i, details, attempts=attempts)
                            for i in range(len(batch)))
                if self.listener is not None:
                    self.listener.gave_up(account=self.account, reason=envelopes.RETRIES_EXHAUSTED,
                                          status=retry.status, asset_id=batch.asset_id, events=len(batch),
                                          error=gave_up)
                continue
            if retry.counted:
                delay = self.policy.delay(attempts, retry.retry_after)
                report.retried += len(batch)
                logger.warning("Upload of %d events for account=%s asset_id=%s failed (%s); retry %d of %d in %.1f s",
                               len(batch), self.account, batch.asset_id, retry.error, attempts,
                               self.policy.max_retries, delay)
            else:
                delay = max(self.circuit.wait_left(batch.asset_id), retry.retry_after or 0.0, self.policy.backoff)
                report.held += len(batch)
                if retry.error != _HELD:  # a request failed, with no sign yet that the API works
                    logger.warning("Upload of %d events for account=%s asset_id=%s failed (%s), with no sign yet that "
                                   "the API works: trying again in %.1f s without spending an attempt", len(batch),
                                   self.account, batch.asset_id, retry.error, delay)
            # a Retry-After is a floor; other waits round down, so a batch the open circuit refused
            # is back in the upload queue before the probe (it waits there, not in a delay queue)
            rung = self.topology.rung_for(delay, at_least=retry.retry_after is not None)
            queue = (self.topology.upload_for(self.account) if rung is None
                     else self.topology.delay_name(rung, self.account))
            waiting.setdefault(queue, []).append(batch.part(range(len(batch)), attempts=attempts, since=since))
        messages = [
            self.retry_message(queue, bundle)
            for queue, batches in waiting.items()
            for bundle in bundles(batches, max_events=self.max_bundle_events, max_bytes=self.max_bundle_bytes,
                                  account=self.account)
        ]
        report.retry_messages += len(messages)
        return messages

    def _give_up_sentence(self, retry: _Retry, attempts: int, since: float, now: float) -> str | None:
        if retry.counted and self.policy.exhausted(attempts):
            return (f"Gave up after {attempts} failed attempts while the API accepted other uploads; the last "
                    f"failure: {retry.error}. Replay these events once the cause is fixed.")
        if self.policy.expired(since, now):
            hours = self.policy.window / 3600
            return (f"Gave up after waiting {hours:g} hours (UPLOAD_RETRY_WINDOW) for the API; the last failure: "
                    f"{retry.error}. Replay these events once the API accepts them.")
        return None

    # --- dead letters -------------------------------------------------------------------------

    def _dead(
        self, reason: str, error: str, batch: UploadBatch, index: int, details: dict[str, Any], *,
        event: Any = None, raw: str | None = None, attempts: int | None = None,
    ) -> Outgoing:
        if event is None and raw is None:
            event, problem = read_event(batch.events[index])
            if problem is not None:  # kept whole as text: the strict parser refused it
                raw = batch.events[index]
        return self.letters.event(reason, error, event=event, raw=raw, details=details, asset_id=batch.asset_id,
                                  attempts=batch.attempts if attempts is None else attempts,
                                  replays=batch.replays_of(index))


def _log(report: Report, bundle: Bundle, duration: float) -> None:
    attempt = max((b.attempts for b in bundle.batches), default=0) + 1
    what = (f"batch asset_id={report.asset_ids[0]}" if len(report.asset_ids) == 1
            else f"bundle batches={len(report.asset_ids)}")
    logger.info(
        "%s events=%d delivered=%d dead=%s retried=%d held=%d requests=%d statuses=%s attempt=%d duration=%.3fs",
        what, report.received, report.delivered, dict(report.dead) or "{}", report.retried, report.held,
        report.requests, ",".join(str(s) for s in report.statuses) or "-", attempt, duration,
    )
    if report.stale:
        logger.warning(
            "%d events are older than 24 hours: Netcore stores them but they will not trigger a journey",
            report.stale,
        )
    if report.naive:
        logger.warning(
            "%d events have a timestamp without a zone (as in Netcore's samples): forwarded as they are, read "
            "as UTC here; producers should add Z or an offset (ACTIVITY_NAIVE_TIMESTAMPS=reject refuses them)",
            report.naive,
        )

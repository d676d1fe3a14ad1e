"""The ``activities.upload`` task message: a bundle of batches, built by hand, read by the task.

A *batch* is up to 1000 events of one ``asset_id`` (one request to the API). A *bundle* is what
one task message carries: one full batch, or several small ones of different asset_ids (a tick
of a worker with 1000 asset_ids releases hundreds of 10-event batches at once; sent one per
task, each would pay for a message, a confirm, a task and an acknowledgement). The task uploads
a bundle's batches one after the other, one request in flight per task.

A bundle belongs to one Netcore account (its batches' asset_ids are that account's), named in
the message: it travels in that account's upload queue. Each batch carries what its retries
need: ``attempts`` (failed attempts that counted), ``since`` (unix time of its first failure:
the retry window starts there, and its failures count once the account accepted another upload
after it, :mod:`worker.upload.circuit`), ``replays``
(per event, how often it was replayed from the dead-letter queue, so that its next dead letter
says so) and ``checked`` (every event was already parsed strictly and found valid by
:mod:`worker.events.screening`, so a retry uploads them without doing it again; a message without
it, from an older worker, is screened as usual). Events are the JSON texts they arrived as,
forwarded to the API unchanged.

The message is built here rather than with Celery's ``apply_async``, so that the consumer can
publish many at once with grouped confirms. Flower shows ``argsrepr``: a summary, never events.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu.serialization import register

from worker.broker.publisher import Outgoing
from worker.events import jsonutil

#: The task that uploads one bundle.
UPLOAD_TASK = "activities.upload"

#: The task Celery producers call; its messages are consumed by the ingest step.
INGEST_TASK = "activities.ingest"

#: The content type of upload-task bodies: JSON, read with orjson. Celery's main loop decodes
#: every task body it receives; a 600 KB bundle through the standard json costs milliseconds.
BATCH_CONTENT_TYPE = "application/x-netcore-batch+json"

register("netcore-batch", jsonutil.dumps, jsonutil.loads, content_type=BATCH_CONTENT_TYPE, content_encoding="binary")

#: The most batches one bundle carries: one task uploads them one after the other, so this
#: bounds how long its message stays unacknowledged (a request each, plus bisection).
MAX_BATCHES_PER_BUNDLE = 20

#: Seconds of round trips one bundle should take, uploaded batch after batch: its task message
#: is unacknowledged meanwhile, and a SIGKILL duplicates the batches it already uploaded. One
#: real API round trip: against it a task carries one batch, and a kill duplicates little more
#: than the requests in flight; against a fast API many small batches share a task, whose own
#: cost (a message, a confirm, a task) is what matters there.
BUNDLE_SECONDS = 0.15


#: The round trip assumed before the first request has measured one: the real API's, across
#: the internet (the worker's first thousands of events are bundled before any upload ends).
ASSUMED_ROUND_TRIP = 0.15


def batches_per_bundle(round_trip: float | None) -> int:
    """How many batches one bundle carries when a request takes ``round_trip`` seconds (None:
    not measured yet, :data:`ASSUMED_ROUND_TRIP`): about :data:`BUNDLE_SECONDS` worth, 1 to
    :data:`MAX_BATCHES_PER_BUNDLE`. A fast API takes many small batches per task (fewer tasks);
    a slow one, a few."""
    if round_trip is None:
        round_trip = ASSUMED_ROUND_TRIP
    if round_trip <= 0:
        return MAX_BATCHES_PER_BUNDLE
    return max(1, min(MAX_BATCHES_PER_BUNDLE, int(BUNDLE_SECONDS / round_trip + 1e-9)))

#: Asset ids named in a bundle's summary (Flower, logs); more are counted.
SUMMARY_ASSETS = 3


@dataclass
class UploadBatch:
    """One batch as it travels in an upload task (see the module docstring)."""

    asset_id: str
    events: list[str]
    attempts: int = 0
    since: float | None = None
    replays: list[int] | None = None
    #: Names the batch across its retries (logs follow one batch through them).
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    #: Every event was screened and found valid (under the first worker's ACTIVITY_NAIVE_TIMESTAMPS).
    checked: bool = False

    def __len__(self) -> int:
        return len(self.events)

    def replays_of(self, index: int) -> int:
        return self.replays[index] if self.replays is not None and index < len(self.replays) else 0

    def part(self, indexes: Iterable[int], *, attempts: int | None = None, since: float | None = None,
             checked: bool | None = None) -> UploadBatch:
        """The events at ``indexes`` (with their replay counts), as a batch of their own."""
        indexes = list(indexes)
        replays = [self.replays_of(i) for i in indexes] if self.replays is not None else None
        return UploadBatch(self.asset_id, [self.events[i] for i in indexes],
                           self.attempts if attempts is None else attempts,
                           self.since if since is None else since,
                           replays if replays and any(replays) else None, self.id,
                           self.checked if checked is None else checked)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"asset_id": self.asset_id, "events": self.events, "attempts": self.attempts,
                                "id": self.id}
        if self.since is not None:
            wire["since"] = self.since
        if self.replays is not None and any(self.replays):
            wire["replays"] = self.replays
        if self.checked:
            wire["checked"] = True
        return wire


@dataclass
class Bundle:
    """What one upload task carries: batches of one account (None: an older worker's message,
    routed by its asset_ids)."""

    batches: list[UploadBatch] = field(default_factory=list)
    account: str | None = None

    @property
    def events(self) -> int:
        return sum(len(b) for b in self.batches)

    def summary(self) -> str:
        """``account='a', asset_id='x', 1000 events`` or ``account='a', 3 batches, 51 events: 'x', 'y',
        'z'``: never events."""
        attempt = max((b.attempts for b in self.batches), default=0)
        if len(self.batches) == 1:
            text = f"asset_id={self.batches[0].asset_id!r}, {self.events} events"
        else:
            names = ", ".join(repr(b.asset_id) for b in self.batches[:SUMMARY_ASSETS])
            more = len(self.batches) - SUMMARY_ASSETS
            text = f"{len(self.batches)} batches, {self.events} events: {names}{f' (+{more})' if more > 0 else ''}"
        account = f"account={self.account!r}, " if self.account else ""
        return account + text + (f", attempt {attempt + 1}" if attempt else "")


def read_bundle(args: Sequence[Any]) -> Bundle:
    """The bundle of a task's arguments: ``[[batch, ...], account]``, an older worker's
    ``[[batch, ...]]`` (no account) or ``[asset_id, events, attempts]`` (one batch), so that a
    rolling deploy loses nothing.

    Raises ValueError (with a sentence) when they are none of these.
    """
    if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], list):
        attempts = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        return Bundle([UploadBatch(args[0], list(args[1]), attempts)])
    account = args[1] if len(args) == 2 and isinstance(args[1], str) and args[1] else None
    if len(args) not in (1, 2) or not isinstance(args[0], list) or (len(args) == 2 and account is None):
        raise ValueError("an upload task takes a list of batches and the name of their account")
    batches = []
    for wire in args[0]:
        if not isinstance(wire, dict) or not isinstance(wire.get("asset_id"), str) or not isinstance(
                wire.get("events"), list):
            raise ValueError("a batch is an object with an asset_id (string) and events (list)")
        replays = wire.get("replays")
        since = float(wire["since"]) if isinstance(wire.get("since"), (int, float)) else None
        replayed = [int(r) for r in replays] if isinstance(replays, list) else None
        name = wire.get("id")
        batch = (UploadBatch(wire["asset_id"], wire["events"], int(wire.get("attempts") or 0), since, replayed, name)
                 if isinstance(name, str) else
                 UploadBatch(wire["asset_id"], wire["events"], int(wire.get("attempts") or 0), since, replayed))
        batch.checked = wire.get("checked") is True
        batches.append(batch)
    return Bundle(batches, account)


def bundles(batches: Iterable[UploadBatch], *, max_events: int, max_bytes: int,
            size: Any = None, max_batches: int = MAX_BATCHES_PER_BUNDLE, account: str | None = None) -> Iterator[Bundle]:
    """Group batches (of ``account``) into bundles of at most ``max_events`` events, ``max_bytes``
    bytes (as measured by ``size(batch)``, else the events' lengths) and ``max_batches`` batches."""
    current = Bundle(account=account)
    events = nbytes = 0
    for batch in batches:
        batch_bytes = size(batch) if size is not None else sum(len(e) + 1 for e in batch.events)
        if current.batches and (events + len(batch) > max_events or nbytes + batch_bytes > max_bytes
                                or len(current.batches) >= max_batches):
            yield current
            current, events, nbytes = Bundle(account=account), 0, 0
        current.batches.append(batch)
        events += len(batch)
        nbytes += batch_bytes
    if current.batches:
        yield current


def upload_message(app: Celery, queue: str, bundle: Bundle) -> Outgoing:
    """An ``activities.upload`` task message carrying ``bundle``, addressed to ``queue`` (the
    upload queue, or a delay queue that hands it to the upload queue later)."""
    task_id = str(uuid.uuid4())
    wire: list[Any] = [[batch.to_wire() for batch in bundle.batches]]
    if bundle.account:
        wire.append(bundle.account)
    task = app.amqp.as_task_v2(
        task_id,
        UPLOAD_TASK,
        args=wire,
        kwargs={},
        retries=max((b.attempts for b in bundle.batches), default=0),
        argsrepr=bundle.summary(),
        kwargsrepr="{}",
    )
    headers = {key: value for key, value in task.headers.items() if value is not None}
    return Outgoing(
        queue, jsonutil.dumps(task.body), headers, BATCH_CONTENT_TYPE, dict(task.properties), content_encoding="binary"
    )

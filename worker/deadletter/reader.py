"""Reading and selecting dead letters, for the commands of :mod:`worker.deadletter.cli`.

:class:`Reader` fetches the dead-letter queue's messages with ``basic_get`` and holds every
one unacknowledged on its channel until it closes: closing (or a crash) hands each back to its
place in the queue. What a command removes, it acknowledges itself, by delivery tag.
:class:`Letters` turns those messages into the dead letters a person means: one envelope, or
every part of one large body (:mod:`worker.deadletter.envelopes`), counted, selected, replayed and
purged together. :class:`Selection` says which dead letters a command acts on (reason,
asset_id, time range of ``failed_at``), :func:`replayable` which of them replay can publish,
:class:`Counts` tallies them and :class:`Progress` reports long runs.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

import amqp
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from config.settings import Settings
from worker.broker.connection import connect
from worker.deadletter import envelopes
from worker.errors import DeadLetterError, NoDeadLetterQueue
from worker.events import jsonutil

logger = logging.getLogger(__name__)

#: The reason shown for a message of the dead-letter queue that is not a JSON envelope.
UNREADABLE = "unreadable"

#: How ``count`` shows dead letters without an ``asset_id`` (unparseable bodies).
NO_ASSET = "(none)"

#: The asset_ids ``count`` shows in its tables (the largest counts); ``--json`` has them all.
TOP_ASSETS = 20

#: Dead letters read between two progress lines.
PROGRESS_EVERY = 1000

Envelope = dict[str, Any]


def parse_when(text: str) -> datetime:
    """An ISO-8601 date-time with ``Z`` or an offset (or a date alone: 00:00 UTC), as UTC.

    A date-time without an offset is refused rather than guessed: the same text means
    different instants on an operator's laptop and on the broker's host.
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 date-time (2024-05-01T12:00:00Z)") from None
    if when.tzinfo is None:
        if "T" in text or " " in text.strip():
            raise ValueError(f"{text!r} has no offset: add Z (UTC) or one such as +05:30")
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def failed_at(envelope: Envelope) -> datetime | None:
    """When the dead letter was written (UTC), or None if its ``failed_at`` is not a date-time."""
    value = envelope.get("failed_at")
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on; every criterion given must hold (none: all).

    The time range is on ``failed_at``, ``since`` included and ``until`` excluded, so that
    consecutive ranges never select a dead letter twice. A dead letter whose ``failed_at``
    cannot be read is outside every time range.
    """

    reasons: frozenset[str] = frozenset()
    asset_ids: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def of(
        cls, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (), since: datetime | None = None,
        until: datetime | None = None,
    ) -> Selection:
        return cls(frozenset(reasons), frozenset(asset_ids), since, until)

    def matches(self, envelope: Envelope) -> bool:
        if self.reasons and envelope.get("reason") not in self.reasons:
            return False
        if self.asset_ids and envelope.get("asset_id") not in self.asset_ids:
            return False
        if self.since is None and self.until is None:
            return True
        when = failed_at(envelope)
        return when is not None and (self.since is None or when >= self.since) and (
            self.until is None or when < self.until
        )


def replays_of(envelope: Envelope) -> int:
    """How many times this dead letter's event had been replayed before it died (0 if unknown)."""
    value = envelope.get("replays")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass
class Counts:
    """How many dead letters there are, by reason, by asset_id and by both."""

    total: int = 0
    #: What replay would leave: see :func:`replayable`.
    not_replayable: int = 0
    #: Dead letters whose event had been replayed before (``replays`` > 0): a loop, maybe.
    replayed: int = 0
    #: Bodies in parts with a part missing (in the queue, one might still be on its way).
    incomplete: int = 0
    #: Dead letters read, selected or not.
    scanned: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_asset_id: Counter[str] = field(default_factory=Counter)
    by_reason_and_asset_id: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, letter: Letter) -> None:
        envelope = letter.envelope
        reason, asset_id = str(envelope.get("reason")), str(envelope.get("asset_id") or NO_ASSET)
        self.total += 1
        self.not_replayable += not replayable(letter)
        self.incomplete += not letter.complete
        self.replayed += replays_of(envelope) > 0
        self.by_reason[reason] += 1
        self.by_asset_id[asset_id] += 1
        self.by_reason_and_asset_id[reason, asset_id] += 1

    def as_dict(self) -> dict[str, Any]:
        both: dict[str, dict[str, int]] = {}
        for (reason, asset_id), number in self.by_reason_and_asset_id.most_common():
            both.setdefault(reason, {})[asset_id] = number
        return {"total": self.total, "not_replayable": self.not_replayable, "replayed": self.replayed,
                "incomplete": self.incomplete, "scanned": self.scanned,
                "by_reason": dict(self.by_reason.most_common()),
                "by_asset_id": dict(self.by_asset_id.most_common()), "by_reason_and_asset_id": both}

    def table(self, top: int = TOP_ASSETS) -> str:
        """Small text tables, largest counts first, at most ``top`` asset_ids in each."""
        of = f" of {self.scanned} in the queue" if self.scanned > self.total else ""
        lines = [f"dead letters: {self.total}{of} (not replayable: {self.not_replayable})"]
        if not self.total:
            return lines[0]
        lines.append(f"replayed before and dead again: {self.replayed}")
        if self.incomplete:
            lines.append(f"bodies in parts with a part missing: {self.incomplete}")
        assets = [asset_id for asset_id, _ in self.by_asset_id.most_common(top)]
        more = len(self.by_asset_id) - len(assets)
        for title, counter in (("reason", self.by_reason), ("asset_id", self.by_asset_id)):
            shown = [(key, counter[key]) for key in (assets if title == "asset_id" else counter)]
            width = max([len(title), *(len(key) for key, _ in shown)])
            lines += ["", f"{title:<{width}}  count"]
            lines += [f"{key:<{width}}  {value:>5}" for key, value in shown]
        if len(self.by_reason) > 1 and assets:
            lines += ["", *self._cross_table(assets)]
        if more > 0:
            lines.append(f"(and {more} more asset_ids: --json lists them all)")
        return "\n".join(lines)

    def _cross_table(self, assets: list[str]) -> list[str]:
        """asset_id down, reason across: which producer fails, and how."""
        reasons = [reason for reason, _ in self.by_reason.most_common()]
        first = max(len("asset_id"), *map(len, assets))
        widths = [max(5, len(reason)) for reason in reasons]
        header = "  ".join([f"{'asset_id':<{first}}", *(f"{r:>{w}}" for r, w in zip(reasons, widths))])
        rows = [header]
        for asset_id in assets:
            cells = [self.by_reason_and_asset_id[reason, asset_id] for reason in reasons]
            rows.append("  ".join([f"{asset_id:<{first}}",
                                   *(f"{n or '.':>{w}}" for n, w in zip(cells, widths))]))
        return rows


class Progress:
    """A progress line on ``stream`` every ``every`` dead letters read, for long runs.

    On a terminal the line is rewritten in place; elsewhere (a log file) each is a line of
    its own.
    """

    def __init__(self, command: str, done: str, *, every: int = PROGRESS_EVERY, stream: TextIO | None = None) -> None:
        self.command, self.done, self.every = command, done, every
        self.stream = stream or sys.stderr
        self.in_place = self.stream.isatty()
        self._shown = False

    def update(self, read: int, total: int, done: int, *, final: bool = False) -> None:
        if not final and (read == 0 or read % self.every):
            return
        if final and not self._shown:
            return  # a short run: its report says it all
        share = f" ({100 * read // total}%)" if total else ""
        line = f"{self.command}: read {read} of {total}{share}, {self.done} {done}"
        end = "\n" if final or not self.in_place else ""
        self.stream.write(f"\r{line}\033[K{end}" if self.in_place else f"{line}{end}")
        self.stream.flush()
        self._shown = True


class Reader:
    """One channel that holds every dead letter it read, unacknowledged, until it closes.

    Holding them, rather than rejecting each, is what keeps a pass finite and lossless: a
    rejected message would come straight back to the head of the queue and be read again.
    A pass reads at most the messages present at its start (``start_count``), so events
    that die again while it runs are not replayed again by the same run. Delivery tags
    start at 1 on the fresh channel and grow by one per message read (``read``).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue = settings.dead_letter_queue
        self.start_count = 0
        self.read = 0
        #: Every tag below it is acknowledged; :attr:`_acked` holds those acknowledged above it.
        self._floor = 1
        self._acked: set[int] = set()
        self._connection: Connection | None = None

    def __enter__(self) -> Reader:
        where = self.settings.broker_url_redacted
        try:
            self._connection = connect(self.settings.broker_url, retries=2, ssl=self.settings.broker_ssl())
        except (OperationalError, OSError) as exc:
            raise DeadLetterError(f"cannot reach the broker at {where}: {exc}") from None
        connection = self._connection
        try:
            self.channel: amqp.Channel = connection.channel()
            # passive: reading must not create the queue (a typo in its name would look empty)
            _, self.start_count, _ = self.channel.queue_declare(self.queue, durable=True, passive=True)
        except amqp.exceptions.NotFound:
            connection.release()
            raise NoDeadLetterQueue(
                f"no dead letters yet: there is no queue {self.queue!r} on {where}. The worker creates it "
                "when it starts; if a worker has run against this broker, check ACTIVITY_DEAD_LETTER_QUEUE "
                "for a typo."
            ) from None
        except (OperationalError, OSError) as exc:
            connection.release()
            raise DeadLetterError(f"cannot reach the broker at {where}: {exc}") from None
        logger.info("%d dead letters in %s on %s", self.start_count, self.queue, where)
        return self

    def __iter__(self) -> Iterator[tuple[int, Envelope]]:
        while self.read < self.start_count:
            message = self.channel.basic_get(self.queue, no_ack=False)
            if message is None:
                return
            self.read += 1
            yield message.delivery_tag, envelope_of(message.body)

    def ack(self, delivery_tags: Collection[int]) -> None:
        """Acknowledge these messages, read and not yet acknowledged.

        One frame with ``multiple`` covers the run of them from the oldest message still
        held, as long as it holds no other (``multiple`` would take that one too); the rest
        go one frame each.
        """
        tags = set(delivery_tags)
        run_end, tag = 0, self._floor
        while tag <= self.read and (tag in tags or tag in self._acked):
            run_end = tag if tag in tags else run_end
            tag += 1
        if run_end:
            self.channel.basic_ack(run_end, multiple=True)
        for delivery_tag in sorted(tags):
            if delivery_tag > run_end:
                self.channel.basic_ack(delivery_tag)
        self._acked |= tags
        while self._floor in self._acked:
            self._acked.discard(self._floor)
            self._floor += 1

    def __exit__(self, *exc_info: object) -> None:
        """Close the channel: every message read and not acknowledged goes back to the queue.

        The broker handles a channel's frames in order, so once the close is answered every
        acknowledgement sent before it has taken effect.
        """
        try:
            if self.channel.is_open:
                self.channel.close()
        except Exception:  # a broken connection: the broker has put them back already
            pass
        if self._connection is not None:
            self._connection.release()


def envelope_of(body: bytes | str) -> Envelope:
    """The envelope of a dead letter; a stand-in (not replayable) if its body is not one,
    keeping that body as an envelope would (``raw``, and ``raw_base64`` if it is not UTF-8)."""
    try:
        value = jsonutil.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    return {"reason": UNREADABLE, "error": "this dead letter is not a JSON envelope", "event": None,
            **envelopes.raw_fields(body)}


@dataclass
class Letter:
    """One dead letter as a person means it: one envelope, or every part of one body.

    The parts of a body share its reason, asset_id and ``failed_at``, so a selection takes
    all of them or none; ``envelope`` (the first part) stands for them. ``complete`` is
    False when a part is missing from the pass (or a ``part`` makes no sense).
    """

    envelopes: list[Envelope]
    delivery_tags: list[int]
    complete: bool = True
    _body: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def envelope(self) -> Envelope:
        return self.envelopes[0]

    def body(self) -> bytes | None:
        """The body it keeps, exactly (parts joined); None if it keeps none, or not all of it."""
        if self._body is None and self.complete:
            try:
                self._body = (envelopes.join(self.envelopes) if envelopes.part_of(self.envelope)
                              else envelopes.raw_body(self.envelope))
            except ValueError:
                self.complete = False
        return self._body


class Letters:
    """The dead letters of a :class:`Reader`'s pass: each envelope alone, except parts.

    The parts of one body come out as one :class:`Letter` once all are read, in whatever
    order (a part read twice, as a publisher's retry can leave it, is taken once and
    acknowledged with the rest). Those still missing a part when the pass ends come out last,
    incomplete: the command counts them, and leaves them in the queue.
    """

    def __init__(self, messages: Iterable[tuple[int, Envelope]]) -> None:
        self.messages = messages
        #: Letters given out so far.
        self.given = 0
        #: Bodies whose parts are still being gathered, by part id: the letter, its part numbers.
        self.gathering: dict[str, tuple[Letter, set[int]]] = {}

    @property
    def seen(self) -> int:
        """Dead letters met so far, given out or still gathering parts."""
        return self.given + len(self.gathering)

    def __iter__(self) -> Iterator[Letter]:
        for delivery_tag, envelope in self.messages:
            part = envelopes.part_of(envelope)
            if part is None:
                yield self._give(Letter([envelope], [delivery_tag], complete="part" not in envelope))
                continue
            letter, numbers = self.gathering.setdefault(part.id, (Letter([], [], complete=False), set()))
            letter.delivery_tags.append(delivery_tag)
            if part.number not in numbers:
                numbers.add(part.number)
                letter.envelopes.append(envelope)
            if len(numbers) == part.count:
                del self.gathering[part.id]
                letter.envelopes.sort(key=lambda e: e["part"]["number"])
                letter.complete = True
                yield self._give(letter)
        for part_id in list(self.gathering):  # in the order they were first met
            letter, _ = self.gathering.pop(part_id)
            letter.envelopes.sort(key=lambda e: e["part"]["number"])
            yield self._give(letter)

    def _give(self, letter: Letter) -> Letter:
        self.given += 1
        return letter


def replayable(letter: Letter) -> bool:
    """Can replay publish this dead letter? The one rule that replay, its dry run and
    ``count``'s "not replayable" share.

    Only a JSON object can be an event: an array item such as ``7`` (dead-lettered
    ``invalid``) would come back as a body that is not one, ``malformed`` for good, so it
    stays. A ``poison`` message is published again as the very bytes it was, once every part
    of it is here, and so is a producer's message a bug set aside (``unhandled``). A
    ``malformed`` body holds no events: it is there to be fixed by hand.
    """
    if envelopes.replays_body(letter.envelope):
        return letter.body() is not None
    return isinstance(letter.envelope.get("event"), dict)

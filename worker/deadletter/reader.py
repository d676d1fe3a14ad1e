"""Reading and selecting dead letters, for the commands of :mod:`worker.deadletter.cli`.

:class:`Reader` fetches the dead-letter queue's messages with ``basic_get`` and holds every
one unacknowledged on its channel until it is done: then it hands each back to the queue (a
crash does too, when the channel dies). What a command removes, it acknowledges itself, by
delivery tag. It starts only once no other client holds dead letters, and ends only once the
queue shows again what it handed back (:mod:`worker.deadletter.handback` says why: a quorum
queue puts them back only after answering the close).
:class:`Letters` turns those messages into the dead letters a person means: one envelope, or
every part of one large body (:mod:`worker.deadletter.envelopes`), counted, selected, replayed and
purged together. :class:`Selection` says which dead letters a command acts on (reason,
asset_id, account, time range of ``failed_at``), :func:`replayable` which of them replay can
publish, and :class:`Progress` reports long runs (:mod:`worker.deadletter.counting` tallies them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

import amqp
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from config.accounts import DEFAULT
from config.settings import Settings
from worker.broker.connection import connect
from worker.deadletter import envelopes, handback
from worker.errors import DeadLetterError, NoDeadLetterQueue
from worker.events import jsonutil

logger = logging.getLogger(__name__)

#: The reason shown for a message of the dead-letter queue that is not a JSON envelope.
UNREADABLE = "unreadable"

#: The account of the dead letters written before the worker had several (they carry no
#: ``account``): the single account of the settings, ``default`` (config.accounts).
DEFAULT_ACCOUNT = DEFAULT

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


def account_of(envelope: Envelope) -> str:
    """The Netcore account a dead letter was for: its ``account``, or :data:`DEFAULT_ACCOUNT`
    when it has none (written before the worker had several accounts)."""
    value = envelope.get(envelopes.ACCOUNT)
    return DEFAULT_ACCOUNT if value is None else str(value)


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on; every criterion given must hold (none: all).

    The time range is on ``failed_at``, ``since`` included and ``until`` excluded, so that
    consecutive ranges never select a dead letter twice. A dead letter whose ``failed_at``
    cannot be read is outside every time range. The account is :func:`account_of`.
    """

    reasons: frozenset[str] = frozenset()
    asset_ids: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    accounts: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (), since: datetime | None = None,
        until: datetime | None = None, accounts: Collection[str] = (),
    ) -> Selection:
        return cls(frozenset(reasons), frozenset(asset_ids), since, until, frozenset(accounts))

    def matches(self, envelope: Envelope) -> bool:
        if self.reasons and envelope.get("reason") not in self.reasons:
            return False
        if self.asset_ids and envelope.get("asset_id") not in self.asset_ids:
            return False
        if self.accounts and account_of(envelope) not in self.accounts:
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
    """One channel that holds every dead letter it read, unacknowledged, until it is done.

    Holding them, rather than rejecting each, is what keeps a pass finite and lossless: a
    rejected message would come straight back to the head of the queue and be read again.
    A pass reads at most the messages present at its start (``start_count``), so events
    that die again while it runs are not replayed again by the same run. Delivery tags
    start at 1 on the fresh channel and grow by one per message read (``read``).
    ``other_consumers``: consumers of the queue still there when the pass started (see
    :func:`~worker.deadletter.handback.wait_until_unheld`): what they hold, it cannot read.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue = settings.dead_letter_queue
        self.start_count = 0
        self.other_consumers = 0
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
            self.start_count, self.other_consumers = handback.wait_until_unheld(self.channel, self.queue)
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

    @property
    def held(self) -> int:
        """Messages read and not acknowledged."""
        return self.read - (self._floor - 1) - len(self._acked)

    def __exit__(self, *exc_info: object) -> None:
        """Hand back every message read and not acknowledged, wait until the queue shows them
        (:func:`~worker.deadletter.handback.hand_back`), and close the channel.

        The broker handles a channel's frames in order, so the acknowledgements sent before
        the hand-back have taken effect on the channel first.
        """
        try:
            if self.channel.is_open and self.held:
                handback.hand_back(self.channel, self.queue, last_tag=self.read, held=self.held)
            if self.channel.is_open:
                self.channel.close()
        except Exception:  # a broken connection: the broker puts them back itself
            pass
        finally:
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
    of it is here, and so is a producer's message a bug set aside (``unhandled``), and another
    application's message (``unhandled``, to the queue it came from, with its headers). A
    ``malformed`` body holds no events: it is there to be fixed by hand.
    """
    if envelopes.replays_body(letter.envelope) or envelopes.original_of(letter.envelope) is not None:
        return letter.body() is not None
    return isinstance(letter.envelope.get("event"), dict)

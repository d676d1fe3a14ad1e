"""The dead-letter commands as functions: count, read, replay and purge (:mod:`worker.deadletter.cli` runs them).

Each reads the dead-letter queue through one :class:`~worker.deadletter.reader.Reader`, which holds
every dead letter it read unacknowledged until it hands them back, and takes the parts of a
large body as one dead letter (:class:`~worker.deadletter.reader.Letters`). Each removes a dead letter
only by acknowledging it (every part of it), and only once what replaces it (a replayed event
or body) is confirmed by the broker, or once the operator confirmed its removal (purge). Raises
:class:`~worker.deadletter.reader.NoDeadLetterQueue` when there is no dead-letter queue yet. See
:mod:`worker.deadletter.cli`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from config.settings import Settings
from worker.broker.headers import REPLAYS_HEADER  # on replayed events; it travels with them to their next dead letter
from worker.broker.publisher import Outgoing, Publisher
from worker.broker.topology import Topology
from worker.deadletter import envelopes
from worker.deadletter.counting import Counts
from worker.deadletter.handback import held_elsewhere
from worker.deadletter.reader import (
    Envelope,
    Letter,
    Letters,
    Progress,
    Reader,
    Selection,
    replayable,
    replays_of,
)
from worker.events import jsonutil

logger = logging.getLogger(__name__)

#: Dead letters replayed per publish-confirm round trip; their acks follow the confirm.
GROUP_SIZE = 500

#: Bytes of replayed bodies past which a group is published before it is full: poison
#: bodies can be large, and a group is held in memory until the broker confirms it.
GROUP_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did (or, with ``dry_run``, would do) to the dead letters present at its start."""

    replayed: int
    left: int
    not_replayable: int
    dry_run: bool = False
    #: Consumers of the queue that still held dead letters when it started (see :class:`Reader`).
    other_consumers: int = 0

    def __str__(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        return (f"{verb} {self.replayed}, left {self.left}, not replayable {self.not_replayable}"
                f"{held_elsewhere(self.other_consumers, 'read')}")


@dataclass(frozen=True)
class PurgeReport:
    """What a purge removed (or, with ``dry_run`` or without confirmation, would remove)."""

    purged: int
    selected: int
    left: int
    dry_run: bool = False
    #: False when the operator did not confirm (nothing was removed); True for a dry run.
    confirmed: bool = True
    #: Consumers of the queue that still held dead letters when it started (see :class:`Reader`).
    other_consumers: int = 0

    def __str__(self) -> str:
        if self.dry_run:
            done = f"would purge {self.selected}, left {self.left}"
        elif not self.confirmed:
            done = f"not confirmed: purged 0 of {self.selected}, left {self.left}"
        else:
            done = f"purged {self.purged}, left {self.left}"
        return done + held_elsewhere(self.other_consumers, "read")


def count(
    settings: Settings, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (),
    since: datetime | None = None, until: datetime | None = None, accounts: Collection[str] = (),
) -> Counts:
    """Count the matching dead letters (all by default) by reason, asset_id and account, leaving every
    one in the queue. A body in parts counts once."""
    selection = Selection.of(reasons=reasons, asset_ids=asset_ids, since=since, until=until, accounts=accounts)
    counts = Counts()
    with Reader(settings) as reader:
        counts.other_consumers = reader.other_consumers
        for letter in Letters(reader):
            counts.scanned += 1
            if selection.matches(letter.envelope):
                counts.add(letter)
    return counts


def read(
    settings: Settings, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (),
    since: datetime | None = None, until: datetime | None = None, accounts: Collection[str] = (),
    limit: int | None = None,
) -> list[Envelope]:
    """The envelopes that match the filters (all of them by default), in queue order, left in place.

    Every part of a body in parts is listed (together, in order: :func:`worker.deadletter.join`
    puts them back together); ``limit`` counts such a body once.
    """
    selection = Selection.of(reasons=reasons, asset_ids=asset_ids, since=since, until=until, accounts=accounts)
    found: list[Envelope] = []
    chosen = 0
    with Reader(settings) as reader:
        for letter in Letters(reader):
            if limit is not None and chosen >= limit:
                break
            if selection.matches(letter.envelope):
                found += letter.envelopes
                chosen += 1
    return found


def replay(
    settings: Settings, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (),
    since: datetime | None = None, until: datetime | None = None, accounts: Collection[str] = (),
    limit: int | None = None, dry_run: bool = False, group_size: int = GROUP_SIZE, publisher_class: type[Publisher] = Publisher,
    on_replay: Callable[[Envelope], None] | None = None, progress: Progress | None = None,
) -> ReplayReport:
    """Publish the selected dead letters to ``settings.queue`` as producers send them, then acknowledge them.

    What is published: an event, alone, as JSON; a ``poison`` message's body, byte for byte
    (its parts joined); another application's message back to the queue it came from, with its
    headers and properties (set aside as ``unhandled``: replay it once its routing is fixed).
    Nothing else is replayable (:func:`~worker.deadletter.reader.replayable`).
    Each group is published and confirmed before any of its dead letters is acknowledged,
    so an error (raised to the caller) or a crash leaves each event in ``activities``, in the
    dead-letter queue, or both. ``on_replay`` sees each envelope replayed (every part).
    """
    selection = Selection.of(reasons=reasons, asset_ids=asset_ids, since=since, until=until, accounts=accounts)
    replayed = not_replayable = group_bytes = 0
    group: list[tuple[list[int], Outgoing]] = []
    publisher = None if dry_run else publisher_class(settings.broker_url, declare=[Topology.of(settings).source_queue()])

    def flush(reader: Reader) -> None:
        nonlocal replayed, group_bytes
        if not group or publisher is None:
            return
        publisher.publish([outgoing for _, outgoing in group])
        reader.ack([tag for tags, _ in group for tag in tags])
        replayed += len(group)
        logger.debug("Replayed %d dead letters to %s (%d in all)", len(group), settings.queue, replayed)
        group.clear()
        group_bytes = 0

    try:
        with Reader(settings) as reader:
            letters = Letters(reader)
            for letter in letters:
                if limit is not None and replayed + len(group) >= limit:
                    break  # left unacknowledged: the reader hands it back
                if progress is not None:
                    progress.update(reader.read, reader.start_count, replayed + len(group))
                if not selection.matches(letter.envelope):
                    continue
                if not replayable(letter):
                    not_replayable += 1
                    continue
                if on_replay is not None:
                    for envelope in letter.envelopes:
                        on_replay(envelope)
                if dry_run:
                    replayed += 1
                    continue
                outgoing = _replayed(settings.queue, letter)
                group.append((letter.delivery_tags, outgoing))
                group_bytes += len(outgoing.body)
                if len(group) >= group_size or group_bytes >= GROUP_BYTES:
                    flush(reader)
            flush(reader)
            left = letters.seen - replayed + reader.start_count - reader.read
            if progress is not None:
                progress.update(reader.read, reader.start_count, replayed, final=True)
    finally:
        if publisher is not None:
            publisher.close()
    logger.info("%s %d dead letters to %s", "Would replay" if dry_run else "Replayed", replayed, settings.queue)
    return ReplayReport(replayed, left, not_replayable, dry_run, reader.other_consumers)


def _replayed(queue: str, letter: Letter) -> Outgoing:
    """The message that replays a (replayable) dead letter, counting the replay in ``x-replays``:
    to ``queue``, or, for another application's message, back to the queue it came from, as it was."""
    headers = {REPLAYS_HEADER: replays_of(letter.envelope) + 1}
    original = envelopes.original_of(letter.envelope)
    if original is not None:
        body = letter.body()
        assert body is not None  # replayable
        properties = dict(original.properties)
        content_type = properties.pop("content_type", "") or ""
        content_encoding = properties.pop("content_encoding", None)
        return Outgoing(original.queue, body, {**original.headers, **headers}, content_type, properties,
                        content_encoding=content_encoding)
    if envelopes.replays_body(letter.envelope):
        body = letter.body()
        assert body is not None  # replayable
        return Outgoing(queue, body, headers, content_encoding=None)  # the bytes it was: not re-encoded
    return Outgoing(queue, jsonutil.dumps(letter.envelope["event"]), headers)  # what a producer sends


def purge(
    settings: Settings, *, confirm: Callable[[int], bool], reasons: Collection[str] = (),
    asset_ids: Collection[str] = (), since: datetime | None = None, until: datetime | None = None,
    accounts: Collection[str] = (), limit: int | None = None, dry_run: bool = False, progress: Progress | None = None,
) -> PurgeReport:
    """Remove the selected dead letters (a body in parts: all its parts), once ``confirm(how_many)`` said yes.

    Every dead letter read is held unacknowledged on one channel while ``confirm`` runs, so
    what is confirmed is exactly what goes (dead letters arriving meanwhile are not read).
    Then only the selected ones are acknowledged; the reader hands the others back to
    the queue untouched. Interrupted at any moment, a purge removes nothing but selected
    dead letters, and a selected one it did not acknowledge stays.
    """
    selection = Selection.of(reasons=reasons, asset_ids=asset_ids, since=since, until=until, accounts=accounts)
    chosen: list[int] = []
    selected = 0
    with Reader(settings) as reader:
        letters = Letters(reader)
        for letter in letters:
            if limit is not None and selected >= limit:
                break
            if progress is not None:
                progress.update(reader.read, reader.start_count, selected)
            if selection.matches(letter.envelope):
                chosen += letter.delivery_tags
                selected += 1
        if progress is not None:
            progress.update(reader.read, reader.start_count, selected, final=True)
        present = letters.seen + reader.start_count - reader.read
        others = reader.other_consumers
        if dry_run:
            return PurgeReport(0, selected, present - selected, dry_run=True, other_consumers=others)
        if not selected or not confirm(selected):
            return PurgeReport(0, selected, present, confirmed=not selected, other_consumers=others)
        reader.ack(chosen)
    logger.warning("Purged %d dead letters from %s", selected, settings.dead_letter_queue)
    return PurgeReport(selected, selected, present - selected, other_consumers=others)

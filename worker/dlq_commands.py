"""The dead-letter commands as functions: count, read, replay and purge (:mod:`worker.dlq` runs them).

Each reads the dead-letter queue through one :class:`~worker.dlq_select.Reader`, which holds
every dead letter it read unacknowledged until its channel closes; each removes a dead letter
only by acknowledging it, and only once what replaces it (a replayed event) is confirmed by the
broker, or once the operator confirmed its removal (purge). See :mod:`worker.dlq`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from config.settings import Settings
from worker import jsonutil
from worker.dlq_select import Counts, Envelope, Progress, Reader, Selection, replays_of
from worker.ingest import REPLAYS_HEADER  # on replayed events; the consumer copies it into their dead letters
from worker.publisher import Outgoing, Publisher
from worker.broker.topology import Topology

logger = logging.getLogger(__name__)

#: Dead letters replayed per publish-confirm round trip; their acks follow the confirm.
GROUP_SIZE = 500


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did (or, with ``dry_run``, would do) to the dead letters present at its start."""

    replayed: int
    left: int
    not_replayable: int
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        return f"{verb} {self.replayed}, left {self.left}, not replayable {self.not_replayable}"


@dataclass(frozen=True)
class PurgeReport:
    """What a purge removed (or, with ``dry_run`` or without confirmation, would remove)."""

    purged: int
    selected: int
    left: int
    dry_run: bool = False
    #: False when the operator did not confirm (nothing was removed); True for a dry run.
    confirmed: bool = True

    def __str__(self) -> str:
        if self.dry_run:
            return f"would purge {self.selected}, left {self.left}"
        if not self.confirmed:
            return f"not confirmed: purged 0 of {self.selected}, left {self.left}"
        return f"purged {self.purged}, left {self.left}"


def count(
    settings: Settings, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (),
    since: datetime | None = None, until: datetime | None = None,
) -> Counts:
    """Count the matching dead letters (all by default) by reason and asset_id, leaving every one in the queue."""
    selection = Selection.of(reasons=reasons, asset_ids=asset_ids, since=since, until=until)
    counts = Counts()
    with Reader(settings) as reader:
        for _, envelope in reader:
            counts.scanned += 1
            if selection.matches(envelope):
                counts.add(envelope)
    return counts


def read(
    settings: Settings, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (),
    since: datetime | None = None, until: datetime | None = None, limit: int | None = None,
) -> list[Envelope]:
    """The envelopes that match the filters (all of them by default), in queue order, left in place."""
    selection = Selection.of(reasons=reasons, asset_ids=asset_ids, since=since, until=until)
    found: list[Envelope] = []
    with Reader(settings) as reader:
        for _, envelope in reader:
            if limit is not None and len(found) >= limit:
                break
            if selection.matches(envelope):
                found.append(envelope)
    return found


def replay(
    settings: Settings, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (),
    since: datetime | None = None, until: datetime | None = None, limit: int | None = None,
    dry_run: bool = False, group_size: int = GROUP_SIZE, publisher_class: type[Publisher] = Publisher,
    on_replay: Callable[[Envelope], None] | None = None, progress: Progress | None = None,
) -> ReplayReport:
    """Publish the selected dead letters' events to ``settings.queue``, then acknowledge them.

    Each group is published and confirmed before any of its dead letters is acknowledged,
    so an error (raised to the caller) or a crash leaves each event in ``activities``, in the
    dead-letter queue, or both. Envelopes without an event are never replayed.
    """
    selection = Selection.of(reasons=reasons, asset_ids=asset_ids, since=since, until=until)
    replayed = not_replayable = held = 0
    group: list[tuple[int, Outgoing]] = []
    publisher = None if dry_run else publisher_class(settings.broker_url, declare=[Topology.of(settings).source_queue()])

    def flush(reader: Reader) -> None:
        nonlocal replayed
        if not group or publisher is None:
            return
        publisher.publish([outgoing for _, outgoing in group])
        if held == 0:  # every message read so far is in this group: one ack covers them all
            reader.channel.basic_ack(group[-1][0], multiple=True)
        else:
            for delivery_tag, _ in group:
                reader.channel.basic_ack(delivery_tag)
        replayed += len(group)
        logger.debug("Replayed %d dead letters to %s (%d in all)", len(group), settings.queue, replayed)
        group.clear()

    try:
        with Reader(settings) as reader:
            for delivery_tag, envelope in reader:
                if limit is not None and replayed + len(group) >= limit:
                    break  # this message's tag is above the group's: no ack can reach it
                if progress is not None:
                    progress.update(reader.read, reader.start_count, replayed + len(group))
                chosen = selection.matches(envelope)
                if not chosen or envelope.get("event") is None:
                    held += 1
                    not_replayable += chosen
                    continue
                if on_replay is not None:
                    on_replay(envelope)
                if dry_run:
                    replayed += 1
                    continue
                headers = {REPLAYS_HEADER: replays_of(envelope) + 1}
                body = jsonutil.dumps(envelope["event"])  # what a producer sends: the event alone
                group.append((delivery_tag, Outgoing(settings.queue, body, headers)))
                if len(group) >= group_size:
                    flush(reader)
            flush(reader)
            start_count = reader.start_count
            if progress is not None:
                progress.update(reader.read, start_count, replayed, final=True)
    finally:
        if publisher is not None:
            publisher.close()
    logger.info("%s %d dead letters to %s", "Would replay" if dry_run else "Replayed", replayed, settings.queue)
    return ReplayReport(replayed, start_count - replayed, not_replayable, dry_run)


def purge(
    settings: Settings, *, confirm: Callable[[int], bool], reasons: Collection[str] = (),
    asset_ids: Collection[str] = (), since: datetime | None = None, until: datetime | None = None,
    limit: int | None = None, dry_run: bool = False, progress: Progress | None = None,
) -> PurgeReport:
    """Remove the selected dead letters, once ``confirm(how_many)`` said yes.

    Every dead letter read is held unacknowledged on one channel while ``confirm`` runs, so
    what is confirmed is exactly what goes (dead letters arriving meanwhile are not read).
    Then only the selected ones are acknowledged; closing the channel returns the others to
    the queue untouched. Interrupted at any moment, a purge removes nothing but selected
    dead letters, and a selected one it did not acknowledge stays.
    """
    selection = Selection.of(reasons=reasons, asset_ids=asset_ids, since=since, until=until)
    chosen: list[int] = []
    with Reader(settings) as reader:
        for delivery_tag, envelope in reader:
            if limit is not None and len(chosen) >= limit:
                break
            if progress is not None:
                progress.update(reader.read, reader.start_count, len(chosen))
            if selection.matches(envelope):
                chosen.append(delivery_tag)
        if progress is not None:
            progress.update(reader.read, reader.start_count, len(chosen), final=True)
        start_count = reader.start_count
        if dry_run:
            return PurgeReport(0, len(chosen), start_count - len(chosen), dry_run=True)
        if not chosen or not confirm(len(chosen)):
            return PurgeReport(0, len(chosen), start_count, confirmed=not chosen)
        reader.ack(chosen)
    logger.warning("Purged %d dead letters from %s", len(chosen), settings.dead_letter_queue)
    return PurgeReport(len(chosen), len(chosen), start_count - len(chosen))

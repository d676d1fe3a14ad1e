"""``python -m worker.dlq``: count, list and replay the events the worker could not deliver.

A dead letter is data nobody else holds, so nothing here loses one. Reading fetches messages
with ``basic_get`` and leaves them unacknowledged on one channel: closing that channel (or a
crash) hands every one back to its place in the queue. Replaying acknowledges a dead letter
only after the broker confirmed its event on ``activities``: interrupted at any moment, a run
loses nothing, and at worst leaves an event both replayed and still dead-lettered.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import amqp
from kombu import Connection, Queue
from kombu.exceptions import OperationalError

from config.settings import Settings, SettingsError
from worker import jsonutil
from worker.errors import PublishError
from worker.runtime import source_queue
from worker.publisher import Outgoing, Publisher

logger = logging.getLogger(__name__)

#: Header on a replayed event: how many times it was replayed, for its next dead letter.
REPLAYS_HEADER = "x-replays"

#: Dead letters replayed per publish-confirm round trip; their acks follow the confirm.
GROUP_SIZE = 500

#: The reason shown for a message of the dead-letter queue that is not a JSON envelope.
UNREADABLE = "unreadable"

#: What ``replay --help`` says.
REPLAY_HELP = ("Publish the matching events back to the activities queue, as producers send them. A dead letter "
               "is removed only once the broker confirmed its replay. Envelopes without an event stay.")

#: How ``count`` shows dead letters without an ``asset_id`` (unparseable bodies).
NO_ASSET = "(none)"

Envelope = dict[str, Any]


class DeadLetterError(Exception):
    """The dead-letter queue cannot be read: the broker is unreachable or the queue missing."""


@dataclass
class Counts:
    """How many dead letters there are, by reason and by asset_id."""

    total: int = 0
    not_replayable: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_asset_id: Counter[str] = field(default_factory=Counter)

    def add(self, envelope: Envelope) -> None:
        self.total += 1
        self.not_replayable += envelope.get("event") is None
        self.by_reason[str(envelope.get("reason"))] += 1
        self.by_asset_id[str(envelope.get("asset_id") or NO_ASSET)] += 1

    def as_dict(self) -> dict[str, Any]:
        by_reason, by_asset_id = dict(self.by_reason.most_common()), dict(self.by_asset_id.most_common())
        return {"total": self.total, "not_replayable": self.not_replayable, "by_reason": by_reason,
                "by_asset_id": by_asset_id}

    def table(self) -> str:
        """A small text table, largest counts first."""
        lines = [f"dead letters: {self.total} (not replayable: {self.not_replayable})"]
        for title, counter in (("reason", self.by_reason), ("asset_id", self.by_asset_id)):
            width = max([len(title), *map(len, counter)])
            lines += ["", f"{title:<{width}}  count"]
            lines += [f"{key:<{width}}  {value:>5}" for key, value in counter.most_common()]
        return "\n".join(lines)


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


class _Reader:
    """One channel that holds every dead letter it read, unacknowledged, until it closes.

    Holding them, rather than rejecting each, is what keeps a pass finite and lossless: a
    rejected message would come straight back to the head of the queue and be read again.
    A pass reads at most the messages present at its start (``start_count``), so events
    that die again while it runs are not replayed again by the same run.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue = settings.dead_letter_queue
        self.start_count = 0
        self._connection = Connection(settings.broker_url, heartbeat=0, connect_timeout=10)

    def __enter__(self) -> _Reader:
        where = self.settings.broker_url_redacted
        try:
            self._connection.ensure_connection(max_retries=2)
            self.channel: amqp.Channel = self._connection.channel()
            # passive: reading must not create the queue (a typo in its name would look empty)
            _, self.start_count, _ = self.channel.queue_declare(self.queue, durable=True, passive=True)
        except amqp.exceptions.NotFound:
            self._connection.release()
            raise DeadLetterError(f"there is no queue {self.queue!r} on {where}") from None
        except (OperationalError, OSError) as exc:
            self._connection.release()
            raise DeadLetterError(f"cannot reach the broker at {where}: {exc}") from None
        logger.info("%d dead letters in %s on %s", self.start_count, self.queue, where)
        return self

    def __iter__(self) -> Iterator[tuple[int, Envelope]]:
        for _ in range(self.start_count):
            message = self.channel.basic_get(self.queue, no_ack=False)
            if message is None:
                return
            yield message.delivery_tag, _envelope(message.body)

    def __exit__(self, *exc_info: object) -> None:
        """Close the channel: every message read and not acknowledged goes back to the queue."""
        try:
            if self.channel.is_open:
                self.channel.close()
        except Exception:  # a broken connection: the broker has put them back already
            pass
        self._connection.release()


def _envelope(body: bytes | str) -> Envelope:
    """The envelope of a dead letter; a stand-in (not replayable) if its body is not one."""
    try:
        value = jsonutil.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    raw = body if isinstance(body, str) else body.decode("utf-8", "replace")
    return {"reason": UNREADABLE, "error": "this dead letter is not a JSON envelope", "event": None, "raw": raw}


def _selected(envelope: Envelope, reasons: Collection[str], asset_ids: Collection[str]) -> bool:
    return (not reasons or envelope.get("reason") in reasons) and (
        not asset_ids or envelope.get("asset_id") in asset_ids
    )


def count(settings: Settings) -> Counts:
    """Count the dead letters by reason and asset_id, leaving every one in the queue."""
    counts = Counts()
    with _Reader(settings) as reader:
        for _, envelope in reader:
            counts.add(envelope)
    return counts


def read(
    settings: Settings, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (), limit: int | None = None
) -> list[Envelope]:
    """The envelopes that match the filters (all of them by default), in queue order, left in place."""
    found: list[Envelope] = []
    with _Reader(settings) as reader:
        for _, envelope in reader:
            if limit is not None and len(found) >= limit:
                break
            if _selected(envelope, reasons, asset_ids):
                found.append(envelope)
    return found


def replay(
    settings: Settings, *, reasons: Collection[str] = (), asset_ids: Collection[str] = (), limit: int | None = None,
    dry_run: bool = False, group_size: int = GROUP_SIZE, publisher_class: type[Publisher] = Publisher,
    on_replay: Callable[[Envelope], None] | None = None,
) -> ReplayReport:
    """Publish the selected dead letters' events to ``settings.queue``, then acknowledge them.

    Each group is published and confirmed before any of its dead letters is acknowledged,
    so an error (raised to the caller) or a crash leaves each event in ``activities``, in the
    dead-letter queue, or both. Envelopes without an event are never replayed.
    """
    replayed = not_replayable = held = 0
    group: list[tuple[int, Outgoing]] = []
    publisher = None if dry_run else publisher_class(settings.broker_url, declare=[source_queue(settings)])

    def flush(reader: _Reader) -> None:
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
        logger.info("Replayed %d dead letters to %s (%d in all)", len(group), settings.queue, replayed)
        group.clear()

    try:
        with _Reader(settings) as reader:
            for delivery_tag, envelope in reader:
                if limit is not None and replayed + len(group) >= limit:
                    break  # this message's tag is above the group's: no ack can reach it
                chosen = _selected(envelope, reasons, asset_ids)
                if not chosen or envelope.get("event") is None:
                    held += 1
                    not_replayable += chosen
                    continue
                if on_replay is not None:
                    on_replay(envelope)
                if dry_run:
                    replayed += 1
                    continue
                headers = {REPLAYS_HEADER: int(envelope.get("replays") or 0) + 1}
                body = jsonutil.dumps(envelope["event"])  # what a producer sends: the event alone
                group.append((delivery_tag, Outgoing(settings.queue, body, headers)))
                if len(group) >= group_size:
                    flush(reader)
            flush(reader)
            start_count = reader.start_count
    finally:
        if publisher is not None:
            publisher.close()
    return ReplayReport(replayed, start_count - replayed, not_replayable, dry_run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Count, list and replay the dead-letter queue.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{count,list,show,replay}")
    counting = commands.add_parser("count", help="counts by reason and asset_id", description=count.__doc__)
    counting.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--reason", action="append", default=[], metavar="R", help="only this reason (repeat)")
    filters.add_argument("--asset-id", action="append", default=[], metavar="A", help="only this asset_id (repeat)")
    filters.add_argument("--limit", type=_positive, metavar="N", help="at most N dead letters")
    commands.add_parser("list", aliases=["show"], parents=[filters], help="print envelopes as JSON lines",
                        description="Print the matching envelopes as JSON lines, in queue order; remove nothing.")
    replaying = commands.add_parser("replay", parents=[filters], help="publish events back to the activities queue",
                                    description=REPLAY_HELP)
    replaying.add_argument("--dry-run", action="store_true", help="print what would be replayed; change nothing")
    return parser


def _print_json(envelope: Envelope) -> None:
    print(jsonutil.dumps(envelope).decode("utf-8", "replace"))


def main(
    argv: Sequence[str] | None = None, *, settings: Settings | None = None, prog: str = "python -m worker.dlq"
) -> int:
    """Run one command; return the exit status (1: broker or queue problem, 2: bad settings)."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        settings = settings or Settings.from_env(require_api=False)
        if args.command == "count":
            counts = count(settings)
            print(jsonutil.dumps(counts.as_dict()).decode() if args.json else counts.table())
        elif args.command in ("list", "show"):
            for envelope in read(settings, reasons=args.reason, asset_ids=args.asset_id, limit=args.limit):
                _print_json(envelope)
        else:
            print(replay(settings, reasons=args.reason, asset_ids=args.asset_id, limit=args.limit,
                         dry_run=args.dry_run, on_replay=_print_json if args.dry_run else None))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DeadLetterError, PublishError, OperationalError, amqp.exceptions.AMQPError, OSError) as exc:
        print(f"error: {exc} (nothing was lost: unconfirmed dead letters stay in the queue)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m worker.deadletter.cli``: count, list, replay and purge the events the worker could not deliver.

A dead letter is data nobody else holds, so nothing here loses one. Reading fetches messages
with ``basic_get`` and leaves them unacknowledged on one channel (:class:`~worker.deadletter.reader.Reader`)
until the command hands every one back (a crash does too). A command starts once no other
client holds dead letters, and returns once the queue shows again what it handed back, so the
next command sees every one (:mod:`worker.deadletter.handback`). Replaying
acknowledges a dead letter only after the broker confirmed its event on ``activities``:
interrupted at any moment, a run loses nothing, and at worst leaves an event both replayed and
still dead-lettered. Purging acknowledges only the selected dead letters, and only once the
operator confirmed how many: every other one goes back untouched.

Every command selects by reason, asset_id, Netcore account and time range (``failed_at``); a
dead letter written before the worker had several accounts names none and is ``default``'s.

Replay publishes what can become events again: an event that is a JSON object, alone, as a
producer sends it, and a ``poison`` message's body, byte for byte. A ``malformed`` body (and
an array item such as ``7``) stays, to be fixed by hand. A large body is kept in several dead
letters (parts, :mod:`worker.deadletter.envelopes`): every command takes them as one.

Before the worker first ran there is no dead-letter queue: every command then says so, does
nothing (it never creates the queue, so a typo in its name shows), and exits 0.

Replayed events carry the header ``x-replays``; the ingest consumer copies it into any dead
letter it writes for them (``malformed``, ``invalid``, ``poison``), so ``count`` shows events
that keep coming back. A known limit: dead letters written later by the upload task
(``rejected``, ``unauthorized``, ``refused``, ``retries_exhausted``) cannot know it, because a
batch carries its events without their messages' headers; theirs say ``replays: 0``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import datetime

import amqp
from kombu.exceptions import OperationalError

from config.settings import Settings
from worker.broker.headers import REPLAYS_HEADER
from worker.deadletter.commands import GROUP_SIZE, PurgeReport, ReplayReport, count, purge, read, replay
from worker.deadletter.counting import NO_ASSET, TOP_ASSETS, Counts
from worker.deadletter.reader import (
    DEFAULT_ACCOUNT,
    PROGRESS_EVERY,
    UNREADABLE,
    Envelope,
    Progress,
    Selection,
    parse_when,
)
from worker.errors import DeadLetterError, NoDeadLetterQueue, PublishError, SettingsError
from worker.events import jsonutil

__all__ = ["DEFAULT_ACCOUNT", "GROUP_SIZE", "NO_ASSET", "REPLAYS_HEADER", "UNREADABLE", "Counts", "DeadLetterError",
           "NoDeadLetterQueue", "PurgeReport", "ReplayReport", "Selection", "count", "main", "purge", "read", "replay"]

#: What ``replay --help`` says.
REPLAY_HELP = ("Publish the matching events back to the activities queue, as producers send them, and poison "
               "messages' bodies byte for byte. A dead letter is removed only once the broker confirmed its "
               "replay. Malformed bodies and array items that are not objects stay.")

#: What ``purge --help`` says.
PURGE_HELP = ("Remove the matching dead letters for good, after saying how many and reading 'purge N' on stdin "
              "(or --yes). Only they are acknowledged; every other dead letter stays, in its place.")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def _when(text: str) -> datetime:
    try:
        return parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Count, list, replay and purge the dead-letter queue.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{count,list,show,replay,purge}")
    select = argparse.ArgumentParser(add_help=False)
    group = select.add_argument_group("selection (every criterion given must hold)")
    group.add_argument("--reason", action="append", default=[], metavar="R", help="only this reason (repeat)")
    group.add_argument("--asset-id", action="append", default=[], metavar="A", help="only this asset_id (repeat)")
    group.add_argument("--account", action="append", default=[], metavar="NAME",
                       help=f"only this Netcore account (repeat); dead letters written before the worker had "
                            f"several accounts name none: they are account {DEFAULT_ACCOUNT}")
    group.add_argument("--since", type=_when, metavar="WHEN",
                       help="only dead letters with failed_at at or after WHEN: 2024-05-01T12:00:00Z, an offset "
                            "such as +05:30, or a date alone (00:00 UTC)")
    group.add_argument("--until", type=_when, metavar="WHEN", help="only dead letters with failed_at before WHEN")
    limited = argparse.ArgumentParser(add_help=False)
    limited.add_argument("--limit", type=_positive, metavar="N", help="at most N dead letters")
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    running.add_argument("--progress", action="store_true",
                         help="print a progress line on stderr (the default when stderr is a terminal)")
    running.add_argument("--progress-every", type=_positive, default=PROGRESS_EVERY, metavar="N",
                         help=f"dead letters read between progress lines (default {PROGRESS_EVERY})")
    counting = commands.add_parser("count", parents=[select], help="counts by reason, asset_id, account, and crossed",
                                   description=count.__doc__)
    counting.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    counting.add_argument("--top", type=_positive, default=TOP_ASSETS, metavar="N",
                          help=f"asset_ids shown in the tables (default {TOP_ASSETS})")
    commands.add_parser("list", aliases=["show"], parents=[select, limited], help="print envelopes as JSON lines",
                        description="Print the matching envelopes as JSON lines, in queue order; remove nothing.")
    commands.add_parser("replay", parents=[select, limited, running], description=REPLAY_HELP,
                        help="publish events back to the activities queue")
    purging = commands.add_parser("purge", parents=[select, limited, running], description=PURGE_HELP,
                                  help="remove dead letters for good, after confirmation")
    purging.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def _print_json(envelope: Envelope) -> None:
    print(jsonutil.dumps(envelope).decode("utf-8", "replace"))


def _ask(how_many: int) -> bool:
    """Say how many dead letters would go; read ``purge N`` on stdin (anything else: no)."""
    print(f"{how_many} dead letters would be removed for good.", file=sys.stderr)
    print(f'type "purge {how_many}" to confirm: ', end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip() == f"purge {how_many}"


def _nothing_yet(args: argparse.Namespace, notice: NoDeadLetterQueue) -> int:
    """No dead-letter queue yet: say so on stderr, print what an empty queue gives, exit 0."""
    print(notice, file=sys.stderr)
    if args.command == "count":
        print(jsonutil.dumps(Counts().as_dict()).decode() if args.json else Counts().table())
    elif args.command == "replay":
        print(ReplayReport(0, 0, 0, args.dry_run))
    elif args.command == "purge":
        print(PurgeReport(0, 0, 0, dry_run=args.dry_run))
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    criteria = {"reasons": args.reason, "asset_ids": args.asset_id, "since": args.since, "until": args.until,
                "accounts": args.account}
    if args.since and args.until and args.since >= args.until:
        print("error: --since must be before --until", file=sys.stderr)
        return 2
    if args.command == "count":
        counts = count(settings, **criteria)
        print(jsonutil.dumps(counts.as_dict()).decode() if args.json else counts.table(args.top))
        return 0
    if args.command in ("list", "show"):
        for envelope in read(settings, limit=args.limit, **criteria):
            _print_json(envelope)
        return 0
    shown = args.progress or sys.stderr.isatty()
    if args.command == "replay":
        progress = Progress("replay", "replayed", every=args.progress_every) if shown else None
        print(replay(settings, limit=args.limit, dry_run=args.dry_run, progress=progress,
                     on_replay=_print_json if args.dry_run else None, **criteria))
        return 0
    progress = Progress("purge", "selected", every=args.progress_every) if shown else None
    report = purge(settings, limit=args.limit, dry_run=args.dry_run, progress=progress,
                   confirm=(lambda _: True) if args.yes else _ask, **criteria)
    print(report)
    return 0 if report.confirmed else 1


def main(
    argv: Sequence[str] | None = None, *, settings: Settings | None = None, prog: str = "python -m worker.deadletter.cli"
) -> int:
    """Run one command; return the exit status (0 also when there is no dead-letter queue yet; 1: broker
    problem, or a purge not confirmed; 2: bad settings or arguments; 130: interrupted)."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        return _run(args, settings or Settings.from_env(require_api=False))
    except NoDeadLetterQueue as notice:
        return _nothing_yet(args, notice)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DeadLetterError, PublishError, OperationalError, amqp.exceptions.AMQPError, OSError) as exc:
        print(f"error: {exc} (nothing was lost: unconfirmed dead letters stay in the queue)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every dead letter not yet acknowledged stays in the queue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

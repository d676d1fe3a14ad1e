"""``netcore-activity check``: would the worker start here, and what would it do? Nothing is started.

The check runs :data:`STEPS` in order; each prints what it found, prefixed with its name, and
the first that fails ends the check with one line on stderr:

1. ``settings``: every setting read and checked as the worker reads them (the accounts file of
   ``NETCORE_ACCOUNTS_FILE`` included), an account to upload to required; whether TLS to the
   broker is on, and with which CA file and client certificate (paths only: a key is never shown);
2. ``accounts``: each Netcore account, where it uploads (its key is never shown) and which
   asset_ids it takes, and where an asset_id of no account goes;
3. ``broker``: the first node of ``CELERY_BROKER_URL`` (a ``;`` list) that answers within
   ``--timeout`` seconds, and why the ones before it did not;
4. ``queues``: the queues the worker would declare and consume, and what the broker holds of
   them now (passive declarations: the check creates and changes nothing);
5. ``uploads``: how many uploads at once, how it batches, where its metrics would be.

Exit status as the health check's: 0 every step passed, 1 one failed (the broker), 2 a bad
setting. A step is a function of the :class:`Context` returning its lines; it raises
:class:`~worker.errors.SettingsError` for a bad setting and :class:`CheckFailed` for anything
else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

import amqp
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from config.settings import Settings, redact_url
from worker.broker.topology import Topology
from worker.errors import SettingsError
from worker.ops.reach import DEFAULT_TIMEOUT, Reached, reach


class CheckFailed(Exception):
    """A step found something the worker could not start or run with (not a bad setting)."""


@dataclass
class Context:
    """What the steps share: the environment they read, and what earlier steps found."""

    env: Mapping[str, str] | None
    timeout: float
    settings: Settings | None = None
    broker: Reached | None = None

    def need_settings(self) -> Settings:
        assert self.settings is not None, "the settings step comes first"
        return self.settings

    def close(self) -> None:
        if self.broker is not None:
            self.broker.close()


#: A step: the context in, the lines it says out.
Step = Callable[[Context], list[str]]


def read_settings(context: Context) -> list[str]:
    """Every setting, as the worker reads them (the API key required)."""
    settings = context.settings = Settings.from_env(context.env)
    sentry = "on (SENTRY_DSN set, never shown)" if settings.sentry_dsn else "off"
    tls = settings.broker_tls.describe() if settings.broker_tls else "TLS off (an amqp:// CELERY_BROKER_URL)"
    return [f"ok; {settings.queue_type} queues, Sentry {sentry}, {settings.log_format} logs", f"broker {tls}"]


def describe_accounts(context: Context) -> list[str]:
    """Each account, where it uploads and for which asset_ids (keys never shown)."""
    accounts = context.need_settings().accounts
    lines = []
    for account in accounts:
        owns = (f"{len(account.asset_ids)} asset_id(s)" if account.asset_ids
                else "every asset_id of no other account")
        lines.append(f"{account.name}: would POST to {redact_url(account.upload_url)} ({account.where}), key set and "
                     f"never shown, for {owns}")
    if accounts.default is None:
        lines.append("an asset_id of no account is dead-lettered 'unroutable' (there is no default account: "
                     "NETCORE_API_KEY is not set)")
    return lines


def reach_broker(context: Context) -> list[str]:
    """The first node of the broker URL list that answers."""
    settings = context.need_settings()
    reached = context.broker = reach(settings.broker_url, timeout=context.timeout, ssl=settings.broker_ssl())
    if reached.connection is None:
        what = "the broker refused" if reached.broker_answered else "cannot reach the broker"
        raise CheckFailed(f"{what}: {reached.why_not()}")
    skipped = f" (tried first: {reached.why_not()})" if reached.failed else ""
    return [f"{redact_url(reached.url)} answered: {reached.server() or 'an AMQP broker'}{skipped}"]


def describe_queues(context: Context) -> list[str]:
    """What the worker would declare and consume, and what the broker holds of them now."""
    settings = context.need_settings()
    assert context.broker is not None and context.broker.connection is not None, "the broker step comes first"
    connection = context.broker.connection
    topology = Topology.of(settings)
    rungs = topology.rungs
    delays = f"{topology.delay_name(rungs[0])}..{rungs[-1]}ms ({len(rungs)} delay queues)"
    uploads = [topology.upload_for(account) for account in topology.accounts]
    names = [topology.source, topology.task_source, *uploads, delays, topology.quarantine, topology.dead_letter,
             topology.unhandled]
    consumed = {
        topology.source: f"producers' events, up to {settings.prefetch} unacknowledged",
        topology.task_source: "send_task('activities.ingest') events",
        **{topology.upload_for(account): f"account {account}'s upload tasks, up to {settings.upload_concurrency} "
                                         "at once" for account in topology.accounts},
        topology.quarantine: "suspect messages, one at a time",
        topology.unhandled: "rejected upload tasks, written as dead letters",
    }
    lines = [f"would declare {len(topology.all_queues())} {settings.queue_type} queues: {', '.join(names)}"]
    lines += [f"would consume {name} ({what}): {_state(connection, name)}" for name, what in consumed.items()]
    lines.append(f"would dead-letter to {topology.dead_letter}: {_state(connection, topology.dead_letter)}")
    return lines


def describe_uploads(context: Context) -> list[str]:
    """Where and how the worker would upload, and batch (the API key is never shown)."""
    s = context.need_settings()
    metrics = f"http://{s.metrics_address}:{s.metrics_port}/metrics" if s.metrics_port else "off (METRICS_PORT=0)"
    return [
        f"up to {s.upload_concurrency} uploads in flight per account (adapted to its API, from 1), each answered within "
        f"{s.upload_timeout:g} s; a failing batch retried {s.max_retries} times within {s.retry_window / 3600:g} h",
        f"batches per asset_id of up to {s.batch_size} events or {_size(s.batch_max_bytes)}, "
        f"none waiting more than {s.batch_wait:g} s",
        f"metrics: {metrics}",
    ]


#: The check's steps, in order (see the module docstring).
STEPS: tuple[tuple[str, Step], ...] = (
    ("settings", read_settings),
    ("accounts", describe_accounts),
    ("broker", reach_broker),
    ("queues", describe_queues),
    ("uploads", describe_uploads),
)


def _size(count: int) -> str:
    """``4 MiB`` for 4194304, ``1536 bytes`` for 1536."""
    return f"{count / 2**20:g} MiB" if count % 2**20 == 0 else f"{count} bytes"


def _state(connection: Connection, queue: str) -> str:
    """What the broker holds of ``queue``: ``12 ready, 1 consumer(s)``, or that it is not there yet."""
    channel = connection.channel()
    try:
        _, ready, consumers = channel.queue_declare(queue, passive=True)
        return f"{ready} ready, {consumers} consumer(s)"
    except amqp.exceptions.NotFound:
        return "not there yet (the worker declares it)"
    except (amqp.exceptions.AMQPError, OperationalError, OSError) as exc:
        raise CheckFailed(f"cannot inspect queue {queue!r}: {exc}") from None
    finally:
        try:
            channel.close()
        except Exception:  # closed by the broker already (NotFound closes it)
            pass


def run_check(*, env: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT,
              out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run :data:`STEPS`; return 0, 1 (a step failed) or 2 (a bad setting), as the module docstring says."""
    context = Context(env, timeout)
    name = ""
    try:
        for name, step in STEPS:
            for line in step(context):
                print(f"{name}: {line}", file=out, flush=True)
    except SettingsError as exc:
        print(f"check failed: configuration error: {exc}", file=err)
        return 2
    except CheckFailed as exc:
        print(f"check failed: {name}: {exc}", file=err)
        return 1
    finally:
        context.close()
    print("ok: the worker would start with these settings (netcore-activity worker)", file=out)
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
    return value


def main(argv: Sequence[str] | None = None, *, prog: str = "netcore-activity check") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Check the settings, reach the broker and say what the worker would do, without "
        "starting it. Exit 0 if all is well, 1 if something is not (one line says what), 2 for a bad setting.")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"for each broker of the list to answer (default {DEFAULT_TIMEOUT:g})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    return run_check(timeout=args.timeout)

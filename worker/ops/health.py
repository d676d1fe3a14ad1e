"""``netcore-activity health``: exit 0 when the worker is consuming, else 1 and one line saying why.

Made for a Kubernetes liveness or readiness probe (or any supervisor): no Flower, no HTTP
port, nothing to run beside the worker. It asks the broker, the one thing probe and worker
share, two questions:

1. Does the queue ``activities`` (``ACTIVITY_QUEUE``) exist and have a consumer? (a passive
   ``queue_declare``: its ``consumer_count``). With ``--max-depth N`` the queue must also hold
   at most N ready messages: the workers are keeping up.
2. Does this worker answer within ``--timeout`` seconds? It asks the worker's remote-control
   command ``activities_status`` (:mod:`worker.ops.status`), whose reply comes from the main
   process's event loop, which also runs the consumer of ``activities``: a hung or dead main
   process does not answer. A worker with no consumer on the queue is healthy only when it says
   it paused on purpose (its hand-offs wait for the broker). Accounts whose uploads are paused
   (their API is down, or asks to slow down) are named in the line, and are no reason to fail:
   restarting the worker would not bring their API back.

``--hostname`` names the worker as its ``--hostname`` option did; ``%h`` is this host's name.
The default, ``activities@%h``, is the Procfile's: a probe running in the worker's container
(same host name) needs no option at all. A bad setting exits with 2, naming it.

Kubernetes, in the worker's container::

    livenessProbe:
      exec: {command: ["netcore-activity", "health"]}
      periodSeconds: 30
      timeoutSeconds: 10
      failureThreshold: 3

A queue's depth says the workers together are behind, not that this one is broken: use
``--max-depth`` for readiness or alerting, never for liveness (restarting a busy worker makes
the backlog worse). The probe takes at most about twice ``--timeout`` (connect, then ask).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import amqp
from celery import Celery
from celery.utils.nodenames import default_nodename, host_format
from kombu.exceptions import OperationalError

from config.settings import Settings
from worker.broker.connection import connect
from worker.errors import SettingsError
from worker.ops.status import COMMAND as STATUS

#: The worker's name in the Procfile (``--hostname=activities@%h``).
DEFAULT_HOSTNAME = "activities@%h"

#: Seconds to wait for the broker's connection, then again for the worker's pong.
DEFAULT_TIMEOUT = 3.0


@dataclass(frozen=True)
class Health:
    """The verdict, and the one line that says why."""

    ok: bool
    reason: str

    def __str__(self) -> str:
        return f"{'ok' if self.ok else 'unhealthy'}: {self.reason}"


def worker_name(hostname: str) -> str:
    """``activities@%h`` -> ``activities@this-host``, as Celery expands a worker's ``--hostname``."""
    return str(host_format(default_nodename(hostname)))


def queue_health(consumers: int, ready: int, queue: str, max_depth: int | None) -> Health:
    """Judge a queue by its consumers and its ready messages."""
    if consumers < 1:
        return Health(False, f"queue {queue!r} has no consumer: no worker is consuming it")
    if max_depth is not None and ready > max_depth:
        return Health(False, f"queue {queue!r} holds {ready} ready messages, over --max-depth {max_depth}")
    return Health(True, f"queue {queue!r} has {consumers} consumer(s) and {ready} ready messages")


def check(
    settings: Settings, *, hostname: str, timeout: float = DEFAULT_TIMEOUT, max_depth: int | None = None,
    app: Celery | None = None,
) -> Health:
    """Is the worker ``hostname`` alive and ``settings.queue`` consumed? (see the module docstring)"""
    where, queue = settings.broker_url_redacted, settings.queue
    try:
        connection = connect(settings.broker_url, timeout=timeout, retries=0, ssl=settings.broker_ssl())
    except (OperationalError, OSError) as exc:
        return Health(False, f"cannot reach the broker at {where}: {exc}")
    with connection:
        try:
            _, ready, consumers = connection.default_channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return Health(False, f"there is no queue {queue!r} on {where}: no worker ever started there")
        except (amqp.exceptions.AMQPError, OperationalError, OSError) as exc:
            return Health(False, f"cannot inspect queue {queue!r} on {where}: {exc}")
        verdict = queue_health(consumers, ready, queue, max_depth)
        if not verdict.ok and consumers >= 1:
            return verdict  # too deep: the workers together are behind
        try:
            replies = _app(app).control.inspect(destination=[hostname], timeout=timeout,
                                                connection=connection)._request(STATUS)
        except (amqp.exceptions.AMQPError, OperationalError, OSError) as exc:
            return Health(False, f"cannot ask worker {hostname} through {where}: {exc}")
    status = (replies or {}).get(hostname)
    if not isinstance(status, dict):
        return Health(False, f"worker {hostname} did not answer within {timeout:g} s ({verdict.reason})")
    if consumers < 1:
        if status.get("consuming") is not False:
            return Health(False, f"{verdict.reason}, although worker {hostname} says it consumes")
        if not (max_depth is None or ready <= max_depth):
            return verdict
        verdict = Health(True, f"it paused consuming {settings.queue!r} on purpose: "
                               f"{status.get('paused_because') or 'see its log'}")
    return Health(True, f"worker {hostname} answered; {verdict.reason}{_paused_accounts(status)}")


def _paused_accounts(status: dict[str, Any]) -> str:
    """"; account 'b' circuit open: ..." for each account whose uploads are paused: news for the
    operator (its events wait in RabbitMQ), never a reason to restart the worker."""
    accounts = status.get("accounts")
    if not isinstance(accounts, dict):
        return ""
    return "".join(f"; account {name!r} {info.get('paused_because')}" for name, info in accounts.items()
                   if isinstance(info, dict) and info.get("paused_because"))


def _app(app: Celery | None) -> Celery:
    """The worker's own Celery app, so that remote control reaches it however it is configured."""
    if app is not None:
        return app
    from worker.app import app as worker_app  # imported late: it reads every setting

    return worker_app


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0")
    return value


def _depth(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Exit 0 if the worker answers a ping and the activities queue has a consumer; "
        "else exit 1, saying why in one line (2: a bad setting).")
    parser.add_argument("--hostname", default=DEFAULT_HOSTNAME, metavar="NAME",
                        help="the worker's --hostname; %%h is this host's name (default "
                             f"{DEFAULT_HOSTNAME.replace('%', '%%')}, the Procfile's)")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"to connect, then to wait for the pong (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--max-depth", type=_depth, metavar="N",
                        help="also fail when the queue holds more than N ready messages (for readiness, not liveness)")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m worker.ops.health") -> int:
    """Print one line; return 0 (healthy), 1 (not) or 2 (a bad setting)."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    try:
        settings = Settings.from_env(require_api=False)
    except SettingsError as exc:
        print(f"unhealthy: configuration error: {exc}", file=sys.stderr)
        return 2
    health = check(settings, hostname=worker_name(args.hostname), timeout=args.timeout, max_depth=args.max_depth)
    print(health, file=sys.stdout if health.ok else sys.stderr)
    return 0 if health.ok else 1


if __name__ == "__main__":
    sys.exit(main())

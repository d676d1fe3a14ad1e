"""``netcore-activity health``: exit 0 when the worker is consuming, else 1 and one line saying why.

Made for a Kubernetes liveness or readiness probe (or any supervisor): no Flower, no HTTP
port, nothing to run beside the worker. It asks the broker, the one thing probe and worker
share, two questions:

1. Does the queue ``activities`` (``ACTIVITY_QUEUE``) exist and have a consumer? (a passive
   ``queue_declare``: its ``consumer_count``). With ``--max-depth N`` the queue must also hold
   at most N ready messages: the workers are keeping up.
2. Does this worker answer Celery's remote-control ``ping`` within ``--timeout`` seconds? The
   reply comes from the worker's main process, whose event loop also runs the consumer of
   ``activities``: a hung or dead main process does not answer.

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
the backlog worse). The probe takes at most about twice ``--timeout`` (connect, then ping).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import amqp
from celery import Celery
from celery.utils.nodenames import default_nodename, host_format
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from config.settings import Settings
from worker.broker.connection import connect
from worker.errors import SettingsError

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
        connection = connect(settings.broker_url, timeout=timeout, retries=0)
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
        if consumers < 1 and (max_depth is None or ready <= max_depth):
            return _paused_on_purpose(settings, hostname, timeout, connection, app, verdict)
        if not verdict.ok:
            return verdict
        try:
            replies = _app(app).control.ping(destination=[hostname], timeout=timeout, limit=1, connection=connection)
        except (amqp.exceptions.AMQPError, OperationalError, OSError) as exc:
            return Health(False, f"cannot ping worker {hostname} through {where}: {exc}")
    if not any(hostname in reply for reply in replies or []):
        return Health(False, f"worker {hostname} did not answer a ping within {timeout:g} s ({verdict.reason})")
    return Health(True, f"worker {hostname} answered a ping; {verdict.reason}")


def _paused_on_purpose(settings: Settings, hostname: str, timeout: float, connection: Connection,
                       app: Celery | None, verdict: Health) -> Health:
    """No consumer on the queue: healthy only if the worker says it paused on purpose (the API
    is down, or uploads pile up), which it answers on its event loop, so it is alive too."""
    try:
        replies = _app(app).control.inspect(destination=[hostname], timeout=timeout, connection=connection)._request(
            "activities_status")
    except (amqp.exceptions.AMQPError, OperationalError, OSError) as exc:
        return Health(False, f"{verdict.reason}; cannot ask worker {hostname} why: {exc}")
    status = (replies or {}).get(hostname)
    if not isinstance(status, dict):
        return verdict
    if status.get("consuming") is False:
        return Health(True, f"worker {hostname} answered; it paused consuming {settings.queue!r} on purpose: "
                            f"{status.get('paused_because') or 'see its log'} (circuit {status.get('circuit')})")
    return Health(False, f"{verdict.reason}, although worker {hostname} says it consumes")


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

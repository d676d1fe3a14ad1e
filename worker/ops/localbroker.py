"""``make run`` on a machine where no broker answers: a RabbitMQ node of its own, for the run.

``make run`` runs the supervisor with ``--local-broker DIR``. Before the Procfile's processes
start, it asks the broker URL (:mod:`worker.ops.reach`). When nothing answers there as a broker,
the URL names this machine and ``rabbitmq-server`` is installed, it starts a node of its own
(:mod:`worker.ops.rabbitnode`) with its data in ``DIR`` (``.rabbitmq/`` in the checkout,
gitignored: events waiting in it are still there at the next run), says so loudly, gives the
processes its URL, and stops it once they have all exited, so that the worker's warm shutdown
can still hand its batches on.

The node takes the URL's user, password and vhost when ``DIR`` is first made (delete ``DIR`` to
start afresh), and the URL's port unless something that is not a broker holds it. A URL naming
another machine is left alone: that broker is down, and a node here would only hide it. Without
RabbitMQ installed, :data:`INSTALL_HINT` says in one line how to get it.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from pathlib import Path
from urllib.parse import urlsplit

from config.settings import Settings, process_environment, redact_url
from worker.errors import SettingsError
from worker.ops.rabbitnode import LocalNode, NodeError, find_tools
from worker.ops.reach import reach

#: Seconds each broker of the URL list gets to answer before a node of our own is started.
PROBE_TIMEOUT = 3.0

#: Host names that mean this machine in a broker URL (none at all: kombu's default, localhost).
LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})

#: URL schemes a plain node can serve (``amqps://`` would need certificates it does not have).
PLAIN_SCHEMES = frozenset({"amqp", "pyamqp"})

#: What to do when no broker answers and RabbitMQ is not installed: one line.
INSTALL_HINT = ("RabbitMQ is not installed, so make run cannot start one: install it (Debian/Ubuntu: "
                "apt-get install rabbitmq-server; macOS: brew install rabbitmq; others: "
                "https://www.rabbitmq.com/docs/download), or set CELERY_BROKER_URL to a broker that runs")


class NoBroker(Exception):
    """No broker answers, and no node of our own can run: the message says what to do."""


def start_if_needed(broker_url: str, *, directory: Path, timeout: float = PROBE_TIMEOUT) -> tuple[LocalNode | None, str]:
    """``(None, "")`` when a broker answers on ``broker_url``, or when it names another machine
    (left alone); else a node of our own, started, and why it was needed. NoBroker when none can be."""
    first = broker_url.split(";")[0].strip()
    parts = urlsplit(first)
    if parts.scheme not in PLAIN_SCHEMES or (parts.hostname or "") not in LOCAL_HOSTS:
        return None, ""
    reached = reach(broker_url, timeout=timeout)
    answered = reached.broker_answered
    reached.close()
    if answered:
        return None, ""
    tools = find_tools()
    if tools is None:
        raise NoBroker(f"nothing answers on {redact_url(broker_url)} and {INSTALL_HINT}")
    node = LocalNode(directory, first, tools)
    try:
        node.start(process_environment())  # the processes' own environment: what marks them marks it
    except NodeError as error:
        raise NoBroker(str(error)) from None
    return node, reached.why_not()


def announcement(why: str, node: LocalNode) -> list[str]:
    """The loud lines that say this run has a broker of its own, and where."""
    rule = "#" * 78
    return [rule, f"# No broker answers on this machine: {why}.",
            "# Started a RabbitMQ node of this checkout's own for this run; the processes use it:",
            f"#   {redact_url(node.url)}   (node {node.name}, data in {node.directory})",
            "# It stops once they have (Ctrl-C). Other shells reach it with that CELERY_BROKER_URL.", rule]


def run_with(directory: Path, *, run: Callable[[], int], env: MutableMapping[str, str],
             say: Callable[[str], None]) -> int:
    """``run()`` (the supervisor's), on the broker URL or on a node of our own (its URL put in
    ``env``, the processes' variables), stopped after ``run`` returns. Exit status 1 when no
    broker can be had, 2 for a bad setting."""
    try:
        broker_url = Settings.from_env(require_api=False).broker_url
        node, why = start_if_needed(broker_url, directory=directory)
    except SettingsError as error:
        say(f"configuration error: {error}")
        return 2
    except NoBroker as error:
        say(str(error))
        return 1
    except KeyboardInterrupt:
        say("interrupted while a RabbitMQ node started: it is stopped, and nothing else was started")
        return 130
    if node is None:
        return run()
    try:
        for line in announcement(why, node):
            say(line)
        env["CELERY_BROKER_URL"] = node.url
        return run()
    finally:
        say(f"stopping the RabbitMQ node {node.name}")
        node.stop()
        say("the RabbitMQ node stopped")

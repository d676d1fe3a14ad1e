"""Queue depths for the metrics, read on a thread and a connection of its own.

How many upload tasks wait in each account's upload queue, and how many retries in its delay
queues, is something operators want to see (``netcore_activity_upload_queue_ready``,
``..._retries_waiting``); the worker's own decisions never need it. So the readings are taken
here, every :data:`INTERVAL` seconds, with passive declarations on a connection that fails over
across the broker URL list like every other (each node tried once, each try bounded), and
handed to ``report(group, count)``: a node that is down, or that silently drops packets, costs
this thread a reading, never the event loop a tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import amqp
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from worker.broker.connection import connect

logger = logging.getLogger(__name__)

#: Seconds between two readings.
INTERVAL = 5.0

#: Seconds one connection attempt (or one node of the list) may take.
CONNECT_TIMEOUT = 3.0


class QueueWatcher:
    """Reads the ready messages of groups of queues (``{group: [queue, ...]}``) every
    ``interval`` seconds; ``report(group, total)`` gets each group's total (never called for a
    group it could not read)."""

    def __init__(self, broker_url: str, groups: Mapping[str, Sequence[str]],
                 report: Callable[[str, int], None], *, interval: float = INTERVAL, ssl: Any = None) -> None:
        self.broker_url = broker_url
        self.groups = {name: list(queues) for name, queues in groups.items()}
        self.report = report
        self.interval = interval
        self.ssl = ssl
        self._connection: Connection | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-watcher", daemon=True)

    def start(self) -> QueueWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=CONNECT_TIMEOUT * 2)
        self._close()

    def read_once(self) -> dict[str, int]:
        """One reading of every group (what the thread does each interval)."""
        readings: dict[str, int] = {}
        try:
            channel = self._channel()
            for group, queues in self.groups.items():
                readings[group] = sum(channel.queue_declare(name, passive=True).message_count for name in queues)
        except (amqp.exceptions.AMQPError, OperationalError, OSError) as exc:
            logger.debug("Cannot read queue depths (%r); will try again", exc)
            self._close()
        return readings

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            for group, total in self.read_once().items():
                try:
                    self.report(group, total)
                except Exception:  # a metric's bug must not stop the readings
                    logger.exception("Reporting a queue depth failed")

    def _channel(self) -> Any:
        if self._connection is None:
            self._connection = connect(self.broker_url, timeout=CONNECT_TIMEOUT, retries=0, ssl=self.ssl)
        return self._connection.default_channel

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # already broken
                pass

"""Redeliveries of a task this process already handled, or is handling: not uploaded again.

When the connection to RabbitMQ is lost, the uploads running on the threads go on: their
requests are out, and their outcomes are published on the worker's own connections. Only their
acknowledgements are lost with the channel, so RabbitMQ delivers those tasks again, to this
worker once it has reconnected. Uploading them again would send every event in flight twice;
instead a redelivered task whose first run is over returns at once (its message is then
acknowledged), and one whose first run is still going waits for it (one upload attempt at most).
A process that died remembers nothing: then the redelivery uploads again (at least once).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

#: Task ids remembered as done, at most (the oldest are forgotten first).
REMEMBERED = 20_000


class SeenTasks:
    """Task ids this process ran to the end, and those running now. Thread-safe."""

    def __init__(self, *, remembered: int = REMEMBERED) -> None:
        self.remembered = remembered
        self._lock = threading.Lock()
        self._done: OrderedDict[str, None] = OrderedDict()
        self._running: dict[str, threading.Event] = {}

    def start(self, task_id: str, *, timeout: float) -> bool:
        """True: run it. False: it is done already (waiting ``timeout`` s at most for a first run
        still going); a first run that does not finish in time lets this one run too."""
        with self._lock:
            if task_id in self._done:
                return False
            running = self._running.get(task_id)
            if running is None:
                self._running[task_id] = threading.Event()
                return True
        finished = running.wait(timeout)
        with self._lock:
            if task_id in self._done:
                return False
            if not finished or task_id not in self._running:
                self._running[task_id] = threading.Event()
            return True

    def finish(self, task_id: str, *, done: bool) -> None:
        """The run is over; ``done``: its outcome is confirmed by the broker (remember it)."""
        with self._lock:
            event = self._running.pop(task_id, None)
            if done:
                self._done[task_id] = None
                while len(self._done) > self.remembered:
                    self._done.popitem(last=False)
        if event is not None:
            event.set()

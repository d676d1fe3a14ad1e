"""The worker's pool: Celery's thread pool, told what "cancel" means for a thread, and task
events published from the event loop only.

On a lost connection Celery cancels the tasks that were running with late acknowledgement
(``worker_cancel_long_running_tasks_on_connection_loss``, the default from Celery 6): a pool
process can be killed, a thread cannot. Here cancelling lets the upload finish: its request is
out anyway, and its outcome is published on the worker's own connections. Its message, never
acknowledged on the lost channel, comes back, and :mod:`worker.upload.seen` recognises it as done.

Task events (what Flower shows) are sent by the thread that ran the task. Celery buffers them
and has the event loop flush the buffer, except when it holds ``buffer_limit`` events (24): then
the sending thread flushes it itself, holding the dispatcher's lock, and with ``confirm_publish``
it waits for the broker's confirm by reading the events connection. The event loop reads that
same socket (its heartbeats): when it takes the confirm, the pool thread waits for ever and the
loop, flushing next, waits for its lock. The whole worker stops (seen with many small uploads a
second). :class:`LoopEvents` makes the buffer unbounded, so that only the loop ever flushes; it
still does at its next turn after every event, as with Celery's prefork pool.
"""

from __future__ import annotations

import sys
from typing import Any

from celery.app.events import Events
from celery.concurrency.thread import TaskPool
from celery.events.dispatcher import EventDispatcher


class UploadThreadPool(TaskPool):  # type: ignore[misc]  # celery ships no type information
    """Celery's thread pool whose jobs finish when "terminated" (see the module docstring)."""

    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        """A thread cannot be stopped from outside: its upload finishes, nothing is lost."""


class LoopDispatcher(EventDispatcher):  # type: ignore[misc]
    """An event dispatcher whose buffered events only the event loop flushes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer_limit = sys.maxsize  # however it was given: read at each buffered send


class LoopEvents(Events):  # type: ignore[misc]
    """The app's events, with :class:`LoopDispatcher` (the app's ``events_cls``)."""

    dispatcher_cls = "worker.upload.pool:LoopDispatcher"

"""The worker's pool: Celery's thread pool, told what "cancel" means for a thread.

On a lost connection Celery cancels the tasks that were running with late acknowledgement
(``worker_cancel_long_running_tasks_on_connection_loss``, the default from Celery 6): a pool
process can be killed, a thread cannot. Here cancelling lets the upload finish: its request is
out anyway, and its outcome is published on the worker's own connections. Its message, never
acknowledged on the lost channel, comes back, and :mod:`worker.upload.seen` recognises it as done.
"""

from __future__ import annotations

from typing import Any

from celery.concurrency.thread import TaskPool


class UploadThreadPool(TaskPool):  # type: ignore[misc]  # celery ships no type information
    """Celery's thread pool whose jobs finish when "terminated" (see the module docstring)."""

    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        """A thread cannot be stopped from outside: its upload finishes, nothing is lost."""

"""The Celery app: configured by name from :mod:`config.celeryconfig`, and wired here.

``celery -A worker.app worker`` runs the worker, one process:

- its event loop runs the consumer of ``activities`` (:class:`worker.ingest.step.IngestStep`)
  and of the quarantine, a consumer of each account's upload queue steered by its circuit and
  adaptive limit (:class:`worker.upload.step.UploadStep`), the salvage of rejected tasks
  (:class:`worker.deadletter.salvage.SalvageStep`) and Celery's own remote control and events;
- its thread pool runs the ``activities.upload`` tasks, many uploads in flight at once.

No property of a message can stop it: kombu's decompression is bounded to its own codecs
(:mod:`worker.broker.compression`), and every consumer hands what it cannot decode to a
callback that sets it aside whole.

The steps and tasks are handed this app, explicitly, and ask it for the process's runtime
(:meth:`ActivityApp.runtime`): none of them imports another side's code.
"""

from __future__ import annotations

from celery import Celery

from worker.broker.compression import install as bound_decompression
from worker.deadletter.salvage import SalvageStep
from worker.ingest.step import IngestStep, QuarantineStep
from worker.ops.startup import connect_signals
from worker.ops.status import COMMAND as STATUS_COMMAND  # noqa: F401  (registers the command)
from worker.runtime import Runtime, runtime_of
from worker.upload.step import UploadStep
from worker.upload.task import register


class ActivityApp(Celery):  # type: ignore[misc]  # Celery ships no type information
    """The worker's Celery app: it also gives each part the process's :class:`Runtime`."""

    #: Task events flushed by the event loop only (:mod:`worker.upload.pool`).
    events_cls = "worker.upload.pool:LoopEvents"

    def runtime(self) -> Runtime:
        return runtime_of(self)


bound_decompression()
app = ActivityApp("netcore_activity")
app.config_from_object("config.celeryconfig")
register(app)
app.steps["consumer"].add(IngestStep)
app.steps["consumer"].add(QuarantineStep)
app.steps["consumer"].add(UploadStep)
app.steps["consumer"].add(SalvageStep)
connect_signals(app, lambda: app.runtime().metrics)

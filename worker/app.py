"""The Celery app: configured by name from :mod:`config.celeryconfig`, nothing else.

``celery -A worker.app worker`` runs the worker, one process:

- its event loop runs the consumer of ``activities`` (:class:`worker.ingest.step.IngestStep`),
  the upload flow that steers it (:class:`worker.upload.step.UploadFlowStep`), the salvage of
  rejected messages (:class:`worker.deadletter.salvage.SalvageStep`) and Celery's own task consumer;
- its thread pool runs the ``activities.upload`` tasks, many uploads in flight at once.
"""

from __future__ import annotations

from celery import Celery

from worker.ingest.step import IngestStep, QuarantineStep
from worker.runtime import runtime_of
from worker.deadletter.salvage import SalvageStep
from worker.ops.startup import connect_signals
from worker.ops.status import COMMAND as STATUS_COMMAND  # noqa: F401  (registers the command)
from worker.upload.step import UploadFlowStep
from worker.upload.task import register

app = Celery("netcore_activity")
app.config_from_object("config.celeryconfig")
register(app, runtime_of)
app.steps["consumer"].add(IngestStep)
app.steps["consumer"].add(QuarantineStep)
app.steps["consumer"].add(UploadFlowStep)
app.steps["consumer"].add(SalvageStep)
connect_signals(app)

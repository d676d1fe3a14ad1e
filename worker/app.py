"""The Celery app: configured by name from :mod:`config.celeryconfig`, nothing else.

``celery -A worker.app worker`` runs the worker: Celery's own task consumer runs the upload
tasks, and :class:`worker.consumer.IngestStep` adds the consumer of the ``activities`` queue.
"""

from __future__ import annotations

from celery import Celery

from worker.consumer import IngestStep
from worker.startup import connect_signals

app = Celery("netcore_activity", include=["worker.tasks"])
app.config_from_object("config.celeryconfig")
app.steps["consumer"].add(IngestStep)
connect_signals(app)

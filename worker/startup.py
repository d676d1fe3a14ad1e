"""What happens when a worker process starts: settings checked, logging tamed, Sentry set up.

Connected to Celery's signals by :func:`connect_signals`, so ``celery -A worker.app worker``
refuses to start with a bad setting, naming it, before it consumes anything.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_init, worker_process_shutdown

from config.settings import Settings, load_or_exit
from worker import logs, metrics, observability

logger = logging.getLogger(__name__)


def setup_sentry(settings: Settings) -> None:
    """Send errors to Sentry when ``SENTRY_DSN`` is set; never personal data or secrets.

    The set-up, the scrubber and the failure fingerprints live in :mod:`worker.observability`,
    where they can be read (and tested) together.
    """
    observability.setup_sentry(settings)


def connect_signals(app: Celery) -> None:
    """Hook start-up checks into the worker."""

    @worker_init.connect(weak=False)
    def on_worker_init(sender: Any = None, **kwargs: Any) -> None:
        settings = load_or_exit()
        setup_sentry(settings)
        logging.getLogger("amqp").setLevel(logging.WARNING)
        logger.info("Settings: %r (broker %s)", settings, settings.broker_url_redacted)
        metrics.setup(settings)

    @after_setup_logger.connect(weak=False)
    @after_setup_task_logger.connect(weak=False)
    def on_setup_logger(sender: Any = None, **kwargs: Any) -> None:
        # LOG_FORMAT=json: one JSON object per line (worker.logs), in the main and pool processes
        configured = kwargs.get("logger")
        if isinstance(configured, logging.Logger) and load_or_exit(require_api=False).log_format == "json":
            logs.install(configured)

    @worker_process_shutdown.connect(weak=False)
    def on_worker_process_shutdown(sender: Any = None, **kwargs: Any) -> None:
        # Pool processes end with os._exit: without this, the last errors they queued for
        # Sentry (often the ones explaining why the process ended) would be lost.
        observability.flush_sentry()
        metrics.process_dead(kwargs.get("pid"))

"""What happens when a worker process starts: settings checked, logging tamed, Sentry set up.

Connected to Celery's signals by :func:`connect_signals`, so ``celery -A worker.app worker``
refuses to start with a bad setting, naming it, before it consumes anything.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init

from config.settings import Settings, load_or_exit

logger = logging.getLogger(__name__)


def setup_sentry(settings: Settings) -> None:
    """Send errors to Sentry when ``SENTRY_DSN`` is set; never personal data or secrets."""
    if not settings.sentry_dsn:
        return
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        send_default_pii=False,
        include_local_variables=False,
        integrations=[CeleryIntegration(), LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
    )


def connect_signals(app: Celery) -> None:
    """Hook start-up checks into the worker."""

    @worker_init.connect(weak=False)
    def on_worker_init(sender: Any = None, **kwargs: Any) -> None:
        settings = load_or_exit()
        setup_sentry(settings)
        logging.getLogger("amqp").setLevel(logging.WARNING)
        logger.info("Settings: %r (broker %s)", settings, settings.broker_url_redacted)

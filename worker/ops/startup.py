"""What happens when the worker starts: settings checked, queues declared, logging tamed, Sentry set up.

Connected to Celery's signals by :func:`connect_signals`, so ``celery -A worker.app worker``
refuses to start with a bad setting, naming it, before it consumes anything.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import amqp
from celery.signals import after_setup_logger, after_setup_task_logger, worker_init, worker_shutdown

from config.settings import Settings
from worker.broker.connection import TLSRefused, connect
from worker.broker.topology import Topology
from worker.errors import SettingsError
from worker.ops import logs, sentry
from worker.ops.metrics import Metrics
from worker.ops.metrics import setup as serve_metrics

logger = logging.getLogger(__name__)

#: Added when Celery's task queue exists as a classic queue in a cluster: who declared it so.
TASK_QUEUE_HINT = (" Celery producers declare it too: in a cluster, give them "
                   "task_default_queue_type=\"quorum\" (the README's Scaling out).")


#: A quorum queue of dead letters made before it had its delivery limit (worker.broker.topology).
DEAD_LETTER_LIMIT_HINT = (
    "Queue %r was made by an earlier version, without a delivery limit of its own: on RabbitMQ 4.x a dead "
    "letter there is dropped after about 20 reads (each dead-letter command reads it). Lift the limit with a "
    "policy: rabbitmqctl set_policy --apply-to quorum_queues netcore-dead-letters '^%s$' "
    "'{\"delivery-limit\": 1000000}'")


def declare_queues(settings: Settings) -> None:
    """Declare every queue of the worker now, so that tools and monitors find them from the
    start; exit with one line when one exists with other arguments (made by another version,
    or with another ACTIVITY_QUEUE_TYPE), which the broker refuses to change; exit with one line
    when TLS with the broker fails in a way trying again cannot mend (worker.broker.connection)."""
    topology = Topology.of(settings)
    try:
        connection = connect(settings.broker_url, retries=30, ssl=settings.broker_ssl())  # RabbitMQ may be starting
    except TLSRefused as exc:
        print(f"netcore-activity-worker: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    with connection:
        for queue in topology.all_queues():
            channel = connection.channel()
            try:
                queue(channel).declare()
            except amqp.exceptions.PreconditionFailed as exc:
                if queue.name in (topology.dead_letter, topology.unhandled):
                    logger.warning(DEAD_LETTER_LIMIT_HINT, queue.name, queue.name.replace(".", r"\."))
                    continue  # made by an earlier version, without the delivery limit: usable as it is
                print(f"netcore-activity-worker: queue {queue.name!r} already exists with other arguments "
                      f"({exc.reply_text}). A queue's type and arguments are fixed when it is created: let it "
                      "drain (with the worker that made it), delete it, and start again."
                      + (TASK_QUEUE_HINT if queue.name == topology.task_source and topology.quorum else ""),
                      file=sys.stderr)
                raise SystemExit(2) from None
            finally:
                try:
                    channel.close()
                except Exception:  # closed by the broker's refusal
                    pass


def connect_signals(app: Any, metrics_of: Callable[[], Metrics]) -> None:
    """Hook start-up checks into the worker. ``app.conf.netcore_settings`` holds the settings,
    read once; ``metrics_of()`` gives the process's metrics, to serve."""

    @worker_init.connect(weak=False)
    def on_worker_init(sender: Any = None, **kwargs: Any) -> None:
        settings: Settings = app.conf.netcore_settings
        try:
            settings.check_api_key()
        except SettingsError as exc:
            print(f"netcore-activity-worker: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        sentry.setup_sentry(settings)
        logging.getLogger("amqp").setLevel(logging.WARNING)
        logging.getLogger("urllib3").setLevel(logging.WARNING)
        logger.info("Settings: %r (broker %s)", settings, settings.broker_url_redacted)
        declare_queues(settings)
        serve_metrics(settings, metrics_of())

    @after_setup_logger.connect(weak=False)
    @after_setup_task_logger.connect(weak=False)
    def on_setup_logger(sender: Any = None, **kwargs: Any) -> None:
        # LOG_FORMAT=json: one JSON object per line (worker.ops.logs)
        configured = kwargs.get("logger")
        if isinstance(configured, logging.Logger) and app.conf.netcore_settings.log_format == "json":
            logs.install(configured)

    @worker_shutdown.connect(weak=False)
    def on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
        # the last errors queued for Sentry (often the ones explaining why the worker stops)
        sentry.flush_sentry()

"""The Celery configuration, loaded by name: ``app.config_from_object("config.celeryconfig")``.

Every value comes from :mod:`config.settings`; nothing here reads the environment itself.
The reliability settings are the point of this file: messages are acknowledged late, a
killed pool process puts its task back, failures are never acknowledged, and every
publish waits for the broker's confirm.
"""

from __future__ import annotations

from kombu import Queue

from config.settings import load_or_exit

#: Broker-side settings only: the API key is checked when the worker starts, so that
#: the dead-letter command and producers can load this module without one.
SETTINGS = load_or_exit(require_api=False)

broker_url = SETTINGS.broker_url
broker_connection_retry_on_startup = True
#: Wait for RabbitMQ's confirm on every publish Celery makes (our own publisher groups them).
broker_transport_options = {"confirm_publish": True}

#: Upload tasks: acknowledged only after they finished, put back if their process dies,
#: and never acknowledged on failure (the task turns every failure into a retry or a
#: dead letter itself; an exception reaching Celery means "could not even do that").
task_acks_late = True
task_reject_on_worker_lost = True
task_acks_on_failure = False
task_acks_on_timeout = False
worker_cancel_long_running_tasks_on_connection_loss = True
#: An upload task holds up to 1000 events: one at a time per pool process.
worker_prefetch_multiplier = 1

task_default_queue = SETTINGS.upload_queue
task_queues = (Queue(SETTINGS.upload_queue, durable=True),)
task_routes = {"activities.upload": {"queue": SETTINGS.upload_queue}}
task_serializer = "json"
#: JSON, and the upload tasks' own JSON type (worker.messages: the same bytes, read faster).
accept_content = ["json", "application/x-netcore-batch+json"]
task_ignore_result = True
result_backend = None

#: Flower follows tasks through these events.
worker_send_task_events = True
task_send_sent_event = False

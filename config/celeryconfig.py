"""The Celery configuration, loaded by name: ``app.config_from_object("config.celeryconfig")``.

Every value comes from :mod:`config.settings`; nothing here reads the environment itself.
The reliability settings are the point of this file: messages are acknowledged late, failures
are never acknowledged, every publish waits for the broker's confirm, and uploads run on a
thread pool, so that many are in flight whatever the number of cores.
"""

from __future__ import annotations

from config.settings import load_or_exit
from worker.broker import tls

#: The most upload threads one worker process runs, whatever the number of accounts.
MAX_THREADS = 512

#: Broker-side settings only: the API key is checked when the worker starts, so that
#: the dead-letter command and producers can load this module without one.
SETTINGS = load_or_exit(require_api=False)

#: The settings themselves, read once per process: the worker's parts take them from the app's
#: configuration (``app.conf.netcore_settings``) instead of reading the environment again.
netcore_settings = SETTINGS

broker_url = SETTINGS.broker_url
#: TLS for an amqps:// broker (config.tls): the CA bundle, the client certificate. Each node of
#: the URL list is checked against its own name by the amqps transport registered here
#: (worker.broker.tls: kombu's own would check every node against the first one's name).
broker_use_ssl = SETTINGS.broker_ssl() or False
tls.register()
broker_connection_retry_on_startup = True
#: After a lost connection (a broker restarted, a network partition), reconnect for as long as it
#: takes: Celery's default gives up after 100 attempts (about 45 minutes) and ends the worker.
broker_connection_max_retries = None
#: AMQP heartbeats on Celery's connections (the consumer, with remote control on it, and task
#: events), in seconds. Each side takes a peer for dead after two intervals without a byte from
#: it (RabbitMQ after two to three): 30 to 45 s here. Until then RabbitMQ holds a dead
#: connection's unacknowledged messages and its exclusive remote-control queue (worker.consumer
#: waits for it); Celery's default of 120 s made that up to six minutes after a network
#: partition. The event loop checks them every ``15 / broker_heartbeat_checkrate`` (3) = 5 s:
#: a loop that stops for more than 30 s would be taken for a dead connection and reconnect.
broker_heartbeat = 15
#: Celery's own publishes in the worker (task events, its heartbeat events, remote-control
#: replies) are fire-and-forget: none carries an event. They are made on the event loop, and
#: waiting there for RabbitMQ's confirm would stop the loop for as long as the broker does not
#: answer: during a memory or disk alarm (RabbitMQ blocks publishers) that is until the alarm
#: clears. Everything the worker must not lose is published by its own publishers, confirmed,
#: off the loop (worker.broker.background, worker.broker.publisher).
broker_transport_options = {"confirm_publish": False}

#: Uploads wait on the network, not on the CPU: threads, as many as uploads may be in flight
#: (UPLOAD_CONCURRENCY per account: each account's limit is its own). How many actually are is
#: adapted to each account's API (worker.upload.flow sets each upload queue's prefetch), so a
#: task never waits in the worker for a free thread.
worker_pool = "worker.upload.pool:UploadThreadPool"
worker_concurrency = min(MAX_THREADS, SETTINGS.upload_concurrency * max(1, len(SETTINGS.accounts)))
worker_prefetch_multiplier = 1

#: Upload tasks: acknowledged only after they finished, and never acknowledged on failure
#: (the task turns every failure into a retry or a dead letter itself; an exception reaching
#: Celery means "could not even do that", and the rejected message is dead-lettered).
task_acks_late = True
task_reject_on_worker_lost = True
task_acks_on_failure = False
task_acks_on_timeout = False
#: On a lost connection, the uploads running finish (a thread cannot be killed: see
#: worker.upload.pool); their messages come back and are recognised (worker.upload.seen).
worker_cancel_long_running_tasks_on_connection_loss = True
#: The upload flow sets the upload queue's prefetch (worker.upload.flow): Celery's own lowering
#: and raising of it after a reconnect would fight it.
worker_enable_prefetch_count_reduction = False
#: Celery's consumer without its native delayed delivery (worker.consumer says why): retries
#: wait in the worker's own delay queues.
worker_consumer = "worker.consumer:Consumer"


def _task_queues() -> tuple[object, ...]:
    from worker.broker.topology import Topology  # the topology needs kombu only

    return (Topology.of(SETTINGS).upload_queue(),)


task_default_queue = SETTINGS.upload_queue
task_queues = _task_queues()
task_routes = {"activities.upload": {"queue": SETTINGS.upload_queue}}
task_serializer = "json"
#: JSON, and the upload tasks' own JSON type (worker.broker.messages: the same bytes, read faster).
accept_content = ["json", "application/x-netcore-batch+json"]
task_ignore_result = True
result_backend = None

#: Flower follows tasks through these events.
worker_send_task_events = True
task_send_sent_event = False

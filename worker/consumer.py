"""The worker's consumer: Celery's, without the native delayed delivery step.

Celery (5.5+) adds a ``DelayedDelivery`` step to every consumer whose queues include a quorum
queue: at each start, and again after each reconnection, it declares 28 ``celery_delayed_*``
quorum queues and three exchanges on *every* broker URL of the failover list, retrying each
unreachable one for about 10 s (measured: 15 s without consuming after a cluster node died).
This worker never uses ETA or countdown tasks, its retries wait in its own delay queues
(:mod:`worker.broker.topology`), so that step would only slow down a failover and add queues
nobody reads. Loaded by name: ``worker_consumer`` in :mod:`config.celeryconfig`.
"""

from __future__ import annotations

from celery.worker.consumer import Consumer as CeleryConsumer

#: The step left out of Celery's consumer blueprint.
LEFT_OUT = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class Consumer(CeleryConsumer):  # type: ignore[misc]  # Celery ships no type information
    """Celery's consumer with every default step but :data:`LEFT_OUT`."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]  # the same: Any to mypy
        default_steps = [step for step in CeleryConsumer.Blueprint.default_steps if step != LEFT_OUT]

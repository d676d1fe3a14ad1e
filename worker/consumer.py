"""The worker's consumer: Celery's, without the native delayed delivery step, and setting aside
(never deleting, never logging) what it cannot take.

Celery (5.5+) adds a ``DelayedDelivery`` step to every consumer whose queues include a quorum
queue: at each start, and again after each reconnection, it declares 28 ``celery_delayed_*``
quorum queues and three exchanges on *every* broker URL of the failover list, retrying each
unreachable one for about 10 s (measured: 15 s without consuming after a cluster node died).
This worker never uses ETA or countdown tasks, its retries wait in its own delay queues
(:mod:`worker.broker.topology`), so that step would only slow down a failover and add queues
nobody reads. Loaded by name: ``worker_consumer`` in :mod:`config.celeryconfig`.

Celery's own handling of a task message it cannot take (no task headers, a task it does not
know, arguments it cannot read, a body it cannot decode) logs the message's body, which holds
events and so personal data, and in two of the four cases acknowledges, deleting it. Here each
rejects the message without requeue, down its queue's dead-letter route to the salvage
(:mod:`worker.deadletter.salvage`), which keeps it whole, and logs one line without the body.
These are class methods, so they hold from the first connection on (Celery binds
``on_decode_error`` when its task consumer is made).
"""

from __future__ import annotations

from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from worker.upload.step import set_aside

#: The step left out of Celery's consumer blueprint.
LEFT_OUT = "celery.worker.consumer.delayed_delivery:DelayedDelivery"


class Consumer(CeleryConsumer):  # type: ignore[misc]  # Celery ships no type information
    """Celery's consumer with every default step but :data:`LEFT_OUT`."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]  # the same: Any to mypy
        default_steps = [step for step in CeleryConsumer.Blueprint.default_steps if step != LEFT_OUT]

    def on_unknown_message(self, body: Any, message: Any) -> None:
        set_aside(message, "a message without task headers")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        set_aside(message, f"a task message for {str((message.headers or {}).get('task'))[:100]!r}, which this "
                           "worker does not run")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        set_aside(message, f"a task message that is not valid ({type(exc).__name__})")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        set_aside(message, f"a message that could not be decoded ({type(exc).__name__})")


"""The one way the worker's own tools open a connection to RabbitMQ.

Used by the publishers, the dead-letter reader, the health check, the flow's queue depths and
the start-up declarations (Celery opens its own). ``url`` may be a failover list
(``amqp://node1//;amqp://node2//``): kombu tries the next node when one does not answer.
Heartbeats are off: these connections are used in bursts, by code that does not drain them in
between, and a dead one shows at its next use, which then connects anew.
"""

from __future__ import annotations

from kombu.connection import Connection


def connect(url: str, *, timeout: float = 10.0, retries: int = 3) -> Connection:
    """A connection, established now (``retries`` more tries, a second or so apart, then the
    error: kombu's ``OperationalError``, or an ``OSError``)."""
    connection = Connection(url, heartbeat=0, connect_timeout=timeout)
    connection.ensure_connection(max_retries=retries, interval_start=0.5, interval_step=1.0, interval_max=5.0,
                                 timeout=timeout * (retries + 1))
    return connection

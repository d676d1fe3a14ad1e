"""The one way the worker's own tools open a connection to RabbitMQ, and keep it alive.

Used by the publishers, the dead-letter reader, the health check, the broker watcher and the
start-up declarations (Celery opens its own, with the same heartbeat: :mod:`config.celeryconfig`).
``url`` may be a failover list (``amqp://node1//;amqp://node2//``): :func:`connect` tries every
node of it in turn, ``1 + retries`` times, before it gives up, so a first node that is down (or
silently drops packets, each try bounded by ``timeout``) costs one try, not the connection.

A long-lived connection has heartbeats (``heartbeat`` seconds), so that a peer that went away
without a word (a partition, a dead host) shows within about two heartbeats on both sides: the
broker closes our end and lets go of what it held, and we notice at our next tick. Heartbeats
only work when the owner calls :func:`keep_alive` every ``heartbeat / 2`` seconds or so, also
while it has nothing to publish: py-amqp sends nothing and reads nothing by itself. Short-lived
commands (the dead-letter command, the health check) pass ``heartbeat=0``: an operator's pause
at a prompt must not cost them their connection.

An ``amqps://`` URL takes the ``ssl`` options of the settings (``Settings.broker_ssl()``): every
caller passes them. A TLS refusal that trying again cannot mend (the broker's certificate is not
trusted or names another host, or the broker refused our certificate) from every node of the list
in turn ends the tries at once, and the error says in one line what to change
(:mod:`worker.broker.tls`): a wrong CA costs a worker's start-up a second, not its 30 tries.
"""

from __future__ import annotations

import socket
from typing import Any

import amqp
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from worker.broker import tls

tls.register()  # every amqps:// connection of the process checks each node against its own name

#: Errors that mean the channel or the connection is gone: Celery reconnects, the broker
#: redelivers what was in hand. Anything else while handling a message is the handler's bug.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (amqp.exceptions.ConnectionError,
                                                      amqp.exceptions.ChannelError, OSError)

#: Seconds between heartbeats on the worker's long-lived connections, as on Celery's (``broker_heartbeat``
#: in :mod:`config.celeryconfig`): both sides notice a dead peer within two to three of them.
HEARTBEAT = 15.0


class TLSRefused(OperationalError):
    """Each node of the list refused TLS in a way trying again cannot mend; the message says what to change."""


def connect(url: str, *, timeout: float = 10.0, retries: int = 3, heartbeat: float = 0.0,
            ssl: Any = None) -> Connection:
    """A connection, established now: every node of the list tried in turn, then again
    ``retries`` more rounds (a second or so between rounds), each try bounded by ``timeout``;
    then the error (kombu's ``OperationalError``, or an ``OSError``). ``ssl``: kombu's TLS
    options, or None. A TLS refusal from every node in turn ends the tries (the module docstring)."""
    connection = Connection(url, heartbeat=heartbeat, connect_timeout=timeout, ssl=ssl or False)
    nodes = len([part for part in url.split(";") if part.strip()]) or 1
    rounds = 1 + max(0, retries)
    refusals = 0  # permanent TLS refusals in a row: one from each node ends the tries

    def on_error(error: BaseException, interval: float) -> None:  # before kombu moves to the next node
        nonlocal refusals
        refusals = refusals + 1 if tls.is_permanent(error) else 0
        if refusals >= nodes:
            raise TLSRefused(tls.explain(error, node=connection.host, options=ssl) or str(error)) from error

    try:
        connection.ensure_connection(errback=on_error, max_retries=nodes * rounds - 1, interval_start=0.5,
                                     interval_step=1.0, interval_max=5.0, timeout=(timeout + 5.0) * nodes * rounds)
    except TLSRefused:
        raise
    except (OperationalError, OSError) as error:
        line = tls.explain(error, node=connection.host, options=ssl)  # the last node tried
        if line is None:
            raise
        raise OperationalError(line) from error
    return connection


def keep_alive(connection: Connection) -> None:
    """Read what the broker sent meanwhile (its heartbeats, without blocking), and send a
    heartbeat if one is due; raises the connection's error when the broker has been silent for
    too long (it is gone: open a new connection)."""
    if not connection.connected:
        return
    try:
        connection.drain_events(timeout=0)
    except socket.timeout:
        pass
    connection.heartbeat_check()

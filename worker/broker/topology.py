"""Every queue the worker uses, declared in one place, with the arguments that make them safe.

========================  ===============================================================
``activities``            producers' events (plain JSON). Declared as producers declare it:
                          no arguments but the queue type, or their own declarations fail.
``celery``                ``send_task("activities.ingest", ...)`` messages, declared as a
                          Celery producer declares it: no arguments but the queue type (a
                          producer in a cluster sets ``task_default_queue_type="quorum"``).
``activities.upload``     one Celery task message per bundle of batches, for the ``default``
                          account (``NETCORE_API_KEY``); ``activities.upload.<account>`` for
                          each account of the accounts file. Dead-letters what is rejected
                          to ``activities.dead.unhandled``.
``<upload queue>.``       retries waiting in RabbitMQ, never in a worker: one queue per
``delay.<ms>ms``          delay (``x-message-ttl``) and account, dead-lettering back to that
                          account's upload queue when the time is up.
``activities.quarantine``  a message a quorum queue delivered ``ACTIVITY_DELIVERY_LIMIT``
                          times (a suspect), handled there alone before it may be called
                          ``poison``. Dead-letters what is rejected to ``.unhandled``.
``activities.dead``       one envelope per event that can never be delivered (the contract).
``activities.dead.``      messages RabbitMQ dead-lettered because a worker rejected them
``unhandled``             (a bug, an unknown task): the worker writes each of their events to
                          ``activities.dead`` as an envelope (:mod:`worker.upload.salvage`).
========================  ===============================================================

With ``ACTIVITY_QUEUE_TYPE=quorum`` every queue is a quorum queue, replicated on the cluster's
nodes, and dead-lettering out of the worker's own is ``at-least-once`` (RabbitMQ 3.10+), so a
retry waiting in a delay queue survives a node failure. A classic queue lives on one node: when
that node dies the queue is gone until it comes back, and so would the worker's consumer be.

Each account has its upload queue and its ladder of delay queues: what waits for an account
that is down waits there, in RabbitMQ, and the consumer of ``activities`` goes on serving the
others (:mod:`worker.upload.flow`).

Delays are a ladder of queues, 100 ms doubling up to the longest wait the settings allow; a
delay is rounded down to a rung (or up, when a server's ``Retry-After`` asks for at least that
long). Each retry is a new message published by the worker, so RabbitMQ's dead-letter cycle
detection (which drops a message that comes back to a queue it expired from, without a
rejection in between) never sees the same message twice.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kombu.entity import Queue

from config.accounts import DEFAULT
from config.settings import Settings

#: The shortest rung of the delay ladder, in milliseconds; each rung doubles the one before.
SHORTEST_DELAY_MS = 100

#: Arguments every quorum queue the worker declares gets: replicated, and (where it
#: dead-letters) at-least-once dead-lettering, which requires ``reject-publish`` overflow.
QUORUM = {"x-queue-type": "quorum"}
AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}

#: The delivery limit of the quorum queues that hold dead letters: in effect none. RabbitMQ 4.x
#: gives a quorum queue a limit of 20 deliveries unless told otherwise, and counts every message a
#: client reads and hands back; the dead-letter command does that each time it counts or lists,
#: so a dead letter would be dropped after about 20 commands. (-1 would mean "no limit" on 4.x
#: but "drop at once" on 3.10: a large number means the same on both.)
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000


def delay_ladder(longest: float) -> tuple[int, ...]:
    """Rungs in milliseconds, from :data:`SHORTEST_DELAY_MS` doubling until one reaches ``longest`` s."""
    rungs = [SHORTEST_DELAY_MS]
    while rungs[-1] < longest * 1000:
        rungs.append(rungs[-1] * 2)
    return tuple(rungs)


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Queue names and arguments, derived from the settings; see the module docstring."""

    source: str
    task_source: str
    upload: str
    quarantine: str
    dead_letter: str
    unhandled: str
    quorum: bool
    #: Delay rungs, milliseconds, ascending.
    rungs: tuple[int, ...]
    #: The accounts' names (each has an upload queue and delay queues of its own).
    accounts: tuple[str, ...] = (DEFAULT,)

    @classmethod
    def of(cls, settings: Settings) -> Topology:
        longest = max(settings.retry_backoff_max, settings.probe_interval_max)
        return cls(
            source=settings.queue,
            task_source=settings.task_queue,
            upload=settings.upload_queue,
            quarantine=f"{settings.queue}.quarantine",
            dead_letter=settings.dead_letter_queue,
            unhandled=f"{settings.dead_letter_queue}.unhandled",
            quorum=settings.queue_type == "quorum",
            rungs=delay_ladder(longest),
            accounts=tuple(settings.accounts.names) or (DEFAULT,),
        )

    def upload_for(self, account: str = DEFAULT) -> str:
        """The upload queue of ``account``: ``activities.upload`` for ``default``, else
        ``activities.upload.<account>``."""
        return self.upload if account == DEFAULT else f"{self.upload}.{account}"

    # --- the queues ---------------------------------------------------------------------------

    def source_queue(self) -> Queue:
        """``activities``: exactly as producers declare it (the README's examples)."""
        return Queue(self.source, durable=True, queue_arguments=dict(QUORUM) if self.quorum else None)

    def task_source_queue(self) -> Queue:
        """Celery's default queue, as a Celery producer declares it (with
        ``task_default_queue_type="quorum"`` in a cluster)."""
        return Queue(self.task_source, durable=True, queue_arguments=dict(QUORUM) if self.quorum else None)

    def upload_queue(self, account: str = DEFAULT) -> Queue:
        """An account's upload tasks' queue: what a worker rejects goes to :attr:`unhandled`."""
        return Queue(self.upload_for(account), durable=True, queue_arguments=self._dead_lettering(self.unhandled))

    def quarantine_queue(self) -> Queue:
        """Suspects, handled one at a time: what a worker rejects goes to :attr:`unhandled`."""
        return Queue(self.quarantine, durable=True, queue_arguments=self._dead_lettering(self.unhandled))

    def delay_queue(self, rung_ms: int, account: str = DEFAULT) -> Queue:
        """The queue where an account's retry waits ``rung_ms``, then goes back to its upload queue."""
        arguments = {"x-message-ttl": rung_ms, **self._dead_lettering(self.upload_for(account))}
        return Queue(self.delay_name(rung_ms, account), durable=True, queue_arguments=arguments)

    def delay_name(self, rung_ms: int, account: str = DEFAULT) -> str:
        return f"{self.upload_for(account)}.delay.{rung_ms}ms"

    def dead_letter_queue(self) -> Queue:
        """The dead letters: read again and again by people, so no delivery limit on a quorum queue."""
        return Queue(self.dead_letter, durable=True, queue_arguments=dead_letter_arguments(self.quorum))

    def unhandled_queue(self) -> Queue:
        return Queue(self.unhandled, durable=True, queue_arguments=dead_letter_arguments(self.quorum))

    def delay_queues(self, account: str = DEFAULT) -> list[Queue]:
        return [self.delay_queue(rung, account) for rung in self.rungs]

    def upload_queues(self) -> list[Queue]:
        """Every account's upload queue and delay queues."""
        return [queue for account in self.accounts
                for queue in (self.upload_queue(account), *self.delay_queues(account))]

    def all_queues(self) -> list[Queue]:
        """Every queue of the worker: declared at start-up, so tools and monitors find them all."""
        return [self.source_queue(), self.task_source_queue(), *self.upload_queues(), self.quarantine_queue(),
                self.dead_letter_queue(), self.unhandled_queue()]

    def publish_targets(self) -> list[Queue]:
        """The queues the worker publishes to (declared by each publisher before its first message)."""
        return [self.source_queue(), *self.upload_queues(), self.quarantine_queue(), self.dead_letter_queue()]

    # --- delays -------------------------------------------------------------------------------

    def rung_for(self, seconds: float, *, at_least: bool = False) -> int | None:
        """The rung (ms) a wait of ``seconds`` uses: the longest not above it, or with
        ``at_least`` the shortest not below it (capped at the longest rung). None: no wait."""
        wanted = seconds * 1000
        if wanted <= 0 or (wanted < self.rungs[0] and not at_least):
            return None
        if at_least:
            index = bisect.bisect_left(self.rungs, wanted)
            return self.rungs[min(index, len(self.rungs) - 1)]
        return self.rungs[bisect.bisect_right(self.rungs, wanted) - 1]

    def _dead_lettering(self, target: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target}
        if self.quorum:
            arguments.update(QUORUM)
            arguments.update(AT_LEAST_ONCE)
        return arguments


def dead_letter_arguments(quorum: bool) -> dict[str, Any] | None:
    """The arguments of a queue of dead letters (see :data:`DEAD_LETTER_DELIVERY_LIMIT`)."""
    return {**QUORUM, "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT} if quorum else None


def declare(channel: Any, queues: Sequence[Queue]) -> None:
    """Declare ``queues`` on ``channel`` (a kombu/py-amqp channel)."""
    for queue in queues:
        queue(channel).declare()

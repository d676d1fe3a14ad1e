"""Publishing for the event loop, on a thread of its own: the loop hands messages over and goes on.

The consumers' callbacks run on the worker's event loop, which also reads every delivery and
heartbeat of Celery's connection and runs its timers. Publishing there and waiting for the
broker's confirm would stop all of that for a round trip at best, and at worst for a whole
reconnection (a connect per node of the list, the declarations) or a confirm timeout. So the
loop gives each group of messages to a :class:`BackgroundPublisher`, with a callback, and goes
on; the publisher's thread publishes (the groups waiting, together, in one confirm round trip),
waits for the broker, and hands each group's result back to the loop with ``call_soon`` (kombu's
hub runs it there, waking the loop). Between groups it keeps its connection's heartbeats going.

A group the broker refused as part of several is tried again alone, so that each callback hears
about its own messages only (a message over the broker's ``max_message_size`` fails its group, no
other); when the broker did not answer at all, every group waiting is told at once.
On a warm shutdown the loop no longer runs: :meth:`BackgroundPublisher.drain` then waits for the
results and runs their callbacks on the calling thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker.broker.publisher import Outgoing, Publisher
from worker.errors import PublishError

logger = logging.getLogger(__name__)

#: Messages published in one confirm round trip at most (groups are never split).
MAX_GROUP = 2000

#: The callback of a group: None once the broker confirmed every message, else why not.
DoneFn = Callable[[PublishError | None], None]


class Submitter(Protocol):
    """What the loop's publishing code needs: hand a group over, hear back on the loop."""

    def submit(self, messages: Sequence[Outgoing], done: DoneFn) -> None: ...

    def drain(self, timeout: float) -> bool: ...


@dataclass(eq=False)
class _Job:
    messages: Sequence[Outgoing]
    done: DoneFn


class BackgroundPublisher:
    """See the module docstring. ``call_soon(fn)`` must run ``fn`` on the event loop."""

    def __init__(self, publisher: Publisher, *, call_soon: Callable[[Callable[[], None]], Any],
                 max_group: int = MAX_GROUP, name: str = "loop-publisher") -> None:
        self.publisher = publisher
        self.call_soon = call_soon
        self.max_group = max_group
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[_Job, PublishError | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: Groups submitted whose callback has not run yet.
        self._unreported = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Groups handed over whose callback has not run yet."""
        with self._lock:
            return self._unreported

    def submit(self, messages: Sequence[Outgoing], done: DoneFn) -> None:
        """Publish ``messages`` (thread-safe); ``done`` runs on the loop with the result."""
        with self._lock:
            self._unreported += 1
        self._jobs.put(_Job(list(messages), done))

    def deliver(self) -> None:
        """Run the callbacks of every result so far (on the loop: ``call_soon`` schedules this)."""
        while True:
            try:
                job, error = self._results.get_nowait()
            except queue.Empty:
                return
            self._report(job, error)

    def drain(self, timeout: float) -> bool:
        """Wait until every group handed over has reported, running the callbacks here (the loop
        is not running: a warm shutdown); False if some had not by the deadline."""
        deadline = time.monotonic() + timeout
        while self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                job, error = self._results.get(timeout=remaining)
            except queue.Empty:
                return False
            self._report(job, error)
        return True

    def close(self) -> None:
        """Stop the thread once the groups handed over are published; close the connection."""
        self._jobs.put(None)
        self._thread.join(timeout=5.0)
        self.publisher.close()

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        idle = self.publisher.heartbeat / 4 if self.publisher.heartbeat else None
        while True:
            try:
                first = self._jobs.get(timeout=idle)
            except queue.Empty:
                self.publisher.keep_alive()
                continue
            if first is None:
                return
            group, stop = [first], False
            size = len(first.messages)
            while size < self.max_group:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                group.append(job)
                size += len(job.messages)
            self._publish(group)
            if stop:
                return

    def _publish(self, group: list[_Job]) -> None:
        try:
            self.publisher.publish([message for job in group for message in job.messages])
        except PublishError as exc:
            if len(group) == 1 or not exc.refused:  # no answer at all: every group is told at once
                for job in group:
                    self._result(job, exc)
                return
            for job in group:  # tried again one by one: each hears about its own messages
                try:
                    self.publisher.publish(job.messages)
                except PublishError as own:
                    self._result(job, own)
                except Exception as own:  # a bug: reported, never lost
                    self._result(job, PublishError(f"unexpected {type(own).__name__}: {own}"))
                else:
                    self._result(job, None)
            return
        except Exception as exc:  # a bug in publishing: each group is told, the thread goes on
            logger.exception("Unexpected error publishing %d groups", len(group))
            for job in group:
                self._result(job, PublishError(f"unexpected {type(exc).__name__}: {exc}"))
            return
        for job in group:
            self._result(job, None)

    def _result(self, job: _Job, error: PublishError | None) -> None:
        self._results.put((job, error))
        try:
            self.call_soon(self.deliver)
        except Exception:  # no loop (shutting down): drain() delivers it
            logger.debug("Could not schedule a publish result on the loop", exc_info=True)

    def _report(self, job: _Job, error: PublishError | None) -> None:
        with self._lock:
            self._unreported -= 1
        try:
            job.done(error)
        except Exception:  # a callback's bug must not stop the others
            logger.exception("A publish callback failed")

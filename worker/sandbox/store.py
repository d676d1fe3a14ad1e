"""What the sandbox saw: accepted and dropped events, one record per upload request, the faults.

All of it sits behind one lock, with a condition notified after every request, so a test can
wait for "200 events accepted" without a polling loop (:meth:`Store.wait_until`).

Accepted events are kept as the request bodies they arrived in, zlib-compressed, and parsed
again only when someone asks for them: a benchmark that pushes 200,000 events holds a few
megabytes instead of the best part of a gigabyte of Python dicts (about 2 kB per event).
The price is that :meth:`Store.accepted` re-parses on every call, so predicates given to
:meth:`Store.wait_until` should use the cheap :meth:`Store.accepted_count`.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.sandbox.faults import Decision, FaultPlan
from worker.sandbox.rules import parse_body


@dataclass(frozen=True)
class RequestRecord:
    """One upload request as the sandbox answered it (never the events' personal data)."""

    status: int | None  #: the HTTP status answered; None when a fault dropped the connection
    events: int  #: how many events the body held (0 when unread or not parseable)
    asset_ids: tuple[str, ...]  #: distinct asset ids in the body; more than one = a worker bug
    fault: dict[str, Any] | None  #: the fault rule that shaped the answer, if any
    at: float = field(default_factory=time.time)  #: unix time the request arrived
    message: str = ""  #: the error message answered, "" on success
    account: str | None = None  #: the account whose key the request carried (None: no valid key)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values; written out by hand, as ``dataclasses.asdict``
        (a deep copy) costs ten times as much and a benchmark reads 100,000 of them."""
        return {"status": self.status, "events": self.events, "asset_ids": list(self.asset_ids),
                "fault": self.fault, "at": self.at, "message": self.message, "account": self.account}


#: zlib level for stored bodies: level 1 already shrinks repetitive JSON several times, fast.
COMPRESSION_LEVEL = 1


@dataclass(frozen=True)
class _Batch:
    """Stored events as they arrived: a compressed request body and which of its events count."""

    compressed: bytes
    indexes: list[int] | None  #: None = every event in the body
    account: str | None = None  #: whose key uploaded them

    def events(self) -> list[Any]:
        events = parse_body(zlib.decompress(self.compressed))
        return events if self.indexes is None else [events[index] for index in self.indexes]


class Store:
    """Thread-safe memory of the sandbox. Every method takes the one lock."""

    def __init__(self, seed: int | None = None) -> None:
        self.lock = threading.RLock()  #: re-entrant: wait_until predicates call back in
        self.changed = threading.Condition(self.lock)
        self.faults = FaultPlan(seed)
        self._batches: list[_Batch] = []
        self._accepted_by: dict[str | None, int] = {}
        self._dropped: list[dict[str, Any]] = []
        self._records: list[RequestRecord] = []
        self._delayed = 0

    def arrived(self, change: int) -> None:
        """Count requests held by a latency fault (+1 as one starts waiting, -1 as it ends)."""
        with self.lock:
            self._delayed += change
            self.changed.notify_all()

    def in_flight(self) -> int:
        """Upload requests received and held by a latency fault, not answered yet."""
        with self.lock:
            return self._delayed

    def decide_fault(self, asset_ids: Collection[str] = (), account: str | None = None) -> Decision:
        """What the faults do to an upload of ``account`` whose events carry ``asset_ids``."""
        with self.lock:
            return self.faults.decide(asset_ids, account)

    def record(
        self,
        record: RequestRecord,
        *,
        body: bytes = b"",
        stored: Sequence[int] = (),
        total: int = 0,
        dropped: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Remember one answered request; ``stored`` are the indexes of the body's events kept."""
        batch = None
        if stored:  # compressed before taking the lock: other requests need not wait for it
            indexes = None if len(stored) == total else list(stored)
            batch = _Batch(zlib.compress(body, COMPRESSION_LEVEL), indexes, record.account)
        with self.lock:
            self._records.append(record)
            if batch is not None:
                self._batches.append(batch)
                self._accepted_by[record.account] = self._accepted_by.get(record.account, 0) + len(stored)
            self._dropped.extend(dropped)
            self.changed.notify_all()

    def accepted(self, account: str | None = None) -> list[dict[str, Any]]:
        """Every stored event (of ``account``, when named), in arrival order: parsed afresh,
        outside the lock, on each call."""
        with self.lock:
            batches = [b for b in self._batches if account is None or b.account == account]
        return [event for batch in batches for event in batch.events()]

    def accepted_count(self, account: str | None = None) -> int:
        """How many events are stored (for ``account``, when named): cheap, so it suits
        :meth:`wait_until` predicates."""
        with self.lock:
            return sum(self._accepted_by.values()) if account is None else self._accepted_by.get(account, 0)

    def dropped(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self._dropped)

    def requests(self, since: int = 0) -> list[RequestRecord]:
        """The records of upload requests in arrival order, from position ``since`` on (0 is
        the first): a poller that asks for ``since=len(what it has)`` copies only what is new."""
        if since < 0:
            raise ValueError(f"since must be a position >= 0, not {since}")
        with self.lock:
            return self._records[since:]

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def reset(self) -> None:
        """Forget everything: events, records and faults; the random source starts over."""
        with self.lock:
            self._batches.clear()
            self._accepted_by.clear()
            self._dropped.clear()
            self._records.clear()
            self.faults.reset()
            self.changed.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` is true, re-checking after every request; False on timeout.

        The predicate runs with the lock held, so it sees a consistent state but must be quick.
        """
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

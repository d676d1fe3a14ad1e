"""The gate between uploads and ingest: may the consumer take new messages from ``activities``?

The upload side closes it (:mod:`worker.upload.flow`) when the API is down or when upload
tasks pile up in RabbitMQ faster than they are uploaded; the ingest side reads it on each of its
ticks and stops or resumes consuming (:mod:`worker.ingest.step`). Events then wait in
``activities``, durably, as they arrived. Neither side imports the other: both know the gate.
"""

from __future__ import annotations

import threading


class Gate:
    """Open (consume) or closed (do not), with the reason it is closed. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._reason = ""

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open

    @property
    def reason(self) -> str:
        """Why it is closed ("" when open)."""
        with self._lock:
            return self._reason

    def set(self, open_: bool, reason: str = "") -> bool:
        """Open or close it; return True when that changed something."""
        with self._lock:
            changed = open_ != self._open
            self._open, self._reason = open_, ("" if open_ else reason)
            return changed

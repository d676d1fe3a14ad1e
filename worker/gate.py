"""The gate between uploads and ingest: may the consumer take new messages from ``activities``?

The upload side closes it (:mod:`worker.upload.flow`) when the API is down or when upload
tasks pile up in RabbitMQ faster than they are uploaded; the ingest side reads it on each of its
ticks and stops or resumes consuming (:mod:`worker.ingest.step`). Events then wait in
``activities``, durably, as they arrived. Neither side imports the other: both know the gate.

The upload side also says, open or closed, whether uploads are *behind* while the API works:
upload tasks wait in RabbitMQ for a free upload. A batch released then would only queue
behind them, so the batcher keeps its batches filling instead (:mod:`worker.ingest.batching`).
"""

from __future__ import annotations

import threading


class Gate:
    """Open (consume) or closed (do not), with the reason it is closed. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._reason = ""
        self._behind = False

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open

    @property
    def reason(self) -> str:
        """Why it is closed ("" when open)."""
        with self._lock:
            return self._reason

    @property
    def behind(self) -> bool:
        """Upload tasks wait in RabbitMQ for a free upload while the API works."""
        with self._lock:
            return self._behind

    def set(self, open_: bool, reason: str = "", *, behind: bool = False) -> bool:
        """Open or close it, and say whether uploads are behind; return True when that opened
        or closed it."""
        with self._lock:
            changed = open_ != self._open
            self._open, self._reason, self._behind = open_, ("" if open_ else reason), behind
            return changed

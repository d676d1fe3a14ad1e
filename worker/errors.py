"""The worker's errors, split by what to do about them.

- :class:`Transient`: try again later (backoff); the API or the network had a bad moment.
- :class:`Permanent`: the events can never be accepted as they are; dead-letter them.
- :class:`PublishError`: the broker did not confirm a hand-off; acknowledge nothing and let
  the message come back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class WorkerError(Exception):
    """Base of the worker's own errors."""


class PublishError(WorkerError):
    """The broker did not confirm (or could not route) messages we handed to it.

    ``messages`` are the messages of that hand-off (the caller may keep them to try again).
    ``too_large`` is the broker's ``max_message_size`` when it refused a message for its size:
    sending the same again is pointless, splitting it is the way.
    """

    def __init__(self, message: str, *, messages: Sequence[Any] = (), too_large: int | None = None) -> None:
        super().__init__(message)
        self.messages = list(messages)
        self.too_large = too_large


class UploadError(WorkerError):
    """An upload did not succeed. ``status`` is the HTTP status, or None without one."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Transient(UploadError):
    """Worth retrying: 408, 425, 429, 5xx, timeouts, connection errors.

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it gave one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, body: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class Permanent(UploadError):
    """Never worth retrying as is: 400, 401, 403, 404, 405, 413, 422, a TLS error, ...

    ``reason`` is the dead-letter reason word (``rejected``, ``unauthorized``, ``refused``).
    """

    def __init__(self, message: str, *, reason: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message, status=status, body=body)
        self.reason = reason

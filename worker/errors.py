"""Every error of the worker, split by what to do about it.

::

    WorkerError
    ├── SettingsError        a setting the worker cannot run with: stop at start-up, name it
    ├── InputError           the data is bad: dead-letter it with a sentence, go on
    │   ├── MalformedBody    a message body that holds no events we can read
    │   └── ForeignMessage   another application's task on a queue of ours: set aside whole
    ├── BrokerError          RabbitMQ did not do what was asked: acknowledge nothing
    │   ├── PublishError     a hand-off not confirmed: keep it, try again later (split if too large)
    │   └── DeadLetterError  the dead-letter queue cannot be read
    │       └── NoDeadLetterQueue  it does not exist yet: there are no dead letters
    └── UploadError          the API did not take a request
        ├── Transient        try again later (backoff, in a delay queue)
        └── Permanent        never worth sending again as is: dead-letter
            ├── Rejected     400: split the batch until the rejected events stand alone
            ├── Unauthorized 401: the API key
            └── Refused      403, 404, 405, 413, 422, TLS: the endpoint or the account

The sandbox (``worker.sandbox``) has errors of its own: it shares no code with the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class WorkerError(Exception):
    """Base of the worker's own errors."""


class SettingsError(WorkerError, ValueError):
    """A setting is missing or has a value the worker cannot run with; the message names it."""


class InputError(WorkerError):
    """What a producer sent cannot be delivered as it is: dead-letter it, with a sentence."""


class MalformedBody(InputError):
    """The message body holds no events we can read. Dead-lettered whole.

    ``error`` is one sentence a person can act on. ``details`` is machine-readable: it always
    has ``problem`` (one word, such as ``not_json``) and never a value from the body, which
    may be personal data.
    """

    def __init__(self, error: str, details: dict[str, Any]) -> None:
        super().__init__(error)
        self.error = error
        self.details = details


class ForeignMessage(InputError):
    """A task message of another application (``task`` names a task this worker does not run)
    reached a queue the worker consumes. It is none of ours to read: dead-lettered whole as
    ``unhandled``, with what it takes to send it where it belongs once the routing is fixed."""

    def __init__(self, task: str) -> None:
        super().__init__(f"a task message for {task!r}")
        self.task = task


class BrokerError(WorkerError):
    """RabbitMQ did not do what was asked: acknowledge nothing, the messages stay."""


class PublishError(BrokerError):
    """The broker did not confirm (or could not route) messages we handed to it.

    ``messages`` are the messages of that hand-off (the caller may keep them to try again).
    ``refused``: the broker answered, and said no to some of them (a nack, an unroutable message,
    one over its size limit), as opposed to not answering at all (a lost connection, a timeout).
    ``too_large`` is the broker's ``max_message_size`` when it refused a message for its size:
    sending the same again is pointless, splitting it is the way.
    """

    def __init__(self, message: str, *, messages: Sequence[Any] = (), too_large: int | None = None,
                 refused: bool = False) -> None:
        super().__init__(message)
        self.messages = list(messages)
        self.too_large = too_large
        self.refused = refused or too_large is not None


class DeadLetterError(BrokerError):
    """The dead-letter queue cannot be read: the broker is unreachable, or the queue missing."""


class NoDeadLetterQueue(DeadLetterError):
    """The dead-letter queue does not exist: no worker ever started, so there are no dead
    letters yet (or its name is mistyped)."""


class UploadError(WorkerError):
    """An upload did not succeed. ``status`` is the HTTP status, or None without one."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Transient(UploadError):
    """Worth retrying: 408, 425, 429, 5xx, timeouts, connection errors, an odd 200.

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it gave one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, body: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after

    @property
    def rate_limited(self) -> bool:
        """A 429: the API asks every upload to slow down, not this one to give up."""
        return self.status == 429


class Permanent(UploadError):
    """Never worth sending again as is; the subclass says why (the dead letter's reason)."""


class Rejected(Permanent):
    """400: events of the request break the API's rules. Split until they stand alone."""


class Unauthorized(Permanent):
    """401: the API key is not accepted (or not for this region)."""


class Refused(Permanent):
    """Another permanent answer (403, 404, 405, 413, 422) or a TLS failure."""

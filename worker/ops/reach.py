"""Which broker of the failover list answers: what ``netcore-activity check`` and ``make run`` ask
before anything starts.

``CELERY_BROKER_URL`` may list several nodes (``amqp://node1//;amqp://node2//``). Each is tried in
turn, once, with a short timeout, and every failure is kept with its reason, so that the one line
an operator reads says why no node would do. Two kinds of failure differ in what follows:

- nothing answered as a broker (nothing listens, no route, something that is not AMQP, no answer
  in time): another broker is needed;
- a broker answered and *refused* (the login, the vhost): the broker is there, the settings are
  wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import amqp
from kombu.connection import Connection
from kombu.exceptions import OperationalError

from config.settings import redact_url
from worker.broker.connection import connect

#: Seconds each node of the list gets to connect and open the vhost.
DEFAULT_TIMEOUT = 3.0


@dataclass(frozen=True)
class Attempt:
    """A node that did not do: its URL (password masked) and why."""

    url: str
    error: str
    #: A broker answered and refused (the login, the vhost), rather than nothing answering.
    refused: bool


@dataclass
class Reached:
    """The first node that answered (its open connection), and the nodes tried before it."""

    connection: Connection | None = None
    #: The URL of the node that answered, as configured (with its password): empty if none did.
    url: str = ""
    failed: list[Attempt] = field(default_factory=list)

    @property
    def broker_answered(self) -> bool:
        """Whether any node answered as a broker (connected, or refused the login or vhost)."""
        return self.connection is not None or any(attempt.refused for attempt in self.failed)

    def why_not(self) -> str:
        """Every failure, in the order tried: ``url: reason; url: reason``."""
        return "; ".join(f"{attempt.url}: {attempt.error}" for attempt in self.failed)

    def server(self) -> str:
        """What answered, as it says (``RabbitMQ 3.10.8``); empty before a connection."""
        if self.connection is None:
            return ""
        properties = self.connection.connection.server_properties or {}
        return " ".join(_text(properties.get(key)) for key in ("product", "version") if properties.get(key))

    def close(self) -> None:
        """Close the connection (what was reached stays said)."""
        if self.connection is not None:
            self.connection.release()


def reach(broker_url: str, *, timeout: float = DEFAULT_TIMEOUT, ssl: dict[str, Any] | None = None) -> Reached:
    """Try each node of ``broker_url`` (a ``;`` list) in turn; stop at the first that answers.
    ``ssl``: the TLS options of an ``amqps://`` list (``Settings.broker_ssl()``)."""
    reached = Reached()
    for url in (part.strip() for part in broker_url.split(";")):
        if not url:
            continue
        try:
            reached.connection = connect(url, timeout=timeout, retries=0, ssl=ssl)
        except amqp.exceptions.AMQPError as exc:  # a broker's refusal: login, vhost...
            reached.failed.append(Attempt(redact_url(url), _reply(exc), refused=True))
        except (OperationalError, OSError) as exc:
            reached.failed.append(Attempt(redact_url(url), str(exc) or type(exc).__name__, refused=False))
        else:
            reached.url = url
            return reached
    return reached


def _reply(exc: amqp.exceptions.AMQPError) -> str:
    """The broker's own words (``ACCESS_REFUSED - Login was refused ...``)."""
    return str(getattr(exc, "reply_text", "") or exc)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

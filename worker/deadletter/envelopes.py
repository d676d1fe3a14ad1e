"""Dead letters: one message per event that can never be delivered, with the reason why.

The dead-letter queue is data, to be replayed or fixed by hand, so each envelope keeps what
failed whole: the original event, or, for a message body that holds no events (``malformed``,
``poison``), the body itself, byte for byte:

- ``raw``: the body as text. When its bytes are UTF-8 (the usual case), this *is* the body.
- ``raw_base64``: present only when the bytes are not UTF-8 (Latin-1, a binary blob, a lone
  surrogate): the exact bytes, in base64. ``raw`` then only shows them readably (each bad byte
  as ``\\xff``), which a body really holding a backslash could also look like.

RabbitMQ refuses messages over its ``max_message_size`` (128 MiB by default), and the worker
takes any body the broker accepted: its envelope, with JSON escapes, can be larger still. So a
body over :data:`PART_BYTES` is written as several dead letters, each a whole envelope (same
reason, error, details, ``failed_at``) with one slice of the body and a ``part`` object:
``{"id": shared by the parts, "number": 1 to count, "count": how many, "size": bytes of the
whole body}``. :func:`join` puts the slices back together.

The other fields, ``reason``, ``error``, ``event``, ``details``, ``asset_id``, ``attempts`` and
``failed_at``, are fixed by the contract; ``replays`` counts the event's replays before it died.
Reading and replaying dead letters is :mod:`worker.deadletter.cli`'s job.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.broker.headers import REASON_HEADER
from worker.broker.publisher import Outgoing
from worker.clock import Clock
from worker.events import jsonutil
from worker.events.parsing import raw_text

#: The body could not be read: not JSON, not UTF-8, not an object or array of objects.
MALFORMED = "malformed"
#: The event breaks the API's documented rules (field errors in ``details``).
INVALID = "invalid"
#: The API answered 400 for this event alone (a rejected batch is split until isolated).
REJECTED = "rejected"
#: The API answered 401: the API key is wrong. Fix it, then replay these.
UNAUTHORIZED = "unauthorized"
#: The API answered another permanent status (403, 404, 405, 413, 422) or TLS failed.
REFUSED = "refused"
#: Transient failures went on past ``UPLOAD_MAX_RETRIES``. Replay once the API is back.
RETRIES_EXHAUSTED = "retries_exhausted"

#: A message (on a quorum queue) that the worker died holding, ``ACTIVITY_DELIVERY_LIMIT`` times.
POISON = "poison"
#: An upload task the worker could not handle (a bug, a message from another version): RabbitMQ
#: dead-lettered it and the salvage wrote its events here. Replay them once the cause is fixed.
#: Also another application's task message that reached a queue of the worker, kept whole.
UNHANDLED = "unhandled"
#: The event's asset_id belongs to no account of the accounts file, and there is no default
#: account. Replay once the file names it.
UNROUTABLE = "unroutable"

#: Every reason this worker writes.
REASONS = (MALFORMED, INVALID, REJECTED, UNAUTHORIZED, REFUSED, RETRIES_EXHAUSTED, POISON, UNHANDLED, UNROUTABLE)

#: The envelope field naming the account an event was for (absent: written before there were
#: several, or before its account was known: the ``default`` account).
ACCOUNT = "account"


#: Most bytes of a body that one dead letter holds; a larger body is written in parts. An
#: envelope is at most about 6.5 times its slice (JSON escapes of control characters; base64
#: beside the readable ``raw``), so about 13 MiB: under the smallest default max_message_size
#: of RabbitMQ (16 MiB since 4.0; 128 MiB in 3.x). A body under the worker's own parsing limit
#: (10 MiB) is at most five parts; most bodies are one whole envelope.
PART_BYTES: int = 2 * 1024 * 1024

Envelope = dict[str, Any]


def replays_body(body: Envelope) -> bool:
    """Is this dead letter a producer's message kept whole, that replay publishes again as the
    very bytes it was? ``poison``, and ``unhandled`` when the consumer set it aside (a bug)."""
    reason = body.get("reason")
    details = body.get("details")
    return reason == POISON or (reason == UNHANDLED and isinstance(details, dict)
                                and details.get("replay_body") is True and body.get("event") is None)


@dataclass(frozen=True)
class Original:
    """Where another application's message came from, and as what: replay sends it back there."""

    queue: str
    headers: dict[str, Any]
    properties: dict[str, Any]


#: The message properties a replay may set again (AMQP's basic properties a producer sets).
ORIGINAL_PROPERTIES = ("content_type", "content_encoding", "correlation_id", "reply_to", "priority", "message_id",
                       "type", "app_id")


def original_of(body: Envelope) -> Original | None:
    """Another application's message set aside whole (``unhandled``, ``details.problem``
    ``foreign_task``): its queue, headers and properties as it arrived, or None for any other
    dead letter (the inverse of the ingest step's JSON-safe copy: byte strings come back)."""
    details = body.get("details")
    if body.get("reason") != UNHANDLED or not isinstance(details, dict) or details.get("problem") != "foreign_task":
        return None
    message = details.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("queue"), str) or not message["queue"]:
        return None
    headers, properties = message.get("headers"), message.get("properties")
    return Original(message["queue"], _from_jsonable(headers) if isinstance(headers, dict) else {},
                    {k: v for k, v in (properties or {}).items() if k in ORIGINAL_PROPERTIES}
                    if isinstance(properties, dict) else {})


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$base64"} and isinstance(value["$base64"], str):
            try:
                return base64.b64decode(value["$base64"], validate=True)
            except (binascii.Error, ValueError):
                return value["$base64"]
        return {key: _from_jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(item) for item in value]
    return value


@dataclass(frozen=True)
class Part:
    """Where one dead letter's slice belongs in the body it was cut from."""

    id: str
    number: int
    count: int
    #: Bytes of the whole body.
    size: int


def envelope(
    *,
    reason: str,
    error: str,
    failed_at: datetime,
    event: Any = None,
    raw: bytes | str | None = None,
    details: dict[str, Any] | None = None,
    asset_id: str | None = None,
    attempts: int = 0,
    replays: int = 0,
    account: str | None = None,
) -> Envelope:
    """The dead letter of one event, or of a body known to be small (``raw``: an event's
    text), kept whole in one envelope. A message's whole body goes to :func:`body_envelopes`,
    which splits what one message could not hold."""
    body: Envelope = {
        "reason": reason,
        "error": error,
        "event": event,
        "details": details or {},
        "asset_id": asset_id,
        "attempts": attempts,
        "failed_at": failed_at.isoformat().replace("+00:00", "Z"),
        "replays": replays,
    }
    if account is not None:
        body[ACCOUNT] = account
    if raw is not None:
        body.update(raw_fields(raw))
    return body


def body_envelopes(
    *,
    reason: str,
    error: str,
    failed_at: datetime,
    raw: bytes | str,
    details: dict[str, Any] | None = None,
    asset_id: str | None = None,
    attempts: int = 0,
    replays: int = 0,
    part_bytes: int = PART_BYTES,
) -> list[Envelope]:
    """The dead letters of a message body that holds no events we can send (``malformed``,
    ``poison``): one envelope keeping it whole, or, when it is over ``part_bytes``, one per
    slice, each with its ``part`` (see the module). Publish them together, as one group.

    A ``str`` body is kept as its UTF-8 bytes (a lone surrogate as its ``surrogatepass``
    bytes, so in ``raw_base64``).
    """
    common = envelope(reason=reason, error=error, failed_at=failed_at, details=details, asset_id=asset_id,
                      attempts=attempts, replays=replays)
    data = memoryview(_bytes_of(raw))
    if len(data) <= part_bytes:
        return [{**common, **raw_fields(data)}]
    bounds = list(_slices(data, part_bytes))
    part_id = uuid.uuid4().hex
    return [
        {**common, **raw_fields(data[start:end]),
         "part": {"id": part_id, "number": number, "count": len(bounds), "size": len(data)}}
        for number, (start, end) in enumerate(bounds, 1)
    ]


def message(queue: str, body: Envelope) -> Outgoing:
    """Wrap an envelope as a persistent message for the dead-letter queue."""
    return Outgoing(queue, jsonutil.dumps(body), {REASON_HEADER: body["reason"]})


def messages(queue: str, bodies: Iterable[Envelope]) -> list[Outgoing]:
    """The messages of several envelopes (the parts of one body), in order."""
    return [message(queue, body) for body in bodies]


class DeadLetters:
    """Writes the dead letters of one part of the worker (the consumer, delivery, the salvage):
    one queue, one clock, the contract's two shapes. The callers only say why."""

    def __init__(self, *, queue: str, clock: Clock, account: str | None = None) -> None:
        self.queue = queue
        self.clock = clock
        #: The account the events were for, written in each envelope (None: not known here).
        self.account = account

    def event(self, reason: str, error: str, *, event: Any = None, raw: bytes | str | None = None,
              details: dict[str, Any] | None = None, asset_id: str | None = None, attempts: int = 0,
              replays: int = 0) -> Outgoing:
        """The dead letter of one event (``raw``: its text, when it could not be parsed)."""
        return message(self.queue, envelope(reason=reason, error=error, failed_at=self.clock.now(), event=event,
                                            raw=raw, details=details, asset_id=asset_id, attempts=attempts,
                                            replays=replays, account=self.account))

    def event_text(self, reason: str, error: str, text: Any, *, details: dict[str, Any] | None = None,
                   asset_id: str | None = None, attempts: int = 0, replays: int = 0) -> Outgoing:
        """The dead letter of an event known by its JSON text: the event itself when the text is
        one JSON object, else the text kept whole in ``raw``."""
        event, raw = event_or_raw(text)
        return self.event(reason, error, event=event, raw=raw, details=details, asset_id=asset_id,
                          attempts=attempts, replays=replays)

    def body(self, reason: str, error: str, *, raw: bytes | str, details: dict[str, Any] | None = None,
             asset_id: str | None = None, attempts: int = 0, replays: int = 0,
             part_bytes: int = PART_BYTES) -> list[Outgoing]:
        """The dead letters of a whole message body, in parts when it is large."""
        return messages(self.queue, body_envelopes(reason=reason, error=error, failed_at=self.clock.now(), raw=raw,
                                                   details=details, asset_id=asset_id, attempts=attempts,
                                                   replays=replays, part_bytes=part_bytes))


def event_or_raw(text: Any) -> tuple[Any, str | None]:
    """(event, None) for an event's JSON text (or an event object), or (None, the text) when it
    is not one JSON object."""
    if not isinstance(text, str):
        return (text, None) if isinstance(text, dict) else (None, jsonutil.dumps(text).decode("utf-8", "replace"))
    try:
        value = jsonutil.loads(text)
    except ValueError:
        return None, text
    return (value, None) if isinstance(value, dict) else (None, text)


def part_of(body: Envelope) -> Part | None:
    """The ``part`` of a dead letter, or None for a whole one (or a ``part`` that makes no sense)."""
    value = body.get("part")
    if not isinstance(value, dict):
        return None
    part_id, number, count, size = (value.get(key) for key in ("id", "number", "count", "size"))
    if not (isinstance(part_id, str) and part_id and isinstance(number, int) and isinstance(count, int)
            and isinstance(size, int) and all(_count(n) for n in (number, count, size))):
        return None
    if not 1 <= number <= count:
        return None
    return Part(part_id, number, count, size)


def raw_body(body: Envelope) -> bytes | None:
    """The bytes an envelope keeps (for a part, its slice), exactly; None if it keeps none.

    ``raw_base64`` when present, else ``raw`` as UTF-8. Dead letters written before
    ``raw_base64`` existed showed bytes that are not UTF-8 as ``\\xff`` in ``raw``; for them
    this gives that text, not the original bytes.
    """
    encoded = body.get("raw_base64")
    if isinstance(encoded, str):
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            return None
    text = body.get("raw")
    return text.encode("utf-8") if isinstance(text, str) else None


def join(parts: Iterable[Envelope]) -> bytes:
    """The whole body kept by the parts of one dead letter, in any order (a part read twice
    counts once). Raises ValueError when one is missing, or they are not parts of one body."""
    slices: dict[int, bytes] = {}
    bodies: set[tuple[str, int, int]] = set()
    for body in parts:
        part = part_of(body)
        piece = raw_body(body)
        if part is None or piece is None:
            raise ValueError("a dead letter without a valid part or raw body")
        bodies.add((part.id, part.count, part.size))
        slices.setdefault(part.number, piece)
    if len(bodies) != 1:
        raise ValueError(f"parts of {len(bodies)} bodies, not one")
    ((part_id, count, size),) = bodies
    missing = [number for number in range(1, count + 1) if number not in slices]
    if missing:
        raise ValueError(f"body {part_id}: parts {missing} of {count} are missing")
    whole = b"".join(slices[number] for number in range(1, count + 1))
    if len(whole) != size:
        raise ValueError(f"body {part_id}: its parts hold {len(whole)} bytes, not {size}")
    return whole


def raw_fields(raw: bytes | str | memoryview) -> Envelope:
    """The fields that keep a body exactly: ``raw``, and ``raw_base64`` when it is not UTF-8."""
    data = _bytes_of(raw) if isinstance(raw, str) else raw
    try:
        return {"raw": str(data, "utf-8")}
    except UnicodeDecodeError:
        return {"raw": raw_text(bytes(data)), "raw_base64": base64.b64encode(data).decode("ascii")}


def _bytes_of(raw: bytes | str) -> bytes:
    return raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)


def _slices(data: memoryview, part_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each slice: at most ``part_bytes`` long, and never cutting a UTF-8
    character in two (so that each slice of a UTF-8 body is readable text on its own)."""
    start = 0
    while start < len(data):
        end = min(start + part_bytes, len(data))
        if end < len(data):
            # a UTF-8 character is at most 4 bytes: its continuation bytes are 10xxxxxx
            lead = next((cut for cut in range(end, max(start, end - 4), -1) if data[cut] & 0xC0 != 0x80), end)
            end = lead
        yield start, end
        start = end


def _count(value: Any) -> bool:
    """Is ``value`` a whole number (not a bool), 0 or more?"""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

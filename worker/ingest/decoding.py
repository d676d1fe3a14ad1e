"""Decoding a source message: its body (or Celery task message) into routed events.

The consumer's first step (:mod:`worker.ingest.pipeline`). It does the cheap work only: a body that is
one JSON object is parsed once with orjson and its event forwarded as the very text it arrived
in; anything else goes through the strict parser (:func:`worker.events.parsing.parse_body`), which
explains what is wrong (:class:`~worker.events.parsing.MalformedBody`). Each event comes out with its
routing key (``asset_id``, None when it cannot be routed), its JSON text and its size.
"""

from __future__ import annotations

import base64
from datetime import date, datetime
from typing import Any, Protocol

import orjson

from worker.broker.compression import MAX_DECOMPRESSED_BYTES, TooLarge, Unsupported
from worker.broker.headers import REPLAYS_HEADER
from worker.broker.messages import INGEST_TASK
from worker.deadletter.envelopes import ORIGINAL_PROPERTIES
from worker.errors import ForeignMessage, MalformedBody
from worker.events import jsonutil
from worker.events.parsing import ACCEPTED_ENCODINGS, JSON_CONTENT_TYPE, MAX_MESSAGE_BYTES, parse_body
from worker.events.validation import routing_key_of


class Message(Protocol):
    """What the consumer needs of a kombu message."""

    body: bytes | str
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]
    delivery_tag: int


#: (asset_id or None when it cannot be routed, the event's JSON text, the event, its size in bytes).
Routed = tuple[str | None, str, Any, int]


def events_of(message: Message) -> list[Routed]:
    """The events of a source message; raises MalformedBody when it holds none we can read, and
    ForeignMessage when it is another application's task (whatever its content type: its body is
    never decoded, so a pickle is never loaded)."""
    body = message.body
    task = (message.headers or {}).get("task")
    if task is not None and task != INGEST_TASK:
        raise ForeignMessage(task if isinstance(task, str) else repr(task)[:100])
    if task is None and body[:1] not in (b"[", "[") and plain_json(message) and len(body) <= MAX_MESSAGE_BYTES:
        try:  # (an array goes straight to parse_body, which reads it once: orjson first, when it can)
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            event = None  # the strict parser below says exactly what is wrong
        if isinstance(event, dict):  # the fast path: one event, forwarded as its text
            data = body.encode("utf-8") if isinstance(body, str) else body
            return [(routing_key_of(event), data.decode("utf-8"), event, len(data))]
    events = parse_body(body, content_type=message.content_type or None,
                        content_encoding=message.content_encoding or None)
    if task is not None:
        events = task_events(events)
    routed = []
    for event in events:
        data = jsonutil.dumps(event)
        routed.append((routing_key_of(event), data.decode("utf-8"), event, len(data)))
    return routed


def task_events(body: list[Any]) -> list[Any]:
    """The events of an ``activities.ingest`` task message: body ``[args, kwargs, embed]``."""
    args = body[0] if len(body) == 3 and isinstance(body[0], list) else None
    if not args or len(args) != 1 or not isinstance(args[0], (dict, list)) or args[0] == []:
        raise MalformedBody(
            f"{INGEST_TASK} takes one argument, an event or a non-empty list of events: "
            "send_task('activities.ingest', args=[event_or_list])",
            {"problem": "bad_task_arguments", "task": INGEST_TASK},
        )
    return args[0] if isinstance(args[0], list) else [args[0]]


def plain_json(message: Message) -> bool:
    """Does the message declare JSON in UTF-8 (or nothing)? Else the strict parser explains."""
    content_type = message.content_type
    encoding = message.content_encoding
    return (not content_type or content_type.split(";")[0].strip().lower() == JSON_CONTENT_TYPE) and (
        not encoding or encoding.lower() in ACCEPTED_ENCODINGS
    )


def replays_of(message: Message) -> int:
    """The message's ``x-replays`` header: a count, or 0 when absent or not a count."""
    value = (message.headers or {}).get(REPLAYS_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def delivery_count(message: Message) -> int | None:
    """How often a quorum queue delivered this message before (``x-delivery-count``), if it says."""
    value = (message.headers or {}).get("x-delivery-count")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def undecodable(message: Message, exc: Exception) -> tuple[str, dict[str, Any]]:
    """The sentence and details of a delivery kombu could not make a message of: so far always
    its ``compression`` header (kombu decompresses before any callback runs)."""
    compression = (message.headers or {}).get("compression")
    name = str(compression)[:100] if compression is not None else ""
    if isinstance(exc, TooLarge):
        why = f"it expands past {MAX_DECOMPRESSED_BYTES - 1} bytes, the limit for a message body"
    elif isinstance(exc, (KeyError, Unsupported)):
        why = "the worker does not read that compression"
    else:
        why = f"the body does not decompress with it ({type(exc).__name__})"
    error = (f"The message says its body is compressed ({name!r}) and it could not be read: {why}. "
             "kombu's 'gzip' is zlib (zlib.compress), not a gzip file; publish uncompressed UTF-8 JSON, or "
             "compress as kombu does.")
    details = {"problem": "compression", "compression": name, "error": type(exc).__name__}
    return error, details


def foreign_message_details(message: Message, queue: str) -> dict[str, Any]:
    """What it takes to publish another application's message again as it was: its queue,
    headers and properties (JSON-safe: byte strings in base64 under ``{"$base64": ...}``)."""
    properties = getattr(message, "properties", None) or {}
    kept = {name: properties[name] for name in ORIGINAL_PROPERTIES if properties.get(name)}
    if message.content_type:
        kept["content_type"] = message.content_type
    if message.content_encoding:
        kept["content_encoding"] = message.content_encoding
    return {"queue": queue, "headers": jsonable(message.headers or {}), "properties": jsonable(kept)}


def jsonable(value: Any) -> Any:
    """An AMQP table's value as JSON can hold it: bytes in base64, dates as ISO text, other
    scalars as their text (header values are the producer's: never trusted to be JSON)."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)

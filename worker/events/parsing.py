"""Message bodies to events: the only place that turns broker bytes into Python values.

A body is UTF-8 JSON: one event object or a non-empty array of them, the body one would POST
to the Activity API. Anything else raises :class:`MalformedBody`, and the whole message is
dead-lettered (reason ``malformed``, the body kept whole by :mod:`worker.deadletter.envelopes`). Each
event's *shape* is checked later by :mod:`worker.events.validation`, one by one, so a bad item does
not sink its neighbours.

The rules are strict: no key twice in one object (the API would see only one of them), no lone
surrogate, no NaN or Infinity, integers exact (beyond 64 bits too: validation explains them),
at most :data:`MAX_DEPTH` levels, :data:`MAX_MESSAGE_BYTES`. Two parsers apply them:

- **compact bodies** (orjson's own output, what the ingest step writes for each event of an
  array, and what most producers' serialisers write): :mod:`worker.events.compact`, about 2.5 us
  for a typical 600-byte event, against 9-20 for the strict parser;
- **anything else** (spaces after colons, ``\\u00e9`` escapes, ``1.50``...): :mod:`json` with an
  ``object_pairs_hook`` that sees every key, exact integers, ``parse_constant`` and
  ``parse_float`` for NaN, Infinity and overflow, a lone-surrogate scan when a surrogate escape
  appears, a depth walk past :data:`MAX_DEPTH` brackets.

Both give the same value for every body the first one reads; ``tests/test_differential.py``
checks it on hundreds of thousands of generated bodies.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from worker.errors import MalformedBody
from worker.events.compact import NOT_COMPACT, compact_value

#: Largest body accepted, in bytes: ten times the largest upload the API takes (1000 events
#: of about 1 KB). Anything bigger is a producer bug; refusing it bounds memory and time.
MAX_MESSAGE_BYTES: int = 10 * 1024 * 1024

#: Most events one message may hold: ten full uploads, enough for any sane producer, few
#: enough that one message cannot flood the batcher.
MAX_EVENTS_PER_MESSAGE: int = 10_000

#: Deepest nesting accepted (the top-level array is one level). Real events nest four or
#: five levels; the limit keeps hostile input from exhausting the stack or the time.
MAX_DEPTH: int = 64

#: The media type a body must declare, when it declares one (parameters allowed).
JSON_CONTENT_TYPE: str = "application/json"

#: ``content_encoding`` values that mean "these bytes are UTF-8"; ``binary`` is kombu's
#: word for raw bytes, which is what producers outside Celery usually send.
ACCEPTED_ENCODINGS: frozenset[str] = frozenset({"utf-8", "utf8", "binary"})

#: How every "send this instead" sentence ends.
_EXPECTED: str = "Send UTF-8 JSON: one event object or an array of them."

#: A ``\\uD800``-``\\uDFFF`` escape: the cheap test for "a lone surrogate is possible".
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
#: Every escape sequence, so the second backslash of ``\\\\`` never starts one.
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)")


def _malformed(problem: str, error: str, **details: Any) -> MalformedBody:
    """A :class:`MalformedBody` whose details name the ``problem`` in one word."""
    return MalformedBody(error, {"problem": problem, **details})


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build one object, refusing a key seen twice (the API would see only one of them)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _malformed(
                    "duplicate_key",
                    f"The body has an object with the key {json.dumps(key[:64])} twice; only one "
                    "would reach the API. Send each key once per object.",
                    key=key[:64],
                )
            seen.add(key)
    return obj


def _not_finite(text: str) -> Any:
    """``NaN`` and ``Infinity`` are not JSON, whatever Python's json says; 1e400 neither."""
    raise _malformed(
        "not_finite",
        "The body holds NaN, Infinity or a number too large for a double, which JSON cannot "
        "carry. Send finite numbers (or strings).",
    )


def _finite_float(text: str) -> float:
    """Parse a float, refusing overflow such as ``1e400`` (it would be forwarded as Infinity)."""
    value = float(text)
    return value if math.isfinite(value) else _not_finite(text)


#: One decoder for all bodies: building it per call would cost more than some parses.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys, parse_constant=_not_finite, parse_float=_finite_float
)


def _check_headers(content_type: str | None, content_encoding: str | None) -> None:
    """Refuse messages whose headers say the body is something other than UTF-8 JSON."""
    media, _, params = (content_type or JSON_CONTENT_TYPE).partition(";")
    pairs = (param.partition("=") for param in params.split(";"))
    charsets = {v.strip().strip('"').lower() for k, _, v in pairs if k.strip().lower() == "charset"}
    if media.strip().lower() != JSON_CONTENT_TYPE or not charsets <= {"utf-8", "utf8"}:
        raise _malformed(
            "content_type",
            f"The message's content_type is not {JSON_CONTENT_TYPE} (with UTF-8, if it names a "
            f"charset). Publish with content_type {JSON_CONTENT_TYPE}, or none. {_EXPECTED}",
            content_type=str(content_type)[:100],
        )
    if content_encoding and content_encoding.strip().lower() not in ACCEPTED_ENCODINGS:
        raise _malformed(
            "content_encoding",
            "The message's content_encoding is neither utf-8 nor binary. Publish with "
            f"content_encoding utf-8, or none. {_EXPECTED}",
            content_encoding=content_encoding[:100],
        )


def _text_of(body: bytes | str, max_bytes: int) -> str:
    """The body as text, once it is known to be small enough, UTF-8, without BOM, not blank."""
    if isinstance(body, str) and len(body) <= max_bytes:  # longer ones are too long in UTF-8
        body = body.encode("utf-8", "surrogatepass")  # lone surrogates fail to decode below
    if len(body) > max_bytes:
        raise _malformed(
            "too_large",
            f"The body is over the limit of {max_bytes} bytes. Split it into several messages "
            "(an upload takes at most 1000 events anyway).",
            size=len(body),
            max_bytes=max_bytes,
        )
    data = bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else body.encode("utf-8", "surrogatepass")
    if data.startswith(b"\xef\xbb\xbf"):
        raise _malformed(
            "bom",
            "The body starts with a UTF-8 byte-order mark (BOM), which JSON forbids. Send it "
            f"without the BOM. {_EXPECTED}",
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise _malformed(
            "not_utf8",
            f"The body looks like UTF-16 or UTF-32 (a byte-order mark or NUL bytes). {_EXPECTED}",
        )
    if data.isspace() or not data:
        raise _malformed("empty", f"The body is empty or only whitespace. {_EXPECTED}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(
            "not_utf8",
            f"The body is not UTF-8 (byte 0x{data[exc.start]:02x} at position {exc.start}, "
            f"perhaps a lone surrogate or Latin-1). {_EXPECTED}",
            position=exc.start,
        ) from None


def _too_deep() -> MalformedBody:
    return _malformed(
        "too_deep",
        f"The body nests arrays and objects more than {MAX_DEPTH} levels deep. Flatten it.",
        max_depth=MAX_DEPTH,
    )


def _decode(text: str) -> Any:
    """Parse once, turning every way the decoder can fail into :class:`MalformedBody`."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise _malformed(
            "not_json",
            f"The body is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            f"{_EXPECTED}",
            line=exc.lineno,
            column=exc.colno,
            position=exc.pos,
        ) from None
    except RecursionError:  # the C scanner guards its own stack; depth > ~1000 lands here
        raise _too_deep() from None
    except ValueError as exc:  # int() refuses more digits than sys.get_int_max_str_digits()
        if "digits" not in str(exc):
            raise _malformed("not_json", f"The body is not valid JSON. {_EXPECTED}") from None
        raise _malformed(
            "number_too_long",
            "The body holds an integer with thousands of digits, more than can be read. Send "
            "such numbers as strings.",
        ) from None


def _lone_surrogate_at(text: str) -> int | None:
    """Where a ``\\uD8xx``-style escape is not half of a surrogate pair (so not a character)."""
    high, high_end = None, -1  # where a high surrogate waits for its low half
    for match in _ESCAPE.finditer(text):
        code = int(match.group(1), 16) if match.group(1) else -1
        if high is not None:
            if match.start() != high_end or not 0xDC00 <= code <= 0xDFFF:
                return high
            high = None
        elif 0xD800 <= code <= 0xDBFF:
            high, high_end = match.start(), match.end()
        elif 0xDC00 <= code <= 0xDFFF:
            return match.start()
    return high


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels; level by level, no recursion."""
    level, depth = [value], 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            items = container.values() if type(container) is dict else container
            below += [c for c in items if type(c) is dict or type(c) is list]
        level, depth = below, depth + 1
    return False


def parse_body(
    body: bytes | str,
    *,
    content_type: str | None = None,
    content_encoding: str | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_events: int = MAX_EVENTS_PER_MESSAGE,
) -> list[Any]:
    """Return the events in a message body: ``[obj]`` for one object, the items for an array.

    Items of an array that are not objects are returned as they are: validation rejects each
    one alone, so its valid neighbours still go through. Raises :class:`MalformedBody` when the
    message as a whole cannot be read: content_type not application/json (parameters allowed,
    none is fine); content_encoding not utf-8/utf8/binary/none; not UTF-8, a UTF-8 BOM,
    UTF-16/32; blank; invalid JSON; NaN, Infinity, float overflow; a key twice in one object;
    a lone surrogate escape; an integer over 4300 digits (Python's limit); a top-level null,
    number, string or boolean; an empty array; over ``max_events`` items or ``max_bytes``
    bytes; nesting deeper than :data:`MAX_DEPTH` levels.
    """
    if content_type or content_encoding:  # neither said: nothing to refuse
        _check_headers(content_type, content_encoding)
    value = _value_of(body, max_bytes)
    if type(value) is dict:
        return [value]
    if type(value) is not list:
        raise _not_object(value)
    if not value:
        raise _malformed(
            "empty_array",
            "The body is an empty array: it holds no events. Send at least one event, or nothing.",
        )
    if len(value) > max_events:
        raise _malformed(
            "too_many_events",
            f"The body holds {len(value)} events, over the limit of {max_events} per message. "
            "Split it into several messages.",
            events=len(value),
            max_events=max_events,
        )
    return value


def parse_event(text: str) -> dict[str, Any]:
    """One event of an upload batch, from the JSON text it travels as: the rules of
    :func:`parse_body`, and it must be one object (the batch's upload is the array)."""
    value = _value_of(text, MAX_MESSAGE_BYTES)
    if type(value) is dict:
        return value
    if type(value) is list:
        raise _malformed("not_object", "Expected one event here, found an array.")
    raise _not_object(value)


def _value_of(body: bytes | str, max_bytes: int) -> Any:
    """The JSON value of a body, by the compact path when it applies, else by the strict one."""
    value = compact_value(body, max_bytes=max_bytes, max_depth=MAX_DEPTH)
    return _strict_value(body, max_bytes) if value is NOT_COMPACT else value


def _strict_value(body: bytes | str, max_bytes: int) -> Any:
    """The value of any body, every rule checked on the way (see :func:`parse_body`)."""
    text = _text_of(body, max_bytes)
    value = _decode(text)
    lone = _lone_surrogate_at(text) if _SURROGATE_ESCAPE.search(text) else None
    if lone is not None:
        raise _malformed(
            "lone_surrogate",
            f"The body has a lone UTF-16 surrogate escape at character {lone}, which is not a "
            f"character. Escape whole surrogate pairs or send raw UTF-8. {_EXPECTED}",
            position=lone,
        )
    if text.count("[") + text.count("{") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        raise _too_deep()
    return value


def _not_object(value: Any) -> MalformedBody:
    kind = {type(None): "null", bool: "boolean", str: "string"}.get(type(value), "number")
    return _malformed(
        "not_object",
        f"The body is a JSON {kind}, not an event object or an array of them. {_EXPECTED}",
        json_type=kind,
    )


def raw_text(body: bytes | str) -> str:
    """The body as readable text: UTF-8, with each byte that is not UTF-8 (and each lone
    surrogate of a ``str``) shown as a ``\\xff`` (``\\ud800``) escape, so it always fits in a
    UTF-8 dead letter. Never cut.

    Only a rendering: a body that really holds the four characters ``\\xff`` reads the same.
    A dead letter therefore keeps such a body's exact bytes beside it (``raw_base64``, see
    :mod:`worker.deadletter.envelopes`).
    """
    data = body.encode("utf-8", "backslashreplace") if isinstance(body, str) else bytes(body)
    return data.decode("utf-8", "backslashreplace")

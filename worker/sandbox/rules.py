"""The Activity API's rules for an upload body, checked the way the vendor documents them.

This module deliberately shares no code with the worker's own validation: if the worker's
checks had a mistake, reusing them here would hide it twice. Everything is stdlib (plus orjson
when installed, only to parse faster).

The API judges a request as a whole: one bad event makes the entire request a 400, whose
message names the first problem and the index of the event. The worker's bisecting of
rejected batches relies on exactly that behaviour, so the sandbox reproduces it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

try:  # orjson is several times faster at 1000-event bodies; json is the fallback.
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _DecodeError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    _DecodeError = ValueError

#: The API takes at most this many events in one request.
MAX_EVENTS = 1000

#: The only values ``activity_source`` may take.
ACTIVITY_SOURCES = frozenset({"web", "app"})

#: The documented date-time shape: seconds required, fraction optional, then ``Z``, ``±hh:mm``
#: or nothing: the vendor's own samples send ``2020-04-28T16:47:37`` and the API takes it.
#: Whether the date exists (no 2021-02-30, no hour 24) is left to ``datetime.fromisoformat``.
TIMESTAMP_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?",
    re.ASCII,
)

#: An empty JSON array somewhere in a body: when a body has none, no event needs walking.
EMPTY_ARRAY_RE = re.compile(rb"\[\s*\]")

#: Sandbox-only business rejection: an event whose params hold this key set to ``true`` is
#: refused, so tests can make the API reject an event that passes the worker's checks.
REJECT_FLAG = "sandbox_reject"

#: The names the API's error messages use for each required field.
FIELD_LABELS: dict[str, str] = {
    "activity_name": "Activity Name",
    "asset_id": "Asset Id",
    "timestamp": "Timestamp",
    "activity_source": "Activity Source",
    "activity_params": "Activity Params",
    "identity": "Identity",
    "annonid": "Annonid",
}


class BadRequest(ValueError):
    """The body breaks one of the API's rules; ``str()`` is the message the API answers with."""


@dataclass
class Verdict:
    """A body the API accepts: the events to store and those it drops without a word."""

    stored: list[int] = field(default_factory=list)  #: indexes of events to store
    dropped: list[int] = field(default_factory=list)  #: indexes of events answered but lost


def parse_body(body: bytes) -> list[Any]:
    """Parse an upload body into a list of events (a single object counts as one event)."""
    try:
        payload = _loads(body)
    except (_DecodeError, UnicodeDecodeError, ValueError):
        raise BadRequest("Bad Request | Invalid JSON") from None
    if isinstance(payload, dict):
        return [payload]
    if not isinstance(payload, list):
        raise BadRequest("Bad Request | Body must be a JSON array of events")
    if not payload:
        raise BadRequest("Bad Request | No Events - the array is empty")
    if len(payload) > MAX_EVENTS:
        raise BadRequest(
            f"Bad Request | Too Many Events - {len(payload)} sent, at most {MAX_EVENTS}"
        )
    return payload


def judge(events: list[Any], body: bytes | None = None) -> Verdict:
    """Check every event; raise :class:`BadRequest` naming the first problem found.

    Returns which events the API would store and which it silently drops (an empty array
    anywhere inside ``activity_params``: the real API answers 200 and never stores them).
    Given the raw ``body``, events are walked for empty arrays only if the text holds one.
    """
    verdict = Verdict()
    may_drop = body is None or EMPTY_ARRAY_RE.search(body) is not None
    first_asset: str | None = None
    for index, event in enumerate(events):
        check_event(event, index)
        if first_asset is None:
            first_asset = event["asset_id"]
        elif event["asset_id"] != first_asset:
            raise BadRequest(f"Bad Request | mixed asset_id (event {index})")
        if event["activity_params"].get(REJECT_FLAG) is True:
            raise BadRequest(f"Bad Request | Rejected By Sandbox - {REJECT_FLAG} (event {index})")
        lost = may_drop and holds_empty_array(event["activity_params"])
        (verdict.dropped if lost else verdict.stored).append(index)
    return verdict


def check_event(event: Any, index: int) -> None:
    """Raise :class:`BadRequest` for the first of the event's fields that breaks a rule."""
    if not isinstance(event, dict):
        raise BadRequest(f"Bad Request | Invalid Event - not an object (event {index})")
    for name in ("activity_name", "asset_id"):
        _require_string(event, name, index)
    _require(event, "timestamp", index, is_timestamp)
    _require(event, "activity_source", index, _is_source)
    _require(event, "activity_params", index, _is_object)
    _check_contact(event, index)


def is_timestamp(value: Any) -> bool:
    """True for an ISO-8601 date-time that exists, with a zone (``Z`` or an offset) or none."""
    if not isinstance(value, str) or TIMESTAMP_RE.fullmatch(value) is None:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def is_identity(value: Any) -> bool:
    """``identity`` is a non-empty string or an integer (JSON ``true`` is not an integer)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value != "")


def holds_empty_array(value: Any) -> bool:
    """True when an empty array sits anywhere inside ``value`` (walked without recursion)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            if not item:
                return True
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return False


def asset_ids(events: list[Any]) -> list[str]:
    """The distinct ``asset_id`` strings of a list of events, in order of first appearance."""
    seen: dict[str, None] = {}
    for event in events:
        if isinstance(event, dict) and isinstance(event.get("asset_id"), str):
            seen.setdefault(event["asset_id"], None)
    return list(seen)


def _is_source(value: Any) -> bool:
    return isinstance(value, str) and value in ACTIVITY_SOURCES


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _is_string(value: Any) -> bool:
    return isinstance(value, str)


def _check_contact(event: dict[str, Any], index: int) -> None:
    """An event names its contact by ``identity`` or, for anonymous ones, ``annonid``."""
    identity, annonid = event.get("identity"), event.get("annonid")
    if identity is not None and not is_identity(identity):
        raise _invalid("identity", index)
    if annonid is not None and not (isinstance(annonid, str) and annonid):
        raise _invalid("annonid", index)
    if identity is None and annonid is None:
        raise _missing("identity", index)


def _require_string(event: dict[str, Any], name: str, index: int) -> None:
    """A required, non-empty string field."""
    _require(event, name, index, _is_string)
    if event[name] == "":
        raise _missing(name, index)


def _require(event: dict[str, Any], name: str, index: int, valid: Callable[[Any], bool]) -> None:
    """A required field (absent or null is missing) whose value must satisfy ``valid``."""
    value = event.get(name)
    if value is None:
        raise _missing(name, index)
    if not valid(value):
        raise _invalid(name, index)


def _missing(name: str, index: int) -> BadRequest:
    return BadRequest(f"Bad Request | Missing Parameter - {FIELD_LABELS[name]} (event {index})")


def _invalid(name: str, index: int) -> BadRequest:
    return BadRequest(f"Bad Request | Invalid Parameter - {FIELD_LABELS[name]} (event {index})")

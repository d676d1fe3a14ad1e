"""Is one event fit to upload? The rules of CONTRACT.md "The event", as a marshmallow schema.

The schema only *validates*: valid events are forwarded exactly as received, so every field
returns its input untouched. The API drops events holding an empty array without a word and
fails whole batches for a bad event, so each event it would refuse or lose is caught here,
alone, with a sentence the producer can act on. Messages never repeat the values of
identity, annonid, email, mobile or activity_params (personal data, and they end up in logs
and dead letters): they name fields, JSON types and paths only.

Timestamps without a zone (``2020-04-28T16:47:37``) are what the API's own samples send, and
the API takes them, so they pass by default; ``validate_event(..., naive_timestamps="reject")``
refuses them for teams that want every instant explicit (the ``ACTIVITY_NAIVE_TIMESTAMPS``
setting). The upload stage counts and logs such events (:mod:`worker.events.screening`, from
the one reading of the timestamp; :func:`has_naive_timestamp` says the same of any value).
Such a time is read as UTC wherever the worker needs an instant (the stale check): the API
stores the text as it is and shows times in the panel's zone, so no reading is exact, and UTC
is what the API calls its default.

The schema is the reference, and the only place a rule is written: each field is one plain
function (:class:`Checked`), the whole-event rule is :func:`contact_problem`, a timestamp is
read by :func:`parse_timestamp` alone. :mod:`worker.events.compiled` assembles the same
functions into one check that decides valid events without marshmallow; marshmallow runs to
explain an event that check refused, and writes every field error a dead letter holds.

Cost, timeit on a typical 650-byte event with two items: 17-45 us for :func:`validate_event`
(depending on machine load), about 1.2 times a bare marshmallow schema with the same seven
fields in the same run. The schemas are built once; fields are type checks and one regex;
:func:`routing_key_of`, :func:`has_naive_timestamp` and :func:`is_stale` skip marshmallow
(about 0.2, 0.4 and 0.9 us).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, get_args

from marshmallow import INCLUDE, Schema, ValidationError, fields, validates_schema

#: Events older than this are still sent (the API stores them) but will not trigger a
#: journey, so the worker counts them and says so in the logs.
STALE_AFTER: timedelta = timedelta(hours=24)

#: Integers the API can store: signed or unsigned 64-bit. Python's json reads any size, but
#: larger ones cannot be serialised by orjson nor stored by the API, so they must be strings.
INT_MIN: int = -(2**63)
INT_MAX: int = 2**64 - 1

#: At most this many messages for one field, so a huge broken event makes a readable error.
MAX_MESSAGES_PER_FIELD: int = 10

#: The two values ``activity_source`` may take, exactly.
ACTIVITY_SOURCES: frozenset[str] = frozenset({"web", "app"})

#: ISO-8601 date-time the API documents: date, ``T``, time with seconds, optional fraction,
#: then ``Z`` or ``±HH:MM`` (group ``zone``). Checked before ``datetime.fromisoformat``, which
#: in 3.11 also takes forms the API may not (``20211229T120628Z``, a space for ``T``).
_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?P<zone>Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?"
)

#: The two forms of timestamp the API documents, for messages.
_EXAMPLES = '"2021-12-29T12:06:28Z" or "2021-12-29T06:12:28+05:30"'

#: What to do with a timestamp that has no zone, as the API's own samples send it:
#: ``forward`` it as it is (the API accepts it), or ``reject`` the event as invalid.
NaiveTimestamps = Literal["forward", "reject"]

#: The choices of :data:`NaiveTimestamps`, for checking a setting against.
NAIVE_TIMESTAMP_CHOICES: tuple[str, ...] = get_args(NaiveTimestamps)

#: The setting that chooses, named in the message of a rejected zone-less timestamp.
NAIVE_TIMESTAMPS_SETTING = "ACTIVITY_NAIVE_TIMESTAMPS"


#: JSON names of the types a parsed body holds, for messages that must not show the value.
_JSON_TYPES: dict[type, str] = {type(None): "null", bool: "boolean", int: "number",
                                float: "number", str: "string", dict: "object", list: "array"}


def json_type(value: Any) -> str:
    """The JSON name of a value's type ("number", "array"...): messages show it, not the value."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


class Checked(fields.Field[Any]):
    """A field whose whole validation is one cheap function, value -> error sentence(s) or None.

    The value is returned untouched: the schema only validates. Without a ``missing`` hint the
    field is optional and may be null; with one it is required, and null counts as missing.
    :mod:`worker.events.compiled` calls ``check`` directly, with the same rules for missing and null.
    """

    def __init__(self, check: Callable[[Any], str | list[str] | None], missing: str = "") -> None:
        message = missing.replace("{", "{{").replace("}", "}}")  # marshmallow formats these
        super().__init__(
            required=bool(missing),
            allow_none=not missing,
            error_messages={"required": message, "null": message} if missing else None,
        )
        self.check = check

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        error = self.check(value)
        if error:
            raise ValidationError(error)
        return value


def _text(name: str, hint: str) -> Checked:
    """A required string that must not be empty nor only whitespace."""

    def check(value: Any) -> str | None:
        if type(value) is not str:
            return f"{name} must be a string, not a JSON {json_type(value)}: {hint}"
        return f"{name} is empty: {hint}" if not value or value.isspace() else None

    return Checked(check, f"{name} is missing (or null): {hint}")


def parse_timestamp(value: Any) -> datetime | None:
    """The date-time a valid ``timestamp`` names: a string of the documented shape (date, ``T``,
    time with seconds, optional fraction, then ``Z``, an offset or no zone) naming a real date
    and time; aware unless it has no zone. None for anything else.

    The one reading of a timestamp: validity, zone and instant all come from it."""
    if type(value) is not str or _TIMESTAMP.fullmatch(value) is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def zone_refused(when: datetime, naive: NaiveTimestamps) -> bool:
    """Whether a real date-time is refused for having no zone (only when ``naive`` is ``reject``)."""
    return naive == "reject" and when.tzinfo is None


def _timestamp(value: Any, naive: NaiveTimestamps) -> str | None:
    """Why ``value`` is not a timestamp :func:`parse_timestamp` reads (or one ``naive`` refuses)."""
    when = parse_timestamp(value)
    if when is not None:
        if zone_refused(when, naive):
            return (
                "timestamp has no time zone, and this worker refuses such times "
                f"({NAIVE_TIMESTAMPS_SETTING}=reject): add Z (UTC) or an offset, e.g. {_EXAMPLES}, "
                f"or set {NAIVE_TIMESTAMPS_SETTING}=forward to send them as they are."
            )
        return None
    if type(value) is not str:
        return (
            f"timestamp must be a string, not a JSON {json_type(value)} (epoch numbers are not "
            f"accepted): send an ISO-8601 date-time such as {_EXAMPLES}."
        )
    if _TIMESTAMP.fullmatch(value) is None:
        return (
            "timestamp is not an ISO-8601 date-time with seconds: send e.g. "
            f"{_EXAMPLES} (fractional seconds are allowed)."
        )
    return (
        "timestamp is not a real date and time (such as 30 February, hour 24 or second 60): "
        "check how it is produced."
    )


def _source(value: Any) -> str | None:
    """Exactly ``web`` or ``app``: the API knows no other source, in no other case."""
    if type(value) is not str:
        return f'activity_source must be the string "web" or "app", not a JSON {json_type(value)}.'
    if value in ACTIVITY_SOURCES:
        return None
    hint = " (lower case, no spaces)" if value.strip().lower() in ACTIVITY_SOURCES else ""
    return f'activity_source must be exactly "web" or "app"{hint}.'


def _params(value: Any) -> str | list[str] | None:
    """An object with no empty array at any depth, and only numbers the API can store."""
    if type(value) is not dict:
        return f"activity_params must be a JSON object, not a JSON {json_type(value)}."
    return _payload_problems(value, "activity_params")


def _identity(value: Any) -> str | None:
    """A non-empty string, or an integer (not a boolean) within 64 bits."""
    if type(value) is str:
        if not value or value.isspace():
            return (
                "identity is empty: pass the contact's primary key (email, mobile or customer "
                "id), or leave it out and pass annonid."
            )
    elif type(value) is int:
        if value < INT_MIN or value > INT_MAX:
            return "identity is an integer beyond 64 bits: send it as a string."
    else:
        return f"identity must be a string or an integer, not a JSON {json_type(value)}."
    return None


def _annonid(value: Any) -> str | None:
    """A non-empty string."""
    if type(value) is not str:
        return f"annonid must be a string, not a JSON {json_type(value)}."
    if not value or value.isspace():
        return "annonid is empty: pass the anonymous contact's id, or leave it out for identity."
    return None


def _payload_problems(root: dict[str, Any], name: str) -> list[str]:
    """Empty arrays, huge integers and non-finite floats anywhere in ``root``, by path.

    A plain loop answers "all fine" (the usual case, 3 us for a typical event); paths are
    built only when something is wrong. No recursion, so any depth is safe.
    """
    stack: list[Any] = [root]
    while stack:
        container = stack.pop()
        for item in container.values() if type(container) is dict else container:
            kind = type(item)
            if kind is str:
                continue
            if kind is dict:
                stack.append(item)
            elif kind is list:
                if not item:
                    return _describe_problems(root, name)
                stack.append(item)
            elif kind is int:
                if item < INT_MIN or item > INT_MAX:
                    return _describe_problems(root, name)
            elif kind is float and item - item != 0.0:  # inf - inf and nan - nan are nan
                return _describe_problems(root, name)
    return []


def _describe_problems(root: dict[str, Any], name: str) -> list[str]:
    """The slow half of :func:`_payload_problems`: every problem (up to a limit), by path."""
    problems: list[str] = []
    stack: list[tuple[Any, str]] = [(root, name)]
    while stack and len(problems) < MAX_MESSAGES_PER_FIELD:
        container, path = stack.pop()
        pairs = container.items() if type(container) is dict else enumerate(container)
        below: list[tuple[Any, str]] = []
        for key, item in pairs:
            kind = type(item)
            where = f"{path}[{key}]" if type(container) is list else _member(path, key)
            if kind is list and not item:
                problems.append(
                    f"{where} is an empty array: the API silently drops such events. "
                    "Leave the key out or put at least one item in it."
                )
            elif kind is dict or kind is list:
                below.append((item, where))
            elif kind is int and (item < INT_MIN or item > INT_MAX):
                problems.append(f"{where} is an integer beyond 64 bits: send it as a string.")
            elif kind is float and not math.isfinite(item):
                problems.append(f"{where} is NaN or Infinity: send a finite number.")
        stack.extend(reversed(below))
    return problems[:MAX_MESSAGES_PER_FIELD]


def _member(path: str, key: Any) -> str:
    """``path.key`` for plain keys, ``path["odd key"]`` for the rest."""
    text = str(key)[:64]
    if text.isidentifier():
        return f"{path}.{text}"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'{path}["{escaped}"]'


def contact_problem(event: Mapping[str, Any]) -> str | None:
    """Someone must have done it: identity for a known contact, annonid for an anonymous one
    (the schema's rule over the whole event; null counts as absent)."""
    if event.get("identity") is None and event.get("annonid") is None:
        return (
            "The event has neither identity nor annonid: pass identity for a known contact "
            "or annonid for an anonymous one."
        )
    return None


class Timestamp(Checked):
    """The required ``timestamp`` field, zone-less times handled as ``naive`` says."""

    def __init__(self, naive: NaiveTimestamps) -> None:
        super().__init__(
            lambda value: _timestamp(value, naive),
            f"timestamp is missing (or null): send when it happened, e.g. {_EXAMPLES}.",
        )
        self.naive: NaiveTimestamps = naive


class ActivitySchema(Schema):
    """One event of the Activity API. Unknown top-level fields are allowed and forwarded."""

    class Meta:
        unknown = INCLUDE

    activity_name = _text("activity_name", 'name the activity, e.g. "Purchase".')
    asset_id = _text("asset_id", "pass the website_id or app_id the activity is mapped to.")
    timestamp = Timestamp("forward")
    activity_source = Checked(
        _source, 'activity_source is missing (or null): "web" for a website, "app" for an app.'
    )
    activity_params = Checked(
        _params,
        "activity_params is missing (or null): send the activity's data as an object ({} if it "
        "has none).",
    )
    identity = Checked(_identity)
    annonid = Checked(_annonid)

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _has_contact(self, data: Any, original: Any, **kwargs: Any) -> None:
        error = contact_problem(original)
        if error:
            raise ValidationError(error)


class StrictTimestampSchema(ActivitySchema):
    """:class:`ActivitySchema` that also refuses timestamps without a zone."""

    timestamp = Timestamp("reject")


#: The schema of each choice of :data:`NaiveTimestamps`. Built once: building a schema costs far
#: more than validating one event with it.
SCHEMAS: dict[str, ActivitySchema] = {"forward": ActivitySchema(), "reject": StrictTimestampSchema()}


def validate_event(
    event: Any, *, naive_timestamps: NaiveTimestamps = "forward"
) -> dict[str, list[str]]:
    """Field errors of one event, ``{}`` when valid.

    Keys are field names, ``_schema`` for whole-event problems (not an object; neither
    identity nor annonid). Messages are sentences a person can act on and never echo the
    values of identity, annonid, email, mobile or anything in activity_params.

    ``naive_timestamps`` (the ``ACTIVITY_NAIVE_TIMESTAMPS`` setting) says what a timestamp
    without a zone is: ``forward`` (the default) lets it through, as the API takes it and
    documents it in its own samples; ``reject`` makes it a field error.
    """
    schema = SCHEMAS.get(naive_timestamps)
    if schema is None:
        choices = ", ".join(NAIVE_TIMESTAMP_CHOICES)
        raise ValueError(f"naive_timestamps={naive_timestamps!r}: must be one of {choices}")
    if not isinstance(event, dict):
        message = (
            f"The event is a JSON {json_type(event)}, not an object: send each event as an object "
            "with activity_name, asset_id, timestamp, activity_source, activity_params and "
            "identity or annonid."
        )
        return {"_schema": [message]}
    errors: dict[str, list[str]] = schema.validate(event)
    return errors


def has_naive_timestamp(event: Any) -> bool:
    """Whether the event's ``timestamp`` is a date-time of the documented shape with no zone
    (``2020-04-28T16:47:37``). No marshmallow: cheap enough for the upload stage to count
    and log such events (forwarded as they are, but their instant is a guess: see
    :func:`event_time`). Meant for events :func:`validate_event` passed; for any other
    value it only looks at the text, and is False when there is no such string.
    """
    if not isinstance(event, dict):
        return False
    value = event.get("timestamp")
    if type(value) is not str:
        return False
    match = _TIMESTAMP.fullmatch(value)
    return match is not None and match.group("zone") is None


def event_time(event: Mapping[str, Any]) -> datetime:
    """The aware datetime of a valid event's ``timestamp`` (``Z`` is read as UTC).

    A timestamp without a zone is read as UTC too. The API shows times in the panel's zone
    and stores the text as sent, so the true instant is unknown; UTC is the zone the API
    documents first and the one that needs no configuration. At worst the stale check is
    off by the panel's offset (under 14 hours) for such events.
    """
    when = datetime.fromisoformat(event["timestamp"])
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def is_stale(event: Mapping[str, Any], now: datetime) -> bool:
    """Whether a valid event is older than :data:`STALE_AFTER` at ``now`` (aware): still sent,
    stored by the API, but it will not trigger a journey. A zone-less time counts as UTC."""
    return now - event_time(event) > STALE_AFTER


def routing_key_of(event: Any) -> str | None:
    """The event's ``asset_id`` when it is a non-blank string, else None. No marshmallow: cheap
    enough to call before validation, e.g. to name the asset in a dead letter."""
    if isinstance(event, dict):
        asset_id = event.get("asset_id")
        if type(asset_id) is str and asset_id and not asset_id.isspace():
            return asset_id
    return None

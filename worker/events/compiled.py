"""The schema compiled: one plain function that decides whether an event is valid.

marshmallow is the reference (:mod:`worker.events.validation`): the rules are written there once,
and it explains every refusal in the field errors a dead letter holds. Building its objects
costs 17-45 us an event, though, most of it for events that are fine. The check made here
calls the schema's own rule functions directly, with marshmallow's handling of absent and null
values, in about 3 us for a typical event. The upload path asks it first and runs marshmallow
only for an event it refused, to say why.

What :func:`compile_schema` takes from a schema, and how it applies it:

- each :class:`~worker.events.validation.Checked` field's ``check``: a required field absent or
  null refuses the event; an optional one absent or null is not checked; otherwise the field's
  function must find no error (what the field's ``_deserialize`` raises on);
- the :class:`~worker.events.validation.Timestamp` field through
  :func:`~worker.events.validation.parse_timestamp`, the one reading of the timestamp: the
  check returns it, so validity, zone (naive or aware) and instant (the stale check) come from
  one parse;
- the whole-event rule, :func:`~worker.events.validation.contact_problem`.

A schema with anything else (another kind of field, a validator, a hook) does not compile:
:func:`compile_schema` raises at import, so a rule added to the schema cannot be skipped here
unnoticed. The two must agree on every event; ``tests/test_differential.py`` holds them to it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from worker.events.validation import (
    NAIVE_TIMESTAMP_CHOICES,
    SCHEMAS,
    ActivitySchema,
    Checked,
    NaiveTimestamps,
    Timestamp,
    contact_problem,
    parse_timestamp,
    zone_refused,
)

#: event -> its timestamp as read (naive when it has no zone) when the event is valid, else None.
Check = Callable[[Any], datetime | None]

#: One field's rule: value -> error sentence(s), or nothing (None, an empty list) when it is fine.
FieldRule = Callable[[Any], str | list[str] | None]

#: The schema-level hooks compile_schema knows: the contact rule (marshmallow's name for it).
_KNOWN_HOOKS: dict[str, list[str]] = {"validates_schema": ["_has_contact"]}


def compile_schema(schema: ActivitySchema) -> Check:
    """The rules of ``schema`` as one plain function (see the module docstring)."""
    hooks = {kind: [hook[0] for hook in found] for kind, found in schema._hooks.items() if found}
    if hooks != _KNOWN_HOOKS:
        raise TypeError(f"{type(schema).__name__} has hooks this compiler does not apply: {hooks}")
    required: list[tuple[str, FieldRule]] = []
    optional: list[tuple[str, FieldRule]] = []
    stamps: list[tuple[str, NaiveTimestamps]] = []
    for name, field in schema.load_fields.items():
        if not isinstance(field, Checked) or field.validators or field.data_key not in (None, name):
            raise TypeError(f"{type(schema).__name__}.{name}: only plain Checked fields compile")
        if isinstance(field, Timestamp):
            stamps.append((name, field.naive))
        else:
            (required if field.required else optional).append((name, field.check))
    if len(stamps) != 1:
        raise TypeError(f"{type(schema).__name__} needs exactly one Timestamp field, not {len(stamps)}")
    [(stamp, naive)] = stamps

    def valid_time(event: Any) -> datetime | None:
        if type(event) is not dict:
            return None
        for name, rule in required:
            value = event.get(name)
            if value is None or rule(value):
                return None
        for name, rule in optional:
            value = event.get(name)
            if value is not None and rule(value):
                return None
        when = parse_timestamp(event.get(stamp))
        if when is None or zone_refused(when, naive) or contact_problem(event):
            return None
        return when

    return valid_time


#: The compiled schema of each choice of ``ACTIVITY_NAIVE_TIMESTAMPS``.
CHECKS: dict[str, Check] = {choice: compile_schema(SCHEMAS[choice]) for choice in NAIVE_TIMESTAMP_CHOICES}


def valid_time(event: Any, *, naive_timestamps: NaiveTimestamps = "forward") -> datetime | None:
    """The event's timestamp as read (a naive datetime when it has no zone) when the event is
    valid by :func:`~worker.events.validation.validate_event`'s rules, else None: then
    ``validate_event`` says why."""
    return CHECKS[naive_timestamps](event)

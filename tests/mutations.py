"""A seeded mutation fuzzer's moves: events and their JSON texts, broken one rule at a time.

Each move takes a :class:`random.Random` and changes an event (or a text) in place the way a
producer's bug would: a field dropped, nulled or of another type, a timestamp with a digit, a
zone or a separator wrong, ``activity_source`` in another case, an empty array or a 65-bit
integer deep inside ``activity_params``, identity and annonid in every combination; at the text
level a key written twice, escapes, spaces, lone surrogates, NaN, huge numbers, deep nesting.
Most moves keep the event close to valid, so that both verdicts, valid and invalid, come up
often. :func:`mutated_event` and :func:`mutated_text` apply a few of them to a copy of a seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import Any

import orjson

from worker.events.validation import INT_MAX, INT_MIN

#: Values any field may be set to: every JSON type, the edges of each rule.
ODD_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 1.5, -0.0, float("nan"), float("inf"), float("-inf"),
    INT_MIN, INT_MIN - 1, INT_MAX, INT_MAX + 1, 2**63 - 1, 2**63, 10**30, -(10**30),
    "", " ", "\t\n", "\u3000", "\x1c", "\x85", "\xa0", "x", "Purchase", "😀", "0", "null",
    "web", "app", "WEB", "App", " web", "app\n", "ap p", [], [[]], [{}], [1], {}, {"a": []}, {"a": 1},
)

#: Timestamps a producer might send, right and wrong, to start a timestamp mutation from.
TIMESTAMPS: tuple[str, ...] = (
    "2021-12-29T12:06:28Z", "2021-12-29T06:12:28+05:30", "2020-04-28T16:47:37", "2024-02-29T23:59:59.999",
    "2021-12-29T12:06:28.123456789-08:00", "2021-02-28T00:00:00+00:00", "1999-12-31T23:59:59-23:59",
)

#: Zone suffixes, documented and not.
ZONES: tuple[str, ...] = ("", "Z", "z", "+00:00", "-00:00", "+05:30", "+0530", "+05", "+24:00", "-23:59",
                          "+23:60", "UTC", " Z", "Z\n")

#: Characters a timestamp's digits may be swapped for.
STAMP_CHARS = "0123456789T:-+.Z ,t\u0663"


def _pick_key(rng: random.Random, mapping: dict[str, Any]) -> str | None:
    return rng.choice(list(mapping)) if mapping else None


def set_field(rng: random.Random, event: dict[str, Any]) -> None:
    """A field (known or not) dropped, or set to an odd value."""
    name = rng.choice(("activity_name", "asset_id", "timestamp", "activity_source", "activity_params",
                       "identity", "annonid", "extra"))
    if rng.random() < 0.3:
        event.pop(name, None)
    else:
        event[name] = rng.choice(ODD_VALUES)


def contact(rng: random.Random, event: dict[str, Any]) -> None:
    """identity and annonid in every combination: absent, null, empty, blank, fine, another type."""
    choices = (None, "", " ", "jane@example.com", 0, -1, INT_MAX, INT_MAX + 1, INT_MIN - 1, True, 1.5, [], {})
    for name in ("identity", "annonid"):
        roll = rng.random()
        if roll < 0.3:
            event.pop(name, None)
        elif roll < 0.8:
            event[name] = rng.choice(choices)


def text_case(rng: random.Random, event: dict[str, Any]) -> None:
    """A text field in another case, padded, emptied or blank."""
    name = rng.choice(("activity_name", "asset_id", "activity_source", "annonid"))
    value = event.get(name)
    if not isinstance(value, str):
        value = "web"
    event[name] = rng.choice((value.upper(), value.title(), f" {value}", f"{value}\n", "", " \u2028",
                              value.lower(), value[:1]))


def timestamp(rng: random.Random, event: dict[str, Any]) -> None:
    """A timestamp with a character changed, dropped or added, another zone, an impossible day."""
    text = event.get("timestamp")
    text = text if isinstance(text, str) and text else rng.choice(TIMESTAMPS)
    move = rng.randrange(6)
    at = rng.randrange(len(text))
    if move == 0:
        text = text[:at] + rng.choice(STAMP_CHARS) + text[at + 1:]
    elif move == 1:
        text = text[:at] + text[at + 1:]
    elif move == 2:
        text = text[:at] + rng.choice(STAMP_CHARS) + text[at:]
    elif move == 3:
        text = re.sub(r"(Z|[+-]\d\d:\d\d)?$", lambda _: rng.choice(ZONES), text[:19], count=1) + text[19:]
    elif move == 4:  # an impossible (or just possible) date or time
        day = rng.choice(("02-28", "02-29", "02-30", "04-31", "12-32", "13-01", "00-10"))
        clock = rng.choice(("23:59:59", "24:00:00", "23:60:00", "23:59:60", "00:00:00"))
        text = f"{rng.choice(('2024', '2023', '1900', '2000', '0000', '0001', '9999'))}-{day}T{clock}{text[19:]}"
    else:  # fractions of every length
        text = text[:19] + "." + "1234567890"[:rng.randrange(11)] + rng.choice(ZONES)
    event["timestamp"] = text


def _containers(root: Any) -> list[Any]:
    found, stack = [], [root]
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list)):
            found.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return found


def params(rng: random.Random, event: dict[str, Any]) -> None:
    """Something put deep inside activity_params: an empty array, a 65-bit integer, NaN..."""
    root = event.get("activity_params")
    if not isinstance(root, dict):
        root = event["activity_params"] = {"a": [1]}
    target = rng.choice(_containers(root))
    value = rng.choice(([], [[]], {}, {"k": []}, INT_MAX, INT_MAX + 1, INT_MIN, INT_MIN - 1, float("nan"),
                        float("-inf"), 1e308, "", None, True, [0], {"k": 1}))
    if isinstance(target, dict):
        target[rng.choice(("x", "items", "a b", "é", "")) if rng.random() < 0.5 else _pick_key(rng, target) or "x"] = value
    elif target and rng.random() < 0.5:
        target[rng.randrange(len(target))] = value
    elif target and rng.random() < 0.5:
        target.clear()  # an array emptied
    else:
        target.append(value)


#: Every move on an event, each as likely.
EVENT_MOVES: tuple[Callable[[random.Random, dict[str, Any]], None], ...] = (
    set_field, contact, text_case, timestamp, timestamp, params, params)


def mutated_event(rng: random.Random, seed: dict[str, Any]) -> Any:
    """A copy of ``seed`` (valid, orjson-serialisable) with no to three moves; now and then not an object."""
    if rng.random() < 0.005:
        return rng.choice((None, [], [seed], "event", 7))
    event: dict[str, Any] = orjson.loads(orjson.dumps(seed))
    for _ in range(rng.choice((0, 1, 1, 1, 2, 2, 3))):
        rng.choice(EVENT_MOVES)(rng, event)
    return event


#: Text replacements for a number token, each a rule of the strict parser's (or not).
NUMBERS: tuple[str, ...] = ("1e400", "-1e400", "NaN", "Infinity", "-Infinity", "18446744073709551616",
                            "18446744073709551615", "-9223372036854775809", "-0", "1.0", "1E5", "1.50",
                            "01", "9" * 5000, "0.1e-400", "2.5e+3")

#: Text replacements inside a string: escapes that read alike, lone and reversed surrogates.
ESCAPES: tuple[str, ...] = ("\\u0041", "\\u00e9", "\\ud83d\\ude00", "\\ud800", "\\udc00", "\\ude00\\ud83d",
                            "\\ud83d", "\\\\ud800", "\\/", "\\n", "\u2028", "\x7f", "\\u0000")

_NUMBER = re.compile(r"(?<=[:\[,])-?\d[\d.eE+-]*")
_OBJECT_KEY = re.compile(r'\{"((?:[^"\\]|\\.)*)"')


def mutated_text(rng: random.Random, event: Any) -> str:
    """The event's JSON text, compact (as orjson writes it) or not, with a text-level move or none."""
    try:
        text = orjson.dumps(event).decode()
    except (TypeError, orjson.JSONEncodeError):  # 65-bit integers, NaN: written as json does
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    move = rng.randrange(14)
    if move == 0:  # a key written twice in one object
        found = list(_OBJECT_KEY.finditer(text))
        if found:
            hit = rng.choice(found)
            text = f'{text[:hit.start() + 1]}"{hit.group(1)}":{rng.choice(("1", "null", "[]"))},{text[hit.start() + 1:]}'
    elif move == 1:  # spaces: same value, not compact
        text = text.replace(":", ": ", rng.randrange(1, 4)).replace(",", ", ", rng.randrange(3))
    elif move == 2:  # an escape inside a string
        quotes = [m.start() for m in re.finditer('"', text)]
        if quotes:
            at = rng.choice(quotes) + 1
            text = text[:at] + rng.choice(ESCAPES) + text[at:]
    elif move == 3:
        numbers = list(_NUMBER.finditer(text))
        if numbers:
            hit = rng.choice(numbers)
            text = text[:hit.start()] + rng.choice(NUMBERS) + text[hit.end():]
    elif move == 4:  # nested deep, near the limit of 64 levels
        depth = rng.choice((58, 60, 61, 62, 63, 64, 70, 300))
        text = text[:-1] + ',"deep":' + "[" * depth + "]" * depth + "}" if text.endswith("}") else text
    elif move == 5:
        text = rng.choice(("\ufeff", " ", "\n", "")) + text + rng.choice(("", " ", "\n", "x", "\x00", "}"))
    elif move == 6:
        text = text[:rng.randrange(len(text) + 1)]
    elif move == 7:
        text = rng.choice(("[" + text + "]", "[" + text + "," + text + "]", "[]", "[1]", "null", "\"x\""))
    return text

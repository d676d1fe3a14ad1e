"""Message bodies: what comes back as events, and every way a body is refused whole.

Each refusal must be a :class:`MalformedBody` (never another exception, which would crash or
requeue the message forever) with a sentence a person can act on and a ``problem`` word.
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path
from typing import Any

import pytest

from worker.events.parsing import (
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    MalformedBody,
    parse_body,
    raw_text,
)

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent / "fixtures"

EVENT: dict[str, Any] = {
    "asset_id": "sdbsjdh623jhmsndbkfs",
    "activity_name": "Purchase",
    "timestamp": "2021-12-29T12:06:28Z",
    "identity": "jane@example.com",
    "activity_source": "web",
    "activity_params": {"currency": "INR", "items": [{"price": 250.3, "quantity": 1}]},
}
ONE = json.dumps(EVENT).encode()


def refused(body: bytes | str, **kwargs: Any) -> MalformedBody:
    with pytest.raises(MalformedBody) as caught:
        parse_body(body, **kwargs)
    exc = caught.value
    assert exc.error.endswith(".") and exc.error[0].isupper(), exc.error
    assert isinstance(exc.details.get("problem"), str)
    assert "jane@example.com" not in exc.error + json.dumps(exc.details)
    return exc


@pytest.mark.parametrize("name", ["vendor_single_sample.txt", "vendor_bulk_sample.txt"])
def test_the_vendor_samples_are_not_json(name: str) -> None:
    exc = refused((FIXTURES / name).read_bytes())
    assert exc.details["problem"] == "not_json"
    assert "not valid JSON (line" in exc.error


MALFORMED: list[Any] = [
    # id, body, parse_body keyword arguments, problem, fragment of the message
    ("not-json", b"{'asset_id': 'x'}", {}, "not_json", "not valid JSON (line 1, column 2"),
    ("trailing-comma", b'[{"a": 1},]', {}, "not_json", "not valid JSON"),
    ("two-documents", ONE + ONE, {}, "not_json", "Extra data"),
    ("truncated", ONE[:-5], {}, "not_json", "not valid JSON"),
    ("latin-1", '{"activity_name": "Café"}'.encode("latin-1"), {}, "not_utf8", "byte 0xe9"),
    ("utf-8-bom", b"\xef\xbb\xbf" + ONE, {}, "bom", "byte-order mark (BOM)"),
    ("utf-16-bom", json.dumps(EVENT).encode("utf-16"), {}, "not_utf8", "UTF-16"),
    ("utf-16-le-no-bom", json.dumps(EVENT).encode("utf-16-le"), {}, "not_utf8", "UTF-16"),
    ("utf-32", json.dumps(EVENT).encode("utf-32"), {}, "not_utf8", "UTF-32"),
    ("empty", b"", {}, "empty", "empty or only whitespace"),
    ("whitespace", b" \r\n\t ", {}, "empty", "empty or only whitespace"),
    ("null", b"null", {}, "not_object", "a JSON null"),
    ("number", b"42", {}, "not_object", "a JSON number"),
    ("string", b'"Purchase"', {}, "not_object", "a JSON string"),
    ("true", b"true", {}, "not_object", "a JSON boolean"),
    ("empty-array", b"[]", {}, "empty_array", "empty array"),
    ("empty-array-spaced", b" [ \n ] ", {}, "empty_array", "empty array"),
    ("nan", b'{"activity_params": {"price": NaN}}', {}, "not_finite", "NaN, Infinity"),
    ("infinity", b"[{}, {\"x\": Infinity}]", {}, "not_finite", "NaN, Infinity"),
    ("minus-infinity", b'{"x": -Infinity}', {}, "not_finite", "NaN, Infinity"),
    ("float-overflow", b'{"x": 1e400}', {}, "not_finite", "too large for a double"),
    ("duplicate-key", b'{"identity": "a", "identity": "b"}', {}, "duplicate_key", '"identity" twice'),
    ("duplicate-key-deep", b'[{"p": {"items": [{"q": 1, "q": 1}]}}]', {}, "duplicate_key", '"q" twice'),
    ("lone-high-surrogate", b'{"x": "\\ud800"}', {}, "lone_surrogate", "lone UTF-16 surrogate"),
    ("lone-low-surrogate", b'{"x": "a\\udc00b"}', {}, "lone_surrogate", "lone UTF-16 surrogate"),
    ("reversed-pair", b'{"x": "\\ude00\\ud83d"}', {}, "lone_surrogate", "lone UTF-16 surrogate"),
    ("high-at-end", b'{"x": "\\ud83d"}', {}, "lone_surrogate", "lone UTF-16 surrogate"),
    ("surrogate-in-key", b'{"\\udfff": 1}', {}, "lone_surrogate", "lone UTF-16 surrogate"),
    ("lone-surrogate-str", '{"x": "\ud800"}', {}, "not_utf8", "not UTF-8"),
    ("5000-digit-integer", b'{"x": ' + b"9" * 5000 + b"}", {}, "number_too_long", "as strings"),
    ("nesting-10000", b"[" * 10_000 + b"]" * 10_000, {}, "too_deep", "more than 64 levels"),
    ("nesting-10000-open", b'{"a":' * 10_000, {}, "too_deep", "more than 64 levels"),
    ("nesting-65", b"[" * 65 + b"]" * 65, {}, "too_deep", "more than 64 levels"),
    ("nesting-65-objects", b'{"a":' * 64 + b"[]" + b"}" * 64, {}, "too_deep", "Flatten it"),
    ("over-max-bytes", ONE, {"max_bytes": len(ONE) - 1}, "too_large", "over the limit of"),
    ("str-over-max-bytes", "é" * 60, {"max_bytes": 100}, "too_large", "over the limit of 100"),
    ("over-max-events", json.dumps([EVENT] * 4), {"max_events": 3}, "too_many_events", "holds 4 events"),
    ("text-plain", ONE, {"content_type": "text/plain"}, "content_type", "not application/json"),
    ("json-latin1", ONE, {"content_type": "application/json; charset=latin-1"}, "content_type", "UTF-8"),
    ("octet-stream", ONE, {"content_type": "application/octet-stream"}, "content_type", "Publish with"),
    ("x-python-serialize", ONE, {"content_type": "application/x-python-serialize"}, "content_type", "json"),
    ("gzip", ONE, {"content_encoding": "gzip"}, "content_encoding", "neither utf-8 nor binary"),
    ("encoding-utf-16", ONE, {"content_encoding": "utf-16"}, "content_encoding", "content_encoding utf-8"),
]


@pytest.mark.parametrize(("body", "kwargs", "problem", "fragment"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_bodies_are_refused_with_a_reason(
    body: bytes | str, kwargs: dict[str, Any], problem: str, fragment: str
) -> None:
    exc = refused(body, **kwargs)
    assert exc.details["problem"] == problem
    assert fragment in exc.error


def test_a_5000_digit_integer_is_refused_only_because_python_will_not_read_it() -> None:
    body = b'{"x": ' + b"9" * 5000 + b"}"
    limit = sys.get_int_max_str_digits()
    if limit == 0 or limit >= 5000:
        assert parse_body(body)[0]["x"] == int("9" * 5000)
    else:
        assert refused(body).details["problem"] == "number_too_long"


def test_invalid_json_says_where() -> None:
    exc = refused(b'[\n{"a": 1,\n "b" 2}]')
    assert exc.details == {"problem": "not_json", "line": 3, "column": 6, "position": 16}
    assert "(line 3, column 6: Expecting ':' delimiter)" in exc.error


def test_a_real_11_mb_body_is_refused_before_parsing() -> None:
    body = json.dumps([EVENT] * (11 * 1024 * 1024 // len(ONE) + 1)).encode()
    assert len(body) > 11 * 1024 * 1024
    exc = refused(body)
    assert exc.details == {"problem": "too_large", "size": len(body), "max_bytes": MAX_MESSAGE_BYTES}


VALID: list[Any] = [
    # id, body, parse_body keyword arguments, expected events
    ("object", ONE, {}, [EVENT]),
    ("array", json.dumps([EVENT, EVENT]).encode(), {}, [EVENT, EVENT]),
    ("str-body", json.dumps(EVENT), {}, [EVENT]),
    ("memoryview", memoryview(ONE), {}, [EVENT]),
    ("non-objects-kept", b'[{"a": 1}, 2, null, "x", [], {}]', {}, [{"a": 1}, 2, None, "x", [], {}]),
    ("surrounding-whitespace", b"\n  " + ONE + b"\r\n", {}, [EVENT]),
    ("raw-utf-8", '{"n": "Café ☕ 😀"}'.encode(), {}, [{"n": "Café ☕ 😀"}]),
    ("escaped-pair", b'{"n": "\\ud83d\\ude00 \\u00e9"}', {}, [{"n": "😀 é"}]),
    ("escaped-backslash-then-u", b'{"n": "\\\\ud800"}', {}, [{"n": "\\ud800"}]),
    ("big-integer-kept-exact", b'{"n": 123456789012345678901234567890}', {},
     [{"n": 123456789012345678901234567890}]),
    ("same-key-in-two-objects", b'[{"a": 1}, {"a": 2}]', {}, [{"a": 1}, {"a": 2}]),
    ("nesting-64", b"[" * 64 + b"]" * 64, {}, [json.loads(b"[" * 63 + b"]" * 63)]),
    ("brackets-in-strings", json.dumps([{"s": "[[[{{{" * 50}]).encode(), {}, [{"s": "[[[{{{" * 50}]),
    ("max-events-exactly", json.dumps([EVENT] * 3).encode(), {"max_events": 3}, [EVENT] * 3),
    ("max-bytes-exactly", ONE, {"max_bytes": len(ONE)}, [EVENT]),
    ("content-type-json", ONE, {"content_type": "application/json"}, [EVENT]),
    ("content-type-params", ONE, {"content_type": "Application/JSON; charset=UTF-8"}, [EVENT]),
    ("content-type-empty", ONE, {"content_type": ""}, [EVENT]),
    ("encoding-utf-8", ONE, {"content_encoding": "utf-8"}, [EVENT]),
    ("encoding-utf8", ONE, {"content_encoding": "UTF8"}, [EVENT]),
    ("encoding-binary", ONE, {"content_encoding": "binary"}, [EVENT]),
]


@pytest.mark.parametrize(("body", "kwargs", "expected"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_bodies_give_their_events(body: Any, kwargs: dict[str, Any], expected: list[Any]) -> None:
    assert parse_body(body, **kwargs) == expected


def test_numbers_keep_their_types() -> None:
    (event,) = parse_body(b'{"i": 1, "f": 1.0, "e": 1e2, "neg": -0, "t": true}')
    assert [type(v) for v in event.values()] == [int, float, float, int, bool]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"plain", "plain"),
        ("é ☕".encode(), "é ☕"),
        (b"ab\xffc\xe9", "ab\\xffc\\xe9"),
        ("lone \ud800", "lone \\ud800"),
        (b"\xef\xbb\xbf{}", "\ufeff{}"),
    ],
    ids=["ascii", "utf-8", "not-utf-8", "lone-surrogate-str", "bom"],
)
def test_raw_text_keeps_every_byte_visible(body: bytes | str, expected: str) -> None:
    text = raw_text(body)
    assert text == expected
    text.encode("utf-8")  # always storable in a UTF-8 dead letter


def test_raw_text_never_cuts_a_body() -> None:
    """A dead letter's body is data: 11 MB of it stay 11 MB, bad bytes shown in place."""
    body = b"z" * (11 * 1024 * 1024) + b"\xff" + "é".encode()
    assert raw_text(body) == "z" * (11 * 1024 * 1024) + "\\xffé"


def test_parsing_a_typical_event_is_cheap() -> None:
    """Not a benchmark: catches an accidental slow path (a second parse, a char-by-char loop)."""
    assert len(ONE) < 1000
    best = min(timeit.repeat(lambda: parse_body(ONE), number=200, repeat=5)) / 200
    assert best < 0.001, f"{best * 1e6:.0f} us per event"
    assert MAX_DEPTH == 64

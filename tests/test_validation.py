"""Event rules (CONTRACT.md "The event"): each bad kind names its field and says what to do.

Every case starts from one valid event and changes one thing, so a failure points at one rule.
"""

from __future__ import annotations

import copy
import json
import timeit
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from worker.events.validation import (
    NAIVE_TIMESTAMP_CHOICES,
    STALE_AFTER,
    ActivitySchema,
    event_time,
    has_naive_timestamp,
    is_stale,
    routing_key_of,
    validate_event,
)

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent / "fixtures"

#: Personal data that must never show up in an error message.
EMAIL = "jane.doe+vip@example.com"
MOBILE = "+919876543210"
ANON = "anon-7f3c2a9e-secret"

GOOD: dict[str, Any] = {
    "asset_id": "sdbsjdh623jhmsndbkfs",
    "activity_name": "Purchase",
    "timestamp": "2021-12-29T12:06:28Z",
    "identity": EMAIL,
    "activity_source": "web",
    "activity_params": {
        "customer_user_id": "xxxxxx",
        "total_item_qty": 2,
        "currency": "INR",
        "email": EMAIL,
        "mobile": MOBILE,
        "items": [
            {"mrp": 250.1, "price": 250.3, "quantity": 1, "product_name": "Micro-Essence"},
            {"mrp": 620.3, "price": 496.8, "quantity": 1, "tags": ["a"], "product_name": "Eraser"},
        ],
    },
}

_DROP = object()


def event(**changes: Any) -> dict[str, Any]:
    """A copy of :data:`GOOD` with fields replaced, or removed when given ``_DROP``."""
    result = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is _DROP:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def params(**changes: Any) -> dict[str, Any]:
    return {**GOOD["activity_params"], **changes}


TZ = "add Z (UTC) or an offset"
ISO = "not an ISO-8601 date-time"
EMPTY_ARRAY = "is an empty array: the API silently drops such events"

BAD: list[Any] = [
    # id, event, field that must be in the errors, fragment of its message
    ("name-missing", event(activity_name=_DROP), "activity_name", "activity_name is missing"),
    ("name-null", event(activity_name=None), "activity_name", "activity_name is missing (or null)"),
    ("name-empty", event(activity_name=""), "activity_name", "activity_name is empty"),
    ("name-blank", event(activity_name=" \t\n"), "activity_name", "activity_name is empty"),
    ("name-number", event(activity_name=7), "activity_name", "must be a string, not a JSON number"),
    ("name-list", event(activity_name=["Purchase"]), "activity_name", "not a JSON array"),
    ("asset-missing", event(asset_id=_DROP), "asset_id", "website_id or app_id"),
    ("asset-null", event(asset_id=None), "asset_id", "asset_id is missing (or null)"),
    ("asset-empty", event(asset_id=""), "asset_id", "asset_id is empty"),
    ("asset-blank", event(asset_id="   "), "asset_id", "asset_id is empty"),
    ("asset-number", event(asset_id=12345), "asset_id", "not a JSON number"),
    ("ts-missing", event(timestamp=_DROP), "timestamp", "timestamp is missing"),
    ("ts-null", event(timestamp=None), "timestamp", "timestamp is missing (or null)"),
    ("ts-impossible-date", event(timestamp="2021-02-30T12:06:28Z"), "timestamp", "not a real date"),
    ("ts-hour-24", event(timestamp="2021-12-29T24:00:00Z"), "timestamp", "not a real date"),
    ("ts-leap-second", event(timestamp="2016-12-31T23:59:60Z"), "timestamp", "not a real date"),
    ("ts-year-0", event(timestamp="0000-01-01T00:00:00Z"), "timestamp", "not a real date"),
    ("ts-naive-impossible-date", event(timestamp="2021-02-30T12:06:28"), "timestamp", "not a real date"),
    ("ts-naive-hour-24", event(timestamp="2021-12-29T24:00:00"), "timestamp", "not a real date"),
    ("ts-date-only", event(timestamp="2021-12-29"), "timestamp", ISO),
    ("ts-basic-format", event(timestamp="20211229T120628Z"), "timestamp", ISO),
    ("ts-space", event(timestamp="2021-12-29 12:06:28Z"), "timestamp", ISO),
    ("ts-no-seconds", event(timestamp="2021-12-29T12:06Z"), "timestamp", "with seconds"),
    ("ts-naive-no-seconds", event(timestamp="2021-12-29T12:06"), "timestamp", "with seconds"),
    ("ts-naive-space", event(timestamp="2021-12-29 12:06:28"), "timestamp", ISO),
    ("ts-lower-z", event(timestamp="2021-12-29t12:06:28z"), "timestamp", ISO),
    ("ts-offset-no-colon", event(timestamp="2021-12-29T06:12:28+0530"), "timestamp", ISO),
    ("ts-offset-hours-only", event(timestamp="2021-12-29T06:12:28+05"), "timestamp", ISO),
    ("ts-offset-24h", event(timestamp="2021-12-29T06:12:28+24:00"), "timestamp", ISO),
    ("ts-trailing-newline", event(timestamp="2021-12-29T12:06:28Z\n"), "timestamp", ISO),
    ("ts-rfc-2822", event(timestamp="Wed, 29 Dec 2021 12:06:28 GMT"), "timestamp", ISO),
    ("ts-empty", event(timestamp=""), "timestamp", ISO),
    ("ts-epoch-int", event(timestamp=1640779588), "timestamp", "epoch numbers are not accepted"),
    ("ts-epoch-string", event(timestamp="1640779588"), "timestamp", ISO),
    ("source-missing", event(activity_source=_DROP), "activity_source", '"web" for a website'),
    ("source-null", event(activity_source=None), "activity_source", "activity_source is missing"),
    ("source-upper", event(activity_source="WEB"), "activity_source", '"web" or "app" (lower case'),
    ("source-padded", event(activity_source=" app"), "activity_source", "no spaces"),
    ("source-other", event(activity_source="email"), "activity_source", 'exactly "web" or "app".'),
    ("source-bool", event(activity_source=True), "activity_source", "not a JSON boolean"),
    ("params-missing", event(activity_params=_DROP), "activity_params", "as an object ({} if"),
    ("params-null", event(activity_params=None), "activity_params", "activity_params is missing"),
    ("params-array", event(activity_params=[{"a": 1}]), "activity_params", "not a JSON array"),
    ("params-string", event(activity_params="{}"), "activity_params", "not a JSON string"),
    ("params-empty-array", event(activity_params=params(items=[])), "activity_params",
     f"activity_params.items {EMPTY_ARRAY}"),
    ("params-empty-array-deep", event(activity_params=params(items=[{"a": 1}, {"b": 2}, {"tags": []}])),
     "activity_params", f"activity_params.items[2].tags {EMPTY_ARRAY}"),
    ("params-empty-array-in-array", event(activity_params={"m": [[1], []]}), "activity_params",
     f"activity_params.m[1] {EMPTY_ARRAY}"),
    ("params-empty-array-odd-key", event(activity_params={"a b": {"c-d": []}}), "activity_params",
     'activity_params["a b"]["c-d"] is an empty array'),
    ("params-huge-int", event(activity_params={"n": 2**64}), "activity_params",
     "activity_params.n is an integer beyond 64 bits: send it as a string"),
    ("params-nan", event(activity_params={"p": [1.0, float("nan")]}), "activity_params",
     "activity_params.p[1] is NaN or Infinity"),
    ("params-inf", event(activity_params={"p": float("-inf")}), "activity_params", "NaN or Infinity"),
    ("identity-empty", event(identity=""), "identity", "identity is empty"),
    ("identity-bool", event(identity=True), "identity", "string or an integer, not a JSON boolean"),
    ("identity-float", event(identity=12.5), "identity", "not a JSON number"),
    ("identity-object", event(identity={"email": EMAIL}), "identity", "not a JSON object"),
    ("identity-huge-int", event(identity=-(2**63) - 1), "identity", "beyond 64 bits"),
    ("annonid-empty", event(identity=_DROP, annonid=""), "annonid", "annonid is empty"),
    ("annonid-int", event(annonid=123), "annonid", "annonid must be a string, not a JSON number"),
    ("no-contact", event(identity=_DROP), "_schema", "neither identity nor annonid"),
    ("both-null", event(identity=None, annonid=None), "_schema", "neither identity nor annonid"),
    ("empty-object", {}, "_schema", "neither identity nor annonid"),
    ("not-object-list", [GOOD], "_schema", "The event is a JSON array, not an object"),
    ("not-object-string", json.dumps(GOOD), "_schema", "a JSON string, not an object"),
    ("not-object-null", None, "_schema", "a JSON null, not an object"),
]


@pytest.mark.parametrize("naive_timestamps", NAIVE_TIMESTAMP_CHOICES)
@pytest.mark.parametrize(("bad", "field", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_events_name_the_field_and_say_why(bad: Any, field: str, fragment: str, naive_timestamps: str) -> None:
    errors = validate_event(bad, naive_timestamps=naive_timestamps)  # type: ignore[arg-type]
    assert field in errors, errors
    assert any(fragment in message for message in errors[field]), errors[field]
    text = json.dumps(errors)
    for secret in (EMAIL, MOBILE, ANON):
        assert secret not in text
    assert all(m.endswith(".") for messages in errors.values() for m in messages)


def test_only_the_broken_field_is_reported() -> None:
    assert set(validate_event(event(activity_source="WEB"))) == {"activity_source"}


def test_every_problem_of_a_broken_event_is_reported() -> None:
    errors = validate_event({"identity": True, "activity_source": "App", "activity_params": {"x": []}})
    assert set(errors) == {"activity_name", "asset_id", "timestamp", "activity_source", "activity_params",
                           "identity"}


def test_no_message_echoes_personal_data() -> None:
    """Values of identity, annonid, email, mobile and activity_params stay out of every message."""
    leaky = {
        "asset_id": "",
        "timestamp": EMAIL,
        "identity": {"email": EMAIL, "mobile": MOBILE},
        "annonid": 987654321,
        "activity_source": MOBILE,
        "activity_params": {"email": EMAIL, "mobile": MOBILE, "tags": [], "n": {"id": 2**70}},
    }
    errors = validate_event(leaky)
    assert {"identity", "annonid", "timestamp", "activity_source", "activity_params"} <= set(errors)
    text = json.dumps(errors)
    for secret in (EMAIL, MOBILE, "987654321", str(2**70)):
        assert secret not in text


VALID: list[Any] = [
    ("as-is", GOOD),
    ("utc-z", event(timestamp="2021-12-29T12:06:28Z")),
    ("offset-ist", event(timestamp="2021-12-29T06:12:28+05:30")),
    ("offset-negative", event(timestamp="2021-12-29T06:12:28-08:00")),
    ("offset-zero", event(timestamp="2021-12-29T12:06:28+00:00")),
    ("fraction-ms", event(timestamp="2021-12-29T12:06:28.123Z")),
    ("fraction-us-offset", event(timestamp="2021-12-29T12:06:28.123456+05:30")),
    ("fraction-ns", event(timestamp="2021-12-29T12:06:28.123456789Z")),
    ("leap-day", event(timestamp="2024-02-29T00:00:00Z")),
    ("naive-vendor-sample", event(timestamp="2020-04-28T16:47:37")),
    ("naive-fraction", event(timestamp="2021-12-29T12:06:28.123")),
    ("naive-leap-day", event(timestamp="2024-02-29T23:59:59")),
    ("integer-identity", event(identity=1234567890)),
    ("zero-identity", event(identity=0)),
    ("max-unsigned-64-identity", event(identity=2**64 - 1)),
    ("annonid-only", event(identity=_DROP, annonid=ANON)),
    ("annonid-and-null-identity", event(identity=None, annonid=ANON)),
    ("identity-and-null-annonid", event(annonid=None)),
    ("both", event(annonid=ANON)),
    ("source-app", event(activity_source="app")),
    ("empty-params", event(activity_params={})),
    ("params-with-nulls-and-bools", event(activity_params={"a": None, "b": False, "c": [0, "", {}]})),
    ("unknown-fields-forwarded", event(campaign="winter", _meta={"x": []}, extra=[])),
    ("unicode", event(activity_name="Achat 🛒", asset_id="ассет-1",
                      activity_params={"nom": "Crème brûlée", "标签": ["甜点"]})),
    ("string-numbers", event(activity_params={"total_item_qty": "2", "price": "496.0"})),
]


@pytest.mark.parametrize("good", [v[1] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_events(good: dict[str, Any]) -> None:
    before = copy.deepcopy(good)
    assert validate_event(good) == {}
    assert good == before  # validation never changes the event it is given


def test_unknown_fields_pass_through_the_schema() -> None:
    loaded = ActivitySchema().load(event(campaign="winter"))
    assert loaded["campaign"] == "winter"


def vendor_bulk_as_json() -> list[dict[str, Any]]:
    """The vendor's bulk sample, syntax fixed: it never closes its second and third events."""
    text = (FIXTURES / "vendor_bulk_sample.txt").read_text(encoding="utf-8")
    second_end = ']\n},\n{\n"activity_name":"Add To Cart"'
    third_end = ']\n}\n]\n'
    assert text.count(second_end) == 1 and text.endswith(third_end)
    text = text.replace(second_end, ']\n}\n},\n{\n"activity_name":"Add To Cart"')
    text = text[: -len(third_end)] + ']\n}\n}\n]\n'
    return json.loads(text)


def test_vendor_bulk_sample_events_as_published() -> None:
    """The vendor's own Purchase sample has no zone and is valid; the other two forgot asset_id."""
    purchase, checkout, add_to_cart = vendor_bulk_as_json()
    assert purchase["timestamp"] == "2020-04-28T16:47:37"
    assert validate_event(purchase) == {}
    assert set(validate_event(checkout)) == {"asset_id"}  # the sample forgot it
    assert set(validate_event(add_to_cart)) == {"asset_id"}


def test_vendor_bulk_sample_events_are_valid_once_completed() -> None:
    events = vendor_bulk_as_json()
    for one in events[1:]:
        one["asset_id"] = events[0]["asset_id"]
    assert [validate_event(one) for one in events] == [{}, {}, {}]


# --- timestamps without a zone ----------------------------------------------------------------

#: (id, timestamp, has no zone): the vendor's samples first, then the edges of the shape.
ZONES: list[tuple[str, str, bool]] = [
    ("vendor-bulk-purchase", "2020-04-28T16:47:37", True),
    ("vendor-bulk-checkout", "2020-04-28T16:40:37Z", False),
    ("vendor-bulk-add-to-cart", "2020-04-25T10:20:37Z", False),
    ("vendor-doc-utc", "2021-12-29T12:06:28Z", False),
    ("vendor-doc-ist", "2021-12-29T06:12:28+05:30", False),
    ("naive-fraction", "2021-12-29T12:06:28.123456", True),
    ("naive-nanoseconds", "2021-12-29T12:06:28.123456789", True),
    ("zero-offset", "2021-12-29T12:06:28+00:00", False),
    ("negative-offset-fraction", "2021-12-29T12:06:28.5-08:00", False),
]


@pytest.mark.parametrize(("timestamp", "naive"), [z[1:] for z in ZONES], ids=[z[0] for z in ZONES])
def test_zone_less_timestamps_are_forwarded_by_default_and_rejected_on_request(timestamp: str, naive: bool) -> None:
    one = event(timestamp=timestamp)
    assert has_naive_timestamp(one) is naive
    assert validate_event(one) == {}
    assert validate_event(one, naive_timestamps="forward") == {}
    strict = validate_event(one, naive_timestamps="reject")
    if not naive:
        assert strict == {}
        return
    assert set(strict) == {"timestamp"}
    [message] = strict["timestamp"]
    assert TZ in message  # how to fix the event...
    assert "ACTIVITY_NAIVE_TIMESTAMPS=forward" in message  # ...or the worker
    assert message.endswith(".")


def test_a_zone_less_timestamp_is_one_problem_among_others_only_when_rejected() -> None:
    broken = event(timestamp="2020-04-28T16:47:37", activity_source="WEB")
    assert set(validate_event(broken)) == {"activity_source"}
    assert set(validate_event(broken, naive_timestamps="reject")) == {"timestamp", "activity_source"}


def test_an_unknown_choice_for_zone_less_timestamps_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match=r"naive_timestamps='strict': must be one of forward, reject"):
        validate_event(GOOD, naive_timestamps="strict")  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "naive"), [
    (event(timestamp="2020-04-28T16:47:37"), True),
    ({"timestamp": "2020-04-28T16:47:37"}, True),  # looks at the timestamp only
    (None, False), ([GOOD], False), ("2020-04-28T16:47:37", False),
    (event(timestamp=_DROP), False), (event(timestamp=None), False), (event(timestamp=1588092457), False),
    (event(timestamp="2020-04-28"), False), (event(timestamp="2020-04-28 16:47:37"), False),
    (event(timestamp="2020-04-28T16:47:37\n"), False),
], ids=["vendor", "bare", "none", "array", "string", "missing", "null", "epoch", "date-only", "space", "newline"])
def test_has_naive_timestamp_is_true_only_for_a_zone_less_date_time(value: Any, naive: bool) -> None:
    assert has_naive_timestamp(value) is naive


def test_has_naive_timestamp_is_cheap() -> None:
    """The upload stage calls it on every event: no marshmallow, no datetime."""
    naive = event(timestamp="2020-04-28T16:47:37")
    assert has_naive_timestamp(naive)
    best = min(timeit.repeat(lambda: has_naive_timestamp(naive), number=2000, repeat=5)) / 2000
    assert best < 0.00005, f"{best * 1e6:.1f} us per event"


NOW = datetime(2021, 12, 30, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("timestamp", "stale"),
    [
        ("2021-12-29T12:00:00Z", False),  # exactly 24 hours: not yet
        ("2021-12-29T11:59:59.999Z", True),
        ("2021-12-29T17:30:00+05:30", False),  # 12:00 UTC
        ("2021-12-29T17:29:59+05:30", True),
        ("2021-12-31T00:00:00Z", False),  # in the future
        ("2020-04-28T16:40:37Z", True),
        # no zone: read as UTC
        ("2021-12-29T12:00:00", False),
        ("2021-12-29T11:59:59.999", True),
        ("2020-04-28T16:47:37", True),  # the vendor's sample
    ],
)
def test_is_stale_with_an_injected_now(timestamp: str, stale: bool) -> None:
    assert is_stale(event(timestamp=timestamp), NOW) is stale and STALE_AFTER == timedelta(hours=24)


def test_event_time_is_aware() -> None:
    when = event_time(event(timestamp="2021-12-29T06:12:28.5+05:30"))
    assert when == datetime(2021, 12, 29, 0, 42, 28, 500000, tzinfo=timezone.utc)


def test_event_time_reads_a_zone_less_timestamp_as_utc() -> None:
    when = event_time(event(timestamp="2020-04-28T16:47:37"))
    assert when.utcoffset() == timedelta(0)
    assert when == datetime(2020, 4, 28, 16, 47, 37, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (GOOD, "sdbsjdh623jhmsndbkfs"),
        (event(asset_id="a"), "a"),
        (event(asset_id=""), None),
        (event(asset_id="  "), None),
        (event(asset_id=None), None),
        (event(asset_id=_DROP), None),
        (event(asset_id=42), None),
        (event(asset_id=["a"]), None),
        ([GOOD], None),
        ("sdbsjdh623jhmsndbkfs", None),
        (None, None),
    ],
    ids=["good", "short", "empty", "blank", "null", "missing", "number", "list", "array", "string", "none"],
)
def test_routing_key_of(value: Any, expected: str | None) -> None:
    assert routing_key_of(value) == expected


def test_validating_a_typical_event_is_cheap() -> None:
    """Not a benchmark: catches an accidental slow path (a schema built per call, say)."""
    best = min(timeit.repeat(lambda: validate_event(GOOD), number=200, repeat=5)) / 200
    assert best < 0.002, f"{best * 1e6:.0f} us per event"

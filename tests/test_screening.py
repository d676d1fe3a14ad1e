"""Screening a batch before its upload: once per event, once per batch, marshmallow to explain.

:func:`~worker.events.screening.screen` sorts a batch's texts into valid and refused events,
reading each timestamp once; the upload stage screens a batch on its first delivery only (the
batch travels on marked ``checked``); the compiled schema refuses to compile what it would not
apply. How screening agrees with the loop it replaced, on generated input: test_differential.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from marshmallow import ValidationError, fields, validates_schema

import worker.upload.delivery as delivery_module
from tests.test_delivery import ASSET, DLQ, NOW, event, harness, unavailable
from worker.broker.messages import Bundle, UploadBatch, read_bundle
from worker.events import compiled, screening, validation
from worker.events.compiled import compile_schema
from worker.events.screening import screen
from worker.events.validation import ActivitySchema, validate_event

pytestmark = pytest.mark.timeout(60)


def text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def test_a_batch_is_sorted_into_valid_and_refused_events_with_marshmallows_errors() -> None:
    two_days_ago = (NOW - timedelta(days=2)).isoformat()
    bad = event(2, activity_source="WEB", identity="")
    texts = [text(event(0)), '{"a":1,"a":2}', text(bad), text(event(3, timestamp="2025-12-31T20:00:00")),
             text(event(4, timestamp=two_days_ago)), "[" + text(event(5)) + "]"]
    found = screen(texts, now=NOW, naive_timestamps="forward")
    assert found.valid == [0, 3, 4]
    assert (found.naive, found.stale) == (1, 1)
    duplicate, invalid, array = found.refused
    assert (duplicate.index, duplicate.malformed, duplicate.details["problem"]) == (1, True, "duplicate_key")
    assert duplicate.raw == texts[1] and duplicate.event is None
    assert (invalid.index, invalid.malformed, invalid.event, invalid.raw) == (2, False, bad, None)
    assert invalid.details == validate_event(bad)  # the dead letter's details: marshmallow's, as they were
    assert invalid.error.startswith("The event breaks the API's rules (activity_source, identity): ")
    assert (array.index, array.malformed, array.details) == (5, True, {"problem": "not_object"})


def test_zone_less_timestamps_are_refused_when_the_setting_says_so() -> None:
    found = screen([text(event(0, timestamp="2025-12-31T20:00:00")), text(event(1))], now=NOW,
                   naive_timestamps="reject")
    assert found.valid == [1] and found.naive == 0
    (refused,) = found.refused
    assert "ACTIVITY_NAIVE_TIMESTAMPS" in refused.details["timestamp"][0]


def test_marshmallow_has_the_last_word_on_what_the_compiled_check_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(screening, "CHECKS", {"forward": lambda event: None})
    texts = [text(event(0, timestamp="2025-12-31T20:00:00")), text(event(1, timestamp="2020-01-01T00:00:00Z")),
             text(event(2, asset_id=""))]
    found = screen(texts, now=NOW, naive_timestamps="forward")
    assert found.valid == [0, 1] and (found.naive, found.stale) == (1, 1)
    assert [r.index for r in found.refused] == [2]


class CountingDatetime(datetime):
    """datetime, counting how often a timestamp is parsed."""

    parsed = 0

    @classmethod
    def fromisoformat(cls, date_string: str) -> datetime:
        CountingDatetime.parsed += 1
        return datetime.fromisoformat(date_string)


def test_each_timestamp_is_parsed_once_for_validity_zone_and_staleness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "datetime", CountingDatetime)
    CountingDatetime.parsed = 0
    texts = [text(event(i, timestamp=stamp)) for i, stamp in
             enumerate(["2025-12-31T20:00:00", "2020-01-01T00:00:00Z", "2025-12-31T23:00:00+05:30"] * 10)]
    found = screen(texts, now=NOW, naive_timestamps="forward")
    assert (len(found.valid), found.naive, found.stale) == (30, 10, 10)
    assert CountingDatetime.parsed == 30


def test_a_retried_batch_is_not_screened_again(monkeypatch: pytest.MonkeyPatch) -> None:
    down = harness(unavailable())
    down.deliver([event(0, activity_name=""), event(1), event(2)], replays=[4, 0, 3])
    (dead,) = down.dead_letters
    assert dead["reason"] == "invalid" and dead["replays"] == 4
    ((_, retry),) = down.retries
    assert retry.checked and len(retry) == 2 and retry.replays == [0, 3]  # the valid events, their replays

    def screened_again(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a retried batch was screened again")

    monkeypatch.setattr(delivery_module, "screen", screened_again)
    up = harness()
    report = up.delivery.deliver(Bundle([retry]))
    assert report.delivered == 2 and [e["activity_params"]["i"] for e in up.client.delivered] == [1, 2]
    assert (report.stale, report.naive, report.invalid) == (0, 0, 0)


def test_the_mark_travels_with_the_batch_and_an_older_message_reads_without_it() -> None:
    checked = UploadBatch(ASSET, ["{}", "[]"], checked=True)
    wire = checked.to_wire()
    assert wire["checked"] is True and read_bundle([[wire]]).batches[0].checked
    assert checked.part([1]).checked and not checked.part([1], checked=False).checked
    del wire["checked"]
    assert not read_bundle([[wire]]).batches[0].checked
    assert "checked" not in UploadBatch(ASSET, ["{}"]).to_wire()


def test_an_unchecked_batch_is_screened_whatever_its_attempts() -> None:
    h = harness()
    report = h.deliver([event(0), event(1, timestamp="not a time")], attempts=2)
    assert report.delivered == 1 and report.dead == {"invalid": 1}
    assert [m.queue for m in h.messages] == [DLQ]


# --- what the compiler refuses to compile -------------------------------------------------------------


class WithAPlainField(ActivitySchema):
    campaign = fields.String()


class WithAnotherRule(ActivitySchema):
    @validates_schema
    def _no_tests(self, data: Any, **kwargs: Any) -> None:
        if data.get("activity_name") == "test":
            raise ValidationError("no tests")


@pytest.mark.parametrize("schema", [WithAPlainField, WithAnotherRule])
def test_a_rule_the_compiler_does_not_know_stops_it(schema: type[ActivitySchema]) -> None:
    with pytest.raises(TypeError, match="compile|compiler"):
        compile_schema(schema())


def test_both_choices_are_compiled_from_their_schemas() -> None:
    naive = {**event(0), "timestamp": "2025-12-31T20:00:00"}
    forward, reject = compiled.CHECKS["forward"](naive), compiled.CHECKS["reject"](naive)
    assert forward == datetime(2025, 12, 31, 20) and reject is None
    assert compiled.valid_time(event(0)) == datetime(2025, 12, 31, 18, tzinfo=timezone.utc)


# --- each body read once --------------------------------------------------------------------------------


class Reads:
    """orjson.loads, counting its calls."""

    def __init__(self) -> None:
        import orjson

        self.loads, self.calls = orjson.loads, 0

    def __call__(self, data: Any) -> Any:
        self.calls += 1
        return self.loads(data)


@pytest.mark.parametrize("body", [json.dumps([event(i) for i in range(50)], separators=(",", ":")).encode(),
                                  text(event(0)).encode()], ids=["array", "single"])
def test_the_consumer_reads_a_body_once(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import orjson

    from bench.upload import Message
    from worker.ingest.decoding import events_of

    reads = Reads()
    monkeypatch.setattr(orjson, "loads", reads)
    assert len(events_of(Message(body))) == (50 if body.startswith(b"[") else 1)
    assert reads.calls == 1

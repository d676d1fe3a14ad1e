"""Hostile input, through the real worker: each kind ends in the dead-letter queue with a
reason a person can act on, the valid neighbours are delivered, the worker stays up and its
memory stays bounded.

One worker run serves every case (starting a worker per case would take minutes); each case
is then its own test, reading that run's dead letters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    DeadLetters,
    QueueSet,
    WorkerProcess,
    event,
    event_id_of,
    publish_events,
    publish_raw,
    require_broker,
)
from worker.deadletter import envelopes as deadletter
from worker.deadletter.reader import Letters
from worker.sandbox import Sandbox

API_KEY = "hostile-key"


@dataclass(frozen=True)
class Body:
    """A whole message body that holds no readable events: one ``malformed`` dead letter."""

    body: bytes
    problem: str
    content_type: str | None = "application/json"
    encoding: str | None = None


def ev(case: str, **changes: Any) -> dict[str, Any]:
    """A valid event named after its case, then broken by ``changes`` (None removes a field)."""
    e = event(case)
    for key, value in changes.items():
        if value is None:
            e.pop(key, None)
        else:
            e[key] = value
    return e


GOOD = json.dumps(event("unused")).encode()
NESTED = b'{"asset_id":"a","x":' + b"[" * 10_000 + b"]" * 10_000 + b"}"

BODIES: dict[str, Body] = {
    "not-json": Body(b"{oops", "not_json"),
    "truncated-array": Body(b'[{"asset_id": "a"}, ', "not_json"),
    "not-utf8": Body(b'{"asset_id": "\xff\xfe"}', "not_utf8"),
    "utf8-bom": Body(b"\xef\xbb\xbf" + GOOD, "bom"),
    "utf16": Body(GOOD.decode().encode("utf-16"), ""),
    "empty": Body(b"", "empty"),
    "whitespace": Body(b"  \n\t ", "empty"),
    "null": Body(b"null", "not_object"),
    "number": Body(b"42", "not_object"),
    "string": Body(b'"an event"', "not_object"),
    "boolean": Body(b"true", "not_object"),
    "empty-array": Body(b"[]", "empty_array"),
    "nan": Body(GOOD[:-1] + b', "x": NaN}', "not_finite"),
    "infinity": Body(GOOD[:-1] + b', "x": -Infinity}', "not_finite"),
    "lone-surrogate": Body(GOOD[:-1] + b', "x": "\\ud800"}', "lone_surrogate"),
    "5000-digit-integer": Body(GOOD[:-1] + b', "x": ' + b"9" * 5000 + b"}", "number_too_long"),
    "nesting-10000-deep": Body(NESTED, "too_deep"),
    "20-MB-message": Body(b'{"asset_id": "a", "blob": "' + b"x" * (20 * 1024 * 1024) + b'"}', "too_large"),
    "100000-events": Body(b"[" + b",".join([b"{}"] * 100_000) + b"]", "too_many_events"),
    "pickle-content-type": Body(GOOD[:-1] + b', "case": 1}', "content_type",
                                content_type="application/x-python-serialize"),
    "utf16-encoding": Body(GOOD[:-1] + b', "case": 2}', "content_encoding", encoding="utf-16"),
}

#: Cases that are one bad event each: (the event, the field the error must name).
EVENTS: dict[str, tuple[Any, str]] = {
    "activity_name-missing": (ev("activity_name-missing", activity_name=None), "activity_name"),
    "activity_name-null": ({**ev("activity_name-null"), "activity_name": None}, "activity_name"),
    "activity_name-empty": (ev("activity_name-empty", activity_name=""), "activity_name"),
    "activity_name-number": (ev("activity_name-number", activity_name=7), "activity_name"),
    "asset_id-missing": (ev("asset_id-missing", asset_id=None), "asset_id"),
    "asset_id-null": ({**ev("asset_id-null"), "asset_id": None}, "asset_id"),
    "asset_id-empty": (ev("asset_id-empty", asset_id=""), "asset_id"),
    "asset_id-number": (ev("asset_id-number", asset_id=12), "asset_id"),
    "timestamp-missing": (ev("timestamp-missing", timestamp=None), "timestamp"),
    "timestamp-null": ({**ev("timestamp-null"), "timestamp": None}, "timestamp"),
    "timestamp-impossible": (ev("timestamp-impossible", timestamp="2021-02-30T10:00:00Z"), "timestamp"),
    "timestamp-epoch": (ev("timestamp-epoch", timestamp=1640779588), "timestamp"),
    "timestamp-date-only": (ev("timestamp-date-only", timestamp="2021-12-29"), "timestamp"),
    "source-WEB": (ev("source-WEB", activity_source="WEB"), "activity_source"),
    "source-missing": (ev("source-missing", activity_source=None), "activity_source"),
    "params-missing": (ev("params-missing", activity_params=None), "activity_params"),
    "params-array": (ev("params-array", activity_params=[{"event_id": "params-array"}]), "activity_params"),
    "params-empty-array-deep": (
        ev("params-empty-array-deep",
           activity_params={"event_id": "params-empty-array-deep", "items": [{"tags": []}]}),
        "activity_params",
    ),
    "no-identity-nor-annonid": (ev("no-identity-nor-annonid", identity=None), "_schema"),
    "identity-boolean": (ev("identity-boolean", identity=True), "identity"),
    "identity-list": (ev("identity-list", identity=["a"]), "identity"),
    "megabyte-string": (
        ev("megabyte-string", activity_params={"event_id": "megabyte-string", "note": "x" * 1_000_000}),
        "_schema",
    ),
}


@dataclass
class Run:
    dead: list[dict[str, Any]]
    delivered: list[Any]
    worker_alive: bool
    peak_rss_mb: float


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    require_broker()
    queues = QueueSet()
    queues.declare()
    dead = DeadLetters(queues.settings.dead_letter_queue)
    try:
        with Sandbox(api_key=API_KEY) as sandbox:
            for body in BODIES.values():
                publish_raw(queues.settings.queue, [body.body], content_type=body.content_type,
                            headers={}, encoding=body.encoding)
            publish_events(queues.settings.queue, [e for e, _ in EVENTS.values()])
            # neighbours: a valid event beside a non-object item; unknown fields; the vendor's own
            # zone-less timestamp (valid: forwarded as is); then a last control
            publish_events(queues.settings.queue, [[event("neighbour"), 5], ev("unknown-fields", shop="x"),
                                                   ev("timestamp-naive", timestamp="2020-04-28T16:47:37")])
            publish_events(queues.settings.queue, [event("last")])
            env = {**queues.env, "NETCORE_API_KEY": API_KEY, "NETCORE_API_URL": sandbox.url, "ACTIVITY_BATCH_WAIT": "0.3"}
            worker = WorkerProcess(env, tmp_path_factory.mktemp("hostile") / "worker.log").start()
            try:
                big = len(BODIES['20-MB-message'].body)
                expected_dead = len(BODIES) + len(EVENTS) + 1 + (-(-big // deadletter.PART_BYTES) - 1)  # + the
                # non-object item, + the 20 MB body's extra parts
                assert sandbox.wait_until(lambda s: s.accepted_count() >= 4, timeout=120), worker.log()[-3000:]
                assert dead.wait_for(expected_dead, timeout=120), f"{len(dead.envelopes)} dead letters"
                dead.settle(quiet=1.0)
                yield Run(dead.envelopes, sandbox.accepted(), worker.process.poll() is None,
                          _peak_rss_mb(worker.process.pid))
            finally:
                worker.kill()
    finally:
        dead.close()
        queues.delete()


@pytest.mark.parametrize("case", list(BODIES))
def test_unreadable_body_is_dead_lettered_whole(run: Run, case: str) -> None:
    body = BODIES[case]
    matches = [letter.envelope for letter in Letters(enumerate(run.dead)) if letter.body() == body.body]
    assert len(matches) == 1, f"{case}: {len(matches)} dead letters"
    (envelope,) = matches
    assert envelope["reason"] == "malformed" and envelope["event"] is None
    if body.problem:
        assert envelope["details"]["problem"] == body.problem
    assert len(envelope["error"]) > 20  # a sentence, not a code


@pytest.mark.parametrize("case", list(EVENTS))
def test_bad_event_is_dead_lettered_with_its_field(run: Run, case: str) -> None:
    sent, field = EVENTS[case]
    matches = [e for e in run.dead if e["event"] is not None and event_id_of(e["event"]) == case]
    if not matches:  # events without their params carry no id: match them whole
        matches = [e for e in run.dead if e["event"] == sent]
    assert len(matches) == 1, f"{case}: {len(matches)} dead letters"
    (envelope,) = matches
    assert envelope["reason"] == "invalid"
    assert envelope["event"] == sent  # kept whole, to be replayed once fixed
    assert field in envelope["details"], envelope["details"]
    assert "customer-42@example.com" not in envelope["error"]  # no personal data in the reason


def test_valid_neighbours_and_unknown_fields_are_delivered(run: Run) -> None:
    assert sorted(event_id_of(e) for e in run.delivered) == ["last", "neighbour", "timestamp-naive", "unknown-fields"]
    [naive] = [e for e in run.delivered if event_id_of(e) == "timestamp-naive"]
    assert naive["timestamp"] == "2020-04-28T16:47:37"  # forwarded as it is
    assert any(e["event"] == 5 and e["reason"] == "invalid" for e in run.dead)


def test_the_worker_stays_up_with_bounded_memory(run: Run) -> None:
    assert run.worker_alive
    assert run.peak_rss_mb < 300, f"peak RSS {run.peak_rss_mb:.0f} MB"

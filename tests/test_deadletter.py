"""Dead letters keep what failed whole: a body's exact bytes, in one envelope or in parts.

No broker: the envelopes as built, and as the ingest step hands them to its (recording)
publisher. Reading them back from RabbitMQ with the dead-letter command is in test_dlq.py.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest

from tests.test_ingest import FakeMessage, Rig
from tests.test_ingest import event as ingest_event
from worker.broker.headers import REASON_HEADER
from worker.deadletter import envelopes as deadletter
from worker.events import jsonutil
from worker.events.parsing import MAX_EVENTS_PER_MESSAGE, raw_text

pytestmark = pytest.mark.timeout(60)

FAILED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)

#: RabbitMQ's default max_message_size: a dead letter must stay well under it.
BROKER_MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # RabbitMQ 4's default (3.x: 128 MiB)


def kept(raw: bytes | str, **kwargs: Any) -> list[dict[str, Any]]:
    """The envelopes of a malformed body, as they come back out of the queue (JSON)."""
    made = deadletter.body_envelopes(reason=deadletter.MALFORMED, error="not events", failed_at=FAILED_AT,
                                    raw=raw, details={"problem": "not_json"}, replays=2, **kwargs)
    return [jsonutil.loads(message.body) for message in deadletter.messages("dead", made)]


def array_of(count: int) -> bytes:
    """A JSON array of ``count`` events, each with a unique id."""
    return jsonutil.dumps([ingest_event("asset-1", uuid.uuid4().hex) for _ in range(count)])


# --- one body, one envelope -------------------------------------------------------------------


def test_a_utf8_body_of_12000_events_is_kept_whole_as_raw() -> None:
    body = array_of(12_000)
    assert len(body) > 2_000_000  # the old dead letters kept 1,000,000 bytes of it

    envelopes = kept(body)

    assert "".join(e["raw"] for e in envelopes) == body.decode("utf-8")  # in parts past PART_BYTES
    assert all("raw_base64" not in e for e in envelopes)
    assert deadletter.join(envelopes) == body
    assert len(json.loads(deadletter.join(envelopes))) == 12_000


@pytest.mark.parametrize(
    "body",
    [b'{"note": "caf\xe9"}', b'{"note": "caf\\xe9"}', b"\xff\xfe{\x00}", "lone \ud800 surrogate"],
    ids=["latin-1", "a-real-backslash", "utf-16", "str-lone-surrogate"],
)
def test_every_body_comes_back_byte_for_byte(body: bytes | str) -> None:
    (envelope,) = kept(body)
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body

    assert deadletter.raw_body(envelope) == data
    assert envelope["raw"] == raw_text(data)  # readable either way
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:  # not UTF-8: the exact bytes beside the rendering
        assert base64.b64decode(envelope["raw_base64"]) == data
    else:  # UTF-8: raw is the body itself
        assert "raw_base64" not in envelope and envelope["raw"] == data.decode("utf-8")


def test_a_latin1_byte_and_a_real_backslash_are_told_apart() -> None:
    """Both read ``caf\\xe9``; only the envelope of the Latin-1 one says its bytes differ."""
    latin1, backslash = kept(b'"caf\xe9"')[0], kept(b'"caf\\xe9"')[0]
    assert latin1["raw"] == backslash["raw"] == '"caf\\xe9"'
    assert deadletter.raw_body(latin1) == b'"caf\xe9"' and deadletter.raw_body(backslash) == b'"caf\\xe9"'


def test_an_event_envelope_keeps_the_small_text_it_is_given() -> None:
    envelope = deadletter.envelope(reason=deadletter.MALFORMED, error="e", failed_at=FAILED_AT, raw='{"n": 1')
    assert envelope["raw"] == '{"n": 1' and "raw_base64" not in envelope and "part" not in envelope


# --- a body over the part size ----------------------------------------------------------------


def test_a_body_over_the_part_size_is_split_into_whole_envelopes_that_join_exactly() -> None:
    # 2- and 3-byte characters across every boundary, and one byte that is not UTF-8
    body = ("é€" * 20).encode() + b"\xff" + ("x€" * 20).encode()

    parts = kept(body, part_bytes=10)

    assert len(parts) > 10
    markers = [part["part"] for part in parts]
    assert {m["id"] for m in markers} == {markers[0]["id"]} and len(markers[0]["id"]) == 32
    assert [m["number"] for m in markers] == list(range(1, len(parts) + 1))
    assert {(m["count"], m["size"]) for m in markers} == {(len(parts), len(body))}
    for part in parts:  # each a whole envelope of the same failure
        assert {k: v for k, v in part.items() if k not in ("raw", "raw_base64", "part")} == {
            "reason": "malformed", "error": "not events", "event": None, "details": {"problem": "not_json"},
            "asset_id": None, "attempts": 0, "failed_at": "2024-05-01T12:00:00Z", "replays": 2}
        piece = deadletter.raw_body(part)
        assert piece is not None and 0 < len(piece) <= 10
    with_bad_byte = [part for part in parts if "raw_base64" in part]
    assert len(with_bad_byte) == 1  # every other slice is readable text, no character cut in two
    shuffled = parts + [parts[3]]  # in any order, a part read twice counts once
    random.Random(7).shuffle(shuffled)
    assert deadletter.join(shuffled) == body


def test_join_refuses_a_missing_part_and_parts_of_two_bodies() -> None:
    body = b"0123456789" * 5
    parts, others = kept(body, part_bytes=10), kept(body, part_bytes=10)

    with pytest.raises(ValueError, match=r"parts \[3\] of 5 are missing"):
        deadletter.join(parts[:2] + parts[3:])
    with pytest.raises(ValueError, match="parts of 2 bodies"):
        deadletter.join(parts[:3] + others[3:])
    assert deadletter.join(others) == body


@pytest.mark.parametrize("marker", [None, "x", {"id": "a", "number": 0, "count": 2, "size": 3},
                                    {"id": "a", "number": 3, "count": 2, "size": 3},
                                    {"id": "", "number": 1, "count": 1, "size": 3},
                                    {"id": "a", "number": True, "count": 1, "size": 3}])
def test_a_part_marker_that_makes_no_sense_is_not_a_part(marker: Any) -> None:
    assert deadletter.part_of({"reason": "malformed", "part": marker}) is None


def test_the_largest_possible_part_stays_far_under_the_broker_limit() -> None:
    """The worst slices for their size: control characters (6 bytes of JSON each), and bytes
    that are not UTF-8 (base64, plus a readable ``\\xff`` rendering)."""
    for filler in (b"\x01", b"\xff"):
        (message,) = deadletter.messages("dead", deadletter.body_envelopes(
            reason=deadletter.POISON, error="e", failed_at=FAILED_AT, raw=filler * deadletter.PART_BYTES))
        assert len(message.body) < BROKER_MAX_MESSAGE_BYTES


# --- the ingest step writes them --------------------------------------------------------------


def test_ingest_dead_letters_an_array_over_the_event_limit_whole() -> None:
    rig = Rig()
    body = array_of(MAX_EVENTS_PER_MESSAGE + 2_000)

    tag = rig.send(body)

    letters = rig.dead_letters()
    assert {(d["reason"], d["details"]["problem"]) for d in letters} == {("malformed", "too_many_events")}
    assert deadletter.join(letters) == body
    assert rig.acks == [(tag, True)]


def test_ingest_writes_a_body_over_the_part_size_in_parts_confirmed_together_before_the_ack() -> None:
    rig = Rig()
    body = b'{"asset_id": "a", "blob": "' + "é".encode() * (deadletter.PART_BYTES // 2 + 10)  # cut short: not JSON

    tag = rig.send(body)

    assert len(rig.published) == 1  # one group: the broker confirms every part, then the ack
    parts = rig.dead_letters()
    assert [p["part"]["number"] for p in parts] == [1, 2] and {p["reason"] for p in parts} == {"malformed"}
    assert all(m.headers[REASON_HEADER] == "malformed" for m in rig.published[0])
    assert deadletter.join(parts) == body
    assert rig.acks == [(tag, True)] and rig.position(("publish", 0)) < rig.position(("ack", tag))


def test_ingest_keeps_a_poison_body_exactly() -> None:
    rig = Rig()
    body = b'{"asset_id": "a", "note": "caf\xe9 \\xe9"}'  # a Latin-1 byte and a real backslash

    acked: list[bool] = []  # the worker died holding it twice, alone in the quarantine queue
    rig.ingest.handle_alone(FakeMessage(body, 1, headers={"x-delivery-count": 2, "x-replays": 1}),
                            lambda: acked.append(True))

    [dead] = rig.dead_letters()
    assert acked == [True]
    assert (dead["reason"], dead["event"], dead["replays"]) == ("poison", None, 1)
    assert deadletter.raw_body(dead) == body

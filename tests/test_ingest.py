"""The ingest step: message -> events -> batches -> hand-off -> acknowledgement.

No broker and no clock: :class:`Ingest` is built from its parts, with a fake publish that
records each group of :class:`Outgoing` (and refuses on demand, like a broker that does not
confirm), an :class:`Acker` that records ``(delivery_tag, multiple)`` and applies them as
RabbitMQ does (an ack naming a tag that is not outstanding closes the channel; an ack must
not come before every event of the message is published), and a :class:`ManualClock` that
only moves when a test says so.
"""

from __future__ import annotations

import base64
import bisect
import gzip
import json
import random
import re
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Queue
from kombu import Consumer as KombuConsumer
from kombu.serialization import dumps as kombu_dumps

from config.settings import Settings
from tests.fakes import Deferred, Immediate
from worker.broker.compression import install as install_bounded_decompression
from worker.broker.headers import REASON_HEADER
from worker.broker.messages import INGEST_TASK, MAX_BATCHES_PER_BUNDLE, Bundle
from worker.broker.publisher import Outgoing
from worker.clock import ManualClock
from worker.errors import PublishError
from worker.ingest.acks import MAX_ACK_ALONE_DEPTH, Acker
from worker.ingest.batching import Batch, Batcher
from worker.ingest.handoff import RETRY_BASE
from worker.ingest.pipeline import Ingest

pytestmark = pytest.mark.timeout(60)

BIG = 1 << 40  # a limit that never triggers
UPLOAD_QUEUE = "upload"
QUARANTINE = "quarantine"
WAIT = 2.0
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def event(asset_id: Any = "asset-1", event_id: str = "e-1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "activity_name": "Purchase",
        "asset_id": asset_id,
        "timestamp": "2026-01-01T00:00:00Z",
        "identity": "customer-42@example.com",
        "activity_source": "web",
        "activity_params": {"event_id": event_id, "total": 2},
    }
    body.update(overrides)
    return body


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


def ids_in(value: Any) -> set[str]:
    """The event ids an event, or a list of events, carries."""
    items = value if isinstance(value, list) else [value]
    return {
        item["activity_params"]["event_id"]
        for item in items
        if isinstance(item, dict)
        and isinstance(item.get("activity_params"), dict)
        and "event_id" in item["activity_params"]
    }


class FakeMessage:
    """What the ingest step needs of a kombu message."""

    def __init__(
        self,
        body: bytes | str,
        delivery_tag: int,
        *,
        content_type: str | None = "application/json",
        content_encoding: str | None = "utf-8",
        headers: dict[str, Any] | None = None,
    ) -> None:
        self.body = body
        self.delivery_tag = delivery_tag
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers if headers is not None else {}


class Rig:
    """An :class:`Ingest` with recording fakes around it, and a timeline of what happened."""

    def __init__(
        self,
        *,
        batch_size: int = 1000,
        batch_wait: float = WAIT,
        max_outstanding: int = 10_000,
        max_buffered: int = BIG,
        batch_max_bytes: int = 4 * 1024 * 1024,
        delivery_limit: int = 10,
        max_message_size: int | None = None,
        bundle_batches: Callable[[str], int] = lambda account: MAX_BATCHES_PER_BUNDLE,
    ) -> None:
        self.settings = Settings.from_env(
            {
                "ACTIVITY_BATCH_SIZE": str(batch_size),
                "ACTIVITY_BATCH_WAIT": str(batch_wait),
                "ACTIVITY_BATCH_MAX_BYTES": str(batch_max_bytes),
                "ACTIVITY_PREFETCH": "10000",
                "ACTIVITY_DELIVERY_LIMIT": str(delivery_limit),
                "NETCORE_API_KEY": "test-key",
            },
            require_api=False,
        )
        #: The broker's max_message_size: a bigger message is refused, as RabbitMQ does.
        self.max_message_size = max_message_size
        self.clock = ManualClock()
        self.batcher = Batcher(
            max_events=self.settings.batch_size,
            max_wait=self.settings.batch_wait,
            max_bytes=self.settings.batch_max_bytes,
            max_buffered=max_buffered,
            clock=self.clock,
        )
        #: ``(delivery_tag, multiple)`` per ack frame.
        self.acks: list[tuple[int, bool]] = []
        self.acker = Acker(self._ack)
        #: Groups the broker confirmed, in order.
        self.published: list[list[Outgoing]] = []
        #: ("publish", group index) and ("ack", tag) in the order they happened.
        self.timeline: list[tuple[str, int]] = []
        #: The broker's view: tags delivered and not acknowledged yet.
        self.unacked: set[int] = set()
        #: The event ids each message carries, and the ids published so far.
        self.contents: dict[int, set[str]] = {}
        self.seen: set[str] = set()
        self.failing = False
        self.refused = 0
        self.ingest = Ingest(
            settings=self.settings,
            batcher=self.batcher,
            acker=self.acker,
            publisher=Immediate(self._publish),
            upload_message=self._upload_message,
            clock=self.clock,
            max_outstanding=max_outstanding,
            quarantine_queue=QUARANTINE,
            bundle_batches=bundle_batches,
        )
        self.next_tag = 1

    # --- the fakes --------------------------------------------------------------------------

    def _ack(self, delivery_tag: int, multiple: bool) -> None:
        self.acks.append((delivery_tag, multiple))
        self.timeline.append(("ack", delivery_tag))
        assert delivery_tag in self.unacked, f"PRECONDITION_FAILED: unknown delivery tag {delivery_tag}"
        acked = {t for t in self.unacked if t <= delivery_tag} if multiple else {delivery_tag}
        for tag in acked:
            missing = self.contents.get(tag, set()) - self.seen
            assert not missing, f"message {tag} acknowledged before {sorted(missing)} were published"
        self.unacked -= acked

    def _publish(self, messages: Sequence[Outgoing]) -> None:
        if self.failing:
            self.refused += 1
            raise PublishError("the broker did not confirm")
        limit = self.max_message_size
        if limit is not None and any(len(m.body) > limit for m in messages):
            self.refused += 1
            raise PublishError("message size is larger than configured max size", too_large=limit)
        if not messages:  # the real publisher returns at once, without a round trip
            return
        self.published.append(list(messages))
        self.timeline.append(("publish", len(self.published) - 1))
        for message in messages:
            body = json.loads(message.body)
            if message.queue == UPLOAD_QUEUE:
                self.seen |= ids_in([json.loads(text) for batch in body["batches"] for text in batch["events"]])
            elif message.queue == QUARANTINE:
                self.seen |= ids_in(body)
            elif body.get("event") is not None:
                self.seen |= ids_in(body["event"])
            else:  # a body kept whole (or a part of one): the ids it holds
                self.seen |= set(re.findall(r'"event_id":\s*"([^"]+)"', body.get("raw") or ""))

    @staticmethod
    def _upload_message(bundle: Bundle) -> Outgoing:
        """One message per bundle; its body lists the bundle's batches."""
        return Outgoing(UPLOAD_QUEUE, dumps({"batches": [
            {"asset_id": b.asset_id, "events": b.events, **({"replays": b.replays} if b.replays else {})}
            for b in bundle.batches]}))

    # --- driving ----------------------------------------------------------------------------

    def send(self, body: bytes | str, *, ids: set[str] | None = None, **kwargs: Any) -> int:
        tag = self.next_tag
        self.next_tag += 1
        self.unacked.add(tag)
        self.contents[tag] = set(ids or ())
        self.ingest.on_message(FakeMessage(body, tag, **kwargs))
        return tag

    def send_event(self, value: Any, **kwargs: Any) -> int:
        return self.send(dumps(value), ids=ids_in(value), **kwargs)

    def send_task(self, args: list[Any], name: str = INGEST_TASK) -> int:
        headers = {"lang": "py", "task": name, "id": str(uuid.uuid4()), "argsrepr": "...",
                   "kwargsrepr": "{}", "retries": 0, "root_id": None, "parent_id": None}
        ids = ids_in(args[0]) if name == INGEST_TASK and len(args) == 1 else set()
        return self.send(dumps([args, {}, EMBED]), headers=headers, ids=ids)

    def wait_and_tick(self, seconds: float = WAIT + 0.01) -> None:
        self.clock.advance(seconds)
        self.ingest.tick()

    # --- what came out ----------------------------------------------------------------------

    def outgoing(self) -> list[Outgoing]:
        return [message for group in self.published for message in group]

    def uploads(self) -> list[dict[str, Any]]:
        """Uploaded batches, bundles flattened: {"asset_id": ..., "events": [event text, ...]}."""
        return [batch for m in self.outgoing() if m.queue == UPLOAD_QUEUE for batch in json.loads(m.body)["batches"]]

    def upload_messages(self) -> list[dict[str, Any]]:
        """Upload message bodies, one per bundle."""
        return [json.loads(m.body) for m in self.outgoing() if m.queue == UPLOAD_QUEUE]

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(m.body) for m in self.outgoing() if m.queue == self.settings.dead_letter_queue]

    def acked_up_to(self) -> int:
        """The highest tag acknowledged (every ack here is multiple=True)."""
        assert all(multiple for _, multiple in self.acks)
        return max((tag for tag, _ in self.acks), default=0)

    def position(self, entry: tuple[str, int]) -> int:
        return self.timeline.index(entry)


def uploaded_events(rig: Rig) -> list[dict[str, Any]]:
    return [json.loads(text) for upload in rig.uploads() for text in upload["events"]]


# --- one event --------------------------------------------------------------------------------

ODD = (
    '{ "activity_name" :"Purchase",   "asset_id":"asset-odd" ,"timestamp":"2026-01-01T00:00:00Z",'
    '\n  "identity": "c-1", "activity_source":"web", "activity_params": {"amount": 250.10, "n": 1e2} }'
)


@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "str"])
def test_a_single_event_waits_for_its_batch_then_goes_as_its_original_text(as_text: bool) -> None:
    rig = Rig()
    tag = rig.send(ODD if as_text else ODD.encode("utf-8"))
    assert rig.published == [] and rig.acks == []

    rig.clock.advance(WAIT - 0.5)
    rig.ingest.tick()
    assert rig.published == [] and rig.acks == []  # not due yet

    rig.wait_and_tick(0.6)
    assert len(rig.published) == 1
    [upload] = rig.published[0]
    assert upload.queue == UPLOAD_QUEUE
    body = json.loads(upload.body)
    assert body == {"batches": [{"asset_id": "asset-odd", "events": [ODD]}]}  # spacing, 250.10 and 1e2 kept
    assert rig.acks == [(tag, True)]
    assert rig.position(("publish", 0)) < rig.position(("ack", tag))
    assert rig.acker.outstanding == 0
    assert rig.ingest.counts["messages"] == 1 and rig.ingest.counts["events"] == 1


def test_content_type_with_parameters_and_no_headers_are_plain_json() -> None:
    rig = Rig()
    rig.send(dumps(event("a", "1")), content_type="application/json; charset=utf-8")
    rig.send(dumps(event("a", "2")), content_type=None, content_encoding=None)
    rig.send(dumps(event("a", "3")), content_type="", content_encoding="binary")
    rig.wait_and_tick()
    assert [e["activity_params"]["event_id"] for e in uploaded_events(rig)] == ["1", "2", "3"]
    assert rig.acked_up_to() == 3
    assert rig.dead_letters() == []


def test_nothing_is_published_before_the_batch_is_due() -> None:
    rig = Rig()
    for i in range(5):
        rig.send_event(event("a", str(i)))
        rig.clock.advance(0.3)
        rig.ingest.tick()
    assert rig.published == [] and rig.acks == []
    rig.wait_and_tick(WAIT)  # the first event has waited long enough: the whole batch goes
    assert len(rig.uploads()) == 1 and len(rig.uploads()[0]["events"]) == 5
    assert rig.acked_up_to() == 5


# --- arrays -----------------------------------------------------------------------------------


def test_an_array_is_split_per_asset_id_and_acked_when_all_its_batches_are_handed_on() -> None:
    rig = Rig(batch_size=2)
    items = [event("a", "a1"), event("b", "b1"), event("a", "a2")]
    tag = rig.send_event(items)

    # a's batch is full and goes at once; b1 still waits, so the message is not acked.
    assert [u["asset_id"] for u in rig.uploads()] == ["a"]
    assert rig.acks == []
    assert rig.acker.outstanding == 1

    rig.wait_and_tick()
    uploads = rig.uploads()
    assert [u["asset_id"] for u in uploads] == ["a", "b"]
    for upload in uploads:
        assert {json.loads(t)["asset_id"] for t in upload["events"]} == {upload["asset_id"]}
    assert [json.loads(t) for t in uploads[0]["events"]] == [items[0], items[2]]
    assert [json.loads(t) for t in uploads[1]["events"]] == [items[1]]
    assert rig.acks == [(tag, True)]
    assert rig.position(("publish", 1)) < rig.position(("ack", tag))


def test_arrays_share_batches_with_other_messages() -> None:
    rig = Rig()
    t1 = rig.send_event([event("a", "1"), event("b", "2")])
    t2 = rig.send_event(event("b", "3"))
    t3 = rig.send_event([event("c", "4"), event("a", "5"), event("c", "6")])
    rig.wait_and_tick()
    by_asset = {u["asset_id"]: [json.loads(t)["activity_params"]["event_id"] for t in u["events"]]
                for u in rig.uploads()}
    assert by_asset == {"a": ["1", "5"], "b": ["2", "3"], "c": ["4", "6"]}
    assert len(rig.uploads()) == 3
    assert rig.acked_up_to() == t3 and t1 < t2 < t3
    assert rig.acker.outstanding == 0


def test_a_message_with_events_in_two_batches_is_acked_only_after_the_second() -> None:
    rig = Rig(batch_size=3)
    t1 = rig.send_event([event("a", "1"), event("b", "2")])
    t2 = rig.send_event([event("a", "3"), event("a", "4")])  # fills a: 1, 3, 4
    assert [u["asset_id"] for u in rig.uploads()] == ["a"]
    # t2 is complete but t1 waits for b: nothing can be acknowledged yet.
    assert rig.acks == []
    assert rig.acker.outstanding == 2
    rig.wait_and_tick()
    assert rig.acks == [(t2, True)]  # one frame for both
    assert t1 < t2


# --- full batches -----------------------------------------------------------------------------


def test_batches_per_bundle_are_asked_at_each_hand_off() -> None:
    per_bundle = [2]
    rig = Rig(bundle_batches=lambda account: per_bundle[0])  # what the API's round trip allows, as it changes
    for n in range(7):
        rig.send_event(event(f"asset-{n}", f"a{n}"))
    rig.wait_and_tick()
    assert [len(m["batches"]) for m in rig.upload_messages()] == [2, 2, 2, 1]
    per_bundle[0] = 20
    for n in range(7):
        rig.send_event(event(f"asset-{n}", f"b{n}"))
    rig.wait_and_tick()
    assert [len(m["batches"]) for m in rig.upload_messages()] == [2, 2, 2, 1, 7]
    assert len(rig.uploads()) == 14 and rig.acked_up_to() == 14


def test_a_full_batch_is_published_at_once() -> None:
    rig = Rig(batch_size=3)
    rig.send_event(event("a", "1"))
    rig.send_event(event("a", "2"))
    assert rig.published == []
    t3 = rig.send_event(event("a", "3"))
    assert len(rig.uploads()) == 1
    assert [json.loads(t)["activity_params"]["event_id"] for t in rig.uploads()[0]["events"]] == ["1", "2", "3"]
    assert rig.acked_up_to() == t3
    assert rig.acker.outstanding == 0
    assert rig.position(("publish", 0)) < rig.position(("ack", 1))


def test_an_array_larger_than_a_batch_makes_several_full_batches() -> None:
    rig = Rig(batch_size=4)
    tag = rig.send_event([event("a", str(i)) for i in range(10)])
    assert [len(u["events"]) for u in rig.uploads()] == [4, 4]
    assert rig.acks == []  # two events still wait
    rig.wait_and_tick()
    assert [len(u["events"]) for u in rig.uploads()] == [4, 4, 2]
    assert rig.acks == [(tag, True)]


def test_a_batch_too_big_in_bytes_is_released_before_the_next_event() -> None:
    rig = Rig(batch_max_bytes=1024)
    for i in range(3):
        rig.send_event(event("a", str(i), note="x" * 400))
    sizes = [len(u["events"]) for u in rig.uploads()]
    assert sizes == [1, 1]  # each pair would be over 1024 bytes
    rig.wait_and_tick()
    for upload in rig.uploads():
        assert len(("[" + ",".join(upload["events"]) + "]").encode("utf-8")) <= 1024
    assert rig.unacked == set()


def test_batch_max_bytes_counts_utf8_bytes_not_characters() -> None:
    rig = Rig(batch_max_bytes=1024)
    for i in range(2):
        body = json.dumps(event("a", str(i), note="\u00e9" * 200), ensure_ascii=False)
        assert len(body) < 500 < 600 < len(body.encode("utf-8")) < 1000  # two fit in characters only
        rig.send(body.encode("utf-8"), ids={str(i)})
    rig.ingest.flush_all(1.0)
    assert len(uploaded_events(rig)) == 2
    for upload in rig.uploads():
        assert len(("[" + ",".join(upload["events"]) + "]").encode("utf-8")) <= 1024


# --- malformed bodies -------------------------------------------------------------------------

MALFORMED = {
    "not_json": (b"this is not json", {}),
    "truncated_json": (b'{"asset_id": "a", ', {}),
    "latin1": ('{"asset_id": "caf\xe9"}'.encode("latin-1"), {}),
    "empty_array": (b"[]", {}),
    "null": (b"null", {}),
    "number": (b"42", {}),
    "empty": (b"", {}),
    "python_pickle_type": (dumps(event("a")), {"content_type": "application/x-python-serialize"}),
    "text_plain": (dumps(event("a")), {"content_type": "text/plain"}),
    "gzip_encoding": (dumps(event("a")), {"content_encoding": "gzip"}),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_body_is_one_dead_letter_and_acked(name: str) -> None:
    body, kwargs = MALFORMED[name]
    rig = Rig()
    tag = rig.send(body, **kwargs)
    assert len(rig.published) == 1
    [letter] = rig.published[0]
    assert letter.queue == rig.settings.dead_letter_queue
    assert letter.headers[REASON_HEADER] == "malformed"
    dead = json.loads(letter.body)
    assert dead["reason"] == "malformed"
    assert dead["event"] is None
    assert dead["raw"] == body.decode("utf-8", "backslashreplace")
    assert isinstance(dead["error"], str) and dead["error"]
    assert dead["details"]["problem"]
    assert dead["failed_at"].endswith("Z")
    assert rig.acks == [(tag, True)]
    assert rig.position(("publish", 0)) < rig.position(("ack", tag))
    assert rig.ingest.counts["malformed"] == 1
    rig.wait_and_tick()
    assert rig.uploads() == []


def test_a_malformed_message_does_not_disturb_open_batches() -> None:
    rig = Rig()
    t1 = rig.send_event(event("a", "1"))
    t2 = rig.send(b"{oops")
    # the dead letter is out at once, but tag 2 waits behind tag 1
    assert len(rig.dead_letters()) == 1
    assert rig.acks == []
    rig.wait_and_tick()
    assert rig.acks == [(t2, True)] and t1 < t2
    assert len(rig.uploads()) == 1


# --- events that cannot be routed -------------------------------------------------------------


def test_an_event_without_a_usable_asset_id_is_dead_lettered_and_its_neighbours_batched() -> None:
    rig = Rig()
    missing = event("x", "bad-1")
    del missing["asset_id"]
    items = [
        event("a", "ok-1"),
        missing,
        event("", "bad-2"),
        event("   ", "bad-3"),
        event(7, "bad-4"),
        event(None, "bad-5"),
        "not an object",
        event("b", "ok-2"),
    ]
    tag = rig.send_event(items)
    dead = rig.dead_letters()
    assert [d["event"] for d in dead] == items[1:7]
    for d in dead:
        assert d["reason"] == "invalid"
        assert d["details"]  # field errors
        assert "raw" not in d
        assert d["error"].startswith("The event cannot be routed")
    assert "asset_id" in dead[0]["details"]
    assert "_schema" in dead[-1]["details"]
    assert rig.acks == []  # the neighbours are still in their batches
    assert rig.ingest.counts["invalid"] == 6

    rig.wait_and_tick()
    assert sorted(e["activity_params"]["event_id"] for e in uploaded_events(rig)) == ["ok-1", "ok-2"]
    assert rig.acks == [(tag, True)]


def test_a_single_unroutable_event_is_dead_lettered_and_acked_at_once() -> None:
    rig = Rig()
    bad = event({"nested": "object"}, "bad")
    tag = rig.send_event(bad)
    [dead] = rig.dead_letters()
    assert dead["reason"] == "invalid" and dead["event"] == bad and "asset_id" in dead["details"]
    assert rig.acks == [(tag, True)]


# --- Celery task messages ---------------------------------------------------------------------


@pytest.mark.parametrize("as_list", [False, True], ids=["one_event", "list_of_events"])
def test_an_ingest_task_message_is_batched_like_a_plain_one(as_list: bool) -> None:
    rig = Rig()
    items = [event("a", "1"), event("b", "2"), event("a", "3")]
    tag = rig.send_task([items] if as_list else [items[0]])
    assert rig.published == [] and rig.acks == []
    rig.wait_and_tick()
    got = uploaded_events(rig)
    assert sorted(got, key=lambda e: e["activity_params"]["event_id"]) == (items if as_list else items[:1])
    for upload in rig.uploads():
        assert {json.loads(t)["asset_id"] for t in upload["events"]} == {upload["asset_id"]}
    assert rig.dead_letters() == []
    assert rig.acks == [(tag, True)]


def test_a_task_message_made_by_celery_itself_is_batched() -> None:
    app = Celery("producer", broker="memory://", set_as_current=False)
    item = event("a", "celery-1")
    task = app.amqp.as_task_v2(str(uuid.uuid4()), INGEST_TASK, args=[item], kwargs={})
    content_type, content_encoding, body = kombu_dumps(task.body, serializer="json")
    rig = Rig()
    tag = rig.send(body, content_type=content_type, content_encoding=content_encoding,
                   headers=dict(task.headers))
    rig.wait_and_tick()
    assert uploaded_events(rig) == [item]
    assert rig.acks == [(tag, True)]


def test_a_task_message_shares_batches_with_plain_messages() -> None:
    rig = Rig(batch_size=3)
    rig.send_event(event("a", "1"))
    rig.send_task([[event("a", "2")]])
    t3 = rig.send_event([event("a", "3")])
    assert [[json.loads(t)["activity_params"]["event_id"] for t in u["events"]] for u in rig.uploads()] == [
        ["1", "2", "3"]
    ]
    assert rig.acked_up_to() == t3


def test_another_applications_task_is_set_aside_whole_as_unhandled_naming_the_task() -> None:
    rig = Rig()
    tag = rig.send_task([event("a")], name="billing.charge")
    [dead] = rig.dead_letters()
    assert dead["reason"] == "unhandled"
    assert "'billing.charge'" in dead["error"]
    details = dead["details"]
    assert details["problem"] == "foreign_task" and details["task"] == "billing.charge"
    assert details["replay_body"] is False  # not a producer's body: never replayed to activities
    assert details["message"]["headers"]["task"] == "billing.charge"
    assert details["message"]["properties"]["content_type"] == "application/json"
    assert dead["event"] is None and dead["raw"] == json.dumps([[event("a")], {}, EMBED])
    assert rig.acks == [(tag, True)]
    assert rig.uploads() == []


@pytest.mark.parametrize("content_type", ["application/x-python-serialize", "application/x-yaml"])
def test_another_applications_task_is_never_decoded_whatever_its_content_type(content_type: str) -> None:
    rig = Rig()
    body = b"\x80\x04\x95 not even a pickle a loader would take"
    tag = rig.send(body, content_type=content_type, headers={"task": "shop.send_email", "id": "1"})
    [dead] = rig.dead_letters()
    assert dead["reason"] == "unhandled" and dead["details"]["task"] == "shop.send_email"
    assert base64.b64decode(dead["raw_base64"]) == body
    assert rig.acks == [(tag, True)]


@pytest.mark.parametrize("content_type", ["application/x-python-serialize", "application/x-yaml"])
def test_our_task_in_a_serialisation_the_worker_never_reads_is_malformed(content_type: str) -> None:
    rig = Rig()
    tag = rig.send(b"- not read", content_type=content_type, headers={"task": INGEST_TASK, "id": "1"})
    [dead] = rig.dead_letters()
    assert dead["reason"] == "malformed" and dead["details"]["problem"] == "content_type"
    assert rig.acks == [(tag, True)]


@pytest.mark.parametrize(
    "args",
    [[], [[]], [event("a"), event("b")], ["a string"], [None]],
    ids=["no_args", "empty_list", "two_args", "string_arg", "null_arg"],
)
def test_a_task_message_with_bad_arguments_is_malformed(args: list[Any]) -> None:
    rig = Rig()
    tag = rig.send_task(args)
    [dead] = rig.dead_letters()
    assert dead["reason"] == "malformed"
    assert dead["details"]["problem"] == "bad_task_arguments"
    assert "args=[event_or_list]" in dead["error"]
    assert dead["raw"] == json.dumps([args, {}, EMBED])
    assert rig.acks == [(tag, True)]


def test_a_task_message_whose_body_is_not_the_protocol_2_triple_is_malformed() -> None:
    rig = Rig()
    tag = rig.send(dumps(event("a")), headers={"task": INGEST_TASK, "id": "x"})
    [dead] = rig.dead_letters()
    assert dead["reason"] == "malformed"
    assert rig.acks == [(tag, True)]


# --- stragglers -------------------------------------------------------------------------------


def test_a_complete_message_behind_a_waiting_one_is_acked_alone_after_a_whole_tick() -> None:
    rig = Rig(batch_size=2)
    t1 = rig.send_event(event("a", "1"))  # waits for a's batch
    t2 = rig.send_event([event("b", "2"), event("b", "3")])  # full: published, complete
    assert [u["asset_id"] for u in rig.uploads()] == ["b"]
    assert rig.acks == []
    rig.clock.advance(0.1)
    rig.ingest.tick()
    assert rig.acks == []  # it has not waited a whole tick yet
    rig.clock.advance(0.1)
    rig.ingest.tick()
    assert rig.acks == [(t2, False)]
    assert rig.acker.outstanding == 1
    rig.wait_and_tick()
    assert rig.acks == [(t2, False), (t1, True)]
    assert rig.unacked == set()


def test_stragglers_and_prefix_acks_never_name_an_acknowledged_tag() -> None:
    rig = Rig(batch_size=2)
    t1 = rig.send_event(event("a", "1"))
    rig.send_event([event("b", "2"), event("b", "3")])
    rig.ingest.tick()
    rig.ingest.tick()  # 2 is acked alone
    t3 = rig.send_event(event("a", "4"))  # fills a: 1, then 3, complete
    assert rig.acks == [(2, False), (t1, True), (t3, True)]  # never (2, ...) again
    assert rig.unacked == set()


# --- backpressure -----------------------------------------------------------------------------


def test_too_many_unacknowledged_messages_release_the_oldest_batch_early() -> None:
    rig = Rig(max_outstanding=3)
    for asset in "abc":
        rig.send_event(event(asset, asset))
    assert rig.published == [] and rig.acks == []
    assert rig.acker.outstanding == 3

    rig.send_event(event("d", "d"))  # over the limit, long before batch_wait
    uploads = rig.uploads()
    assert uploads and uploads[0]["asset_id"] == "a"  # the oldest one goes first
    assert rig.acks and rig.acks[0] == (1, True)
    assert rig.acker.outstanding <= 3


def test_backpressure_releases_only_the_oldest_batch() -> None:
    rig = Rig(max_outstanding=3)
    for asset in "abcd":
        rig.send_event(event(asset, asset))
    assert [u["asset_id"] for u in rig.uploads()] == ["a"]
    assert rig.acks == [(1, True)]
    assert rig.acker.outstanding == 3
    assert rig.batcher.buffered == 3  # b, c and d keep filling


def test_backpressure_never_loses_or_duplicates_events() -> None:
    rig = Rig(max_outstanding=5)
    sent = []
    for i in range(200):
        sent.append(f"e{i}")
        rig.send_event(event(f"asset-{i % 17}", f"e{i}"))
        assert rig.acker.outstanding <= 5
    rig.ingest.flush_all(1.0)
    assert sorted(e["activity_params"]["event_id"] for e in uploaded_events(rig)) == sorted(sent)
    assert rig.acked_up_to() == 200 and rig.acker.outstanding == 0


class AckCostingChannel:
    """RabbitMQ's side of ``basic.ack``, and what it costs. To find the tag of an ack without
    ``multiple``, the channel process and then the queue process walk the channel's
    unacknowledged deliveries from the oldest one, and rebuild what they walked past; an
    ack with ``multiple`` walks only the deliveries it acknowledges. Counts the entries walked."""

    def __init__(self) -> None:
        #: Delivered and not acknowledged, oldest first.
        self.unacked: list[int] = []
        self.walked = 0
        #: The most older deliveries an ack without ``multiple`` walked past.
        self.deepest = 0

    def deliver(self, tag: int) -> None:
        self.unacked.append(tag)

    def __call__(self, delivery_tag: int, multiple: bool) -> None:
        i = bisect.bisect_left(self.unacked, delivery_tag)
        assert i < len(self.unacked) and self.unacked[i] == delivery_tag, (
            f"PRECONDITION_FAILED: unknown delivery tag {delivery_tag}")
        self.walked += i + 1
        if multiple:
            del self.unacked[: i + 1]
        else:
            self.deepest = max(self.deepest, i)
            del self.unacked[i]


def test_1000_asset_ids_cost_the_broker_a_bounded_walk_per_message() -> None:
    """With 1000 asset_ids, messages complete in random order across the whole prefetch
    window. Acknowledged one by one, each made RabbitMQ walk thousands of older deliveries:
    its queue process took ~270 acks/s, delivering nothing meanwhile, and the worker stalled.
    Wired as the consumer step wires it, with the default settings; 5,000 messages/s."""
    prefetch, messages, tick = 30_000, 40_000, 0.2
    settings = Settings.from_env({"ACTIVITY_PREFETCH": str(prefetch), "NETCORE_API_KEY": "k"}, require_api=False)
    clock = ManualClock()
    batcher = Batcher(max_events=settings.batch_size, max_wait=settings.batch_wait,
                      max_bytes=settings.batch_max_bytes, max_buffered=prefetch - settings.batch_size,
                      clock=clock)
    channel = AckCostingChannel()
    uploaded: Counter[str] = Counter()

    def publish(group: Sequence[Outgoing]) -> None:
        uploaded.update(e for m in group for b in json.loads(m.body)["batches"] for e in b["events"])

    ingest = Ingest(settings=settings, batcher=batcher, acker=Acker(channel), publisher=Immediate(publish),
                    upload_message=Rig._upload_message, clock=clock,
                    max_outstanding=prefetch - settings.batch_size, release_slack=prefetch // 20)
    rng = random.Random(9)
    assets = [f"asset-{i}" for i in range(1000)]
    next_tick = clock.monotonic() + tick
    for tag in range(1, messages + 1):
        while len(channel.unacked) >= prefetch:  # the window is full: the broker waits for acks
            clock.advance(tick)
            ingest.tick()
        channel.deliver(tag)
        ingest.on_message(FakeMessage(dumps(event(rng.choice(assets), str(tag))), tag))
        clock.advance(1 / 5000)
        if clock.monotonic() >= next_tick:
            ingest.tick()
            next_tick = clock.monotonic() + tick
    for _ in range(int(settings.batch_wait / tick) + 2):
        clock.advance(tick)
        ingest.tick()

    assert channel.unacked == []  # every message acknowledged once (the channel refuses twice)
    assert len(uploaded) == messages and set(uploaded.values()) == {1}
    # An ack with multiple walks each message it acknowledges once; one without walks at
    # most MAX_ACK_ALONE_DEPTH older deliveries: bounded work per message, whatever the
    # window. Acked alone at any depth, they were up to 8,800 deep: 47 million entries
    # walked, 1,170 per message, some 20 s of work for the broker's queue process.
    assert channel.deepest <= MAX_ACK_ALONE_DEPTH
    assert channel.walked <= (MAX_ACK_ALONE_DEPTH + 1) * messages


# --- the broker does not confirm --------------------------------------------------------------


def test_an_unconfirmed_hand_off_is_retried_on_ticks_with_a_backoff_and_acked_only_then() -> None:
    rig = Rig(batch_size=1)
    rig.failing = True
    t1 = rig.send_event(event("a", "1"))
    assert rig.published == [] and rig.acks == [] and rig.refused == 1
    assert rig.ingest.blocked  # the consumer stops taking messages (the step cancels it)
    t2 = rig.send_event(event("b", "2"))  # queued behind the first hand-off
    t3 = rig.send(b"not json")  # its dead letter too
    assert rig.published == [] and rig.acks == []
    assert rig.refused == 1  # not tried again on each message: that blocked the event loop

    rig.ingest.tick()  # too early
    assert rig.refused == 1
    rig.clock.advance(RETRY_BASE)
    rig.ingest.tick()  # still failing
    assert rig.refused == 2 and rig.published == [] and rig.acks == []
    assert rig.acker.outstanding == 3
    rig.clock.advance(RETRY_BASE)
    rig.ingest.tick()
    assert rig.refused == 2  # the backoff doubled

    rig.failing = False
    rig.clock.advance(RETRY_BASE)
    rig.ingest.tick()
    assert not rig.ingest.blocked
    groups = [[(m.queue, json.loads(m.body)) for m in group] for group in rig.published]
    assert [q for group in groups for q, _ in group] == [UPLOAD_QUEUE, UPLOAD_QUEUE, rig.settings.dead_letter_queue]
    assert [groups[0][0][1]["batches"][0]["asset_id"], groups[1][0][1]["batches"][0]["asset_id"]] == ["a", "b"]
    assert rig.acks == [(t1, True), (t2, True), (t3, True)]
    assert rig.position(("publish", 2)) < rig.position(("ack", t3))
    assert rig.acker.outstanding == 0

    rig.ingest.tick()  # nothing is published twice
    assert len(rig.published) == 3


def test_a_message_that_only_buffers_waits_behind_an_unconfirmed_hand_off() -> None:
    rig = Rig(batch_size=2)
    rig.failing = True
    rig.send_event([event("a", "1"), event("a", "2")])  # full: hand-off refused
    t2 = rig.send_event(event("b", "3"))  # only buffered
    rig.failing = False
    rig.clock.advance(RETRY_BASE)
    rig.ingest.tick()  # b is not due yet; a goes now
    assert [u["asset_id"] for u in rig.uploads()] == ["a"]
    assert rig.acks == [(1, True)]
    rig.wait_and_tick()
    assert rig.acks == [(1, True), (t2, True)]


def test_an_unconfirmed_due_batch_is_retried_on_the_next_tick() -> None:
    rig = Rig()
    tag = rig.send_event(event("a", "1"))
    rig.failing = True
    rig.wait_and_tick()
    assert rig.published == [] and rig.acks == [] and rig.refused == 1
    rig.send_event(event("a", "2"))  # a new batch for a, behind the refused one
    rig.failing = False
    rig.clock.advance(RETRY_BASE)
    rig.ingest.tick()
    assert [[json.loads(t)["activity_params"]["event_id"] for t in u["events"]] for u in rig.uploads()] == [["1"]]
    assert rig.acks == [(tag, True)]
    rig.wait_and_tick()
    assert [[json.loads(t)["activity_params"]["event_id"] for t in u["events"]] for u in rig.uploads()] == [
        ["1"], ["2"]
    ]
    assert rig.acked_up_to() == 2


def test_invalid_events_dead_letters_are_retried_with_their_message() -> None:
    rig = Rig()
    rig.failing = True
    tag = rig.send_event(event(None, "bad"))
    assert rig.acks == []
    rig.failing = False
    rig.clock.advance(RETRY_BASE)
    rig.ingest.tick()
    assert [d["reason"] for d in rig.dead_letters()] == ["invalid"]
    assert rig.acks == [(tag, True)]


# --- shutdown and lost channels ---------------------------------------------------------------


def test_flush_all_publishes_every_open_batch_and_acks() -> None:
    rig = Rig()
    rig.send_event([event("a", "1"), event("b", "2")])
    rig.send_event(event("c", "3"))
    rig.send_event(event("a", "4"))
    rig.ingest.flush_all(1.0)
    assert sorted(u["asset_id"] for u in rig.uploads()) == ["a", "b", "c"]
    assert rig.acked_up_to() == 3
    assert rig.acker.outstanding == 0 and rig.batcher.buffered == 0
    rig.wait_and_tick()
    assert len(rig.uploads()) == 3


def test_flush_all_raises_when_the_broker_does_not_confirm() -> None:
    rig = Rig()
    rig.send_event(event("a", "1"))
    rig.send_event(event("b", "2"))
    rig.failing = True
    with pytest.raises(PublishError):
        rig.ingest.flush_all(1.0)
    assert rig.published == [] and rig.acks == []
    rig.failing = False
    rig.ingest.flush_all(1.0)  # the refused hand-off is kept and goes now
    assert sorted(u["asset_id"] for u in rig.uploads()) == ["a", "b"]
    assert rig.acked_up_to() == 2


def test_flush_all_with_nothing_open_does_nothing() -> None:
    rig = Rig()
    rig.ingest.flush_all(1.0)
    assert rig.published == [] and rig.acks == []


def test_discard_forgets_batches_and_pending_hand_offs_without_acking() -> None:
    rig = Rig(batch_size=3)
    rig.failing = True
    rig.send_event([event("a", "1"), event("a", "2"), event("a", "6")])  # full, hand-off refused
    rig.send_event([event("b", "3"), event("c", "4")])  # two open batches
    rig.send_event(event("b", "5"))
    assert rig.acker.outstanding == 3

    assert rig.ingest.discard() == 3  # b: 3, 5; c: 4
    assert rig.acker.outstanding == 0 and rig.batcher.buffered == 0
    rig.failing = False
    rig.ingest.tick()
    rig.wait_and_tick()
    rig.ingest.flush_all(1.0)
    assert rig.published == [] and rig.acks == []

    # The next channel starts over; its tags are acknowledged as usual.
    rig.next_tag = 1
    rig.unacked.clear()
    tag = rig.send_event(event("a", "1"))
    rig.wait_and_tick()
    assert rig.acks == [(tag, True)] and len(rig.uploads()) == 1


def test_discard_with_nothing_open_returns_zero() -> None:
    assert Rig().ingest.discard() == 0


# --- the ledger: nothing lost, nothing twice --------------------------------------------------


@pytest.mark.parametrize("seed,refusals", [(1, 0.0), (2, 0.0), (3, 0.15)], ids=["s1", "s2", "s3-refusing"])
def test_ledger_every_event_is_uploaded_or_dead_lettered_exactly_once(seed: int, refusals: float) -> None:
    rng = random.Random(seed)
    assets = [f"asset-{i}" for i in range(7)]
    rig = Rig(batch_size=50, max_outstanding=40)
    valid: list[str] = []
    invalid: list[str] = []
    malformed_bodies: list[str] = []
    counter = iter(range(10**9))

    def new_valid() -> dict[str, Any]:
        event_id = f"v{next(counter)}"
        valid.append(event_id)
        return event(rng.choice(assets), event_id)

    def new_invalid() -> dict[str, Any]:
        event_id = f"i{next(counter)}"
        invalid.append(event_id)
        return event(rng.choice(["", "  ", 12, None, ["a"]]), event_id)

    while len(valid) < 2000:
        roll = rng.random()
        if roll < 0.04:
            body = rng.choice([b"{not json", b"[]", b"null", b"\xff\xfe", b'"text"'])
            malformed_bodies.append(body.decode("utf-8", "backslashreplace"))
            rig.send(body)
        elif roll < 0.08:
            rig.send_event(new_invalid())
        elif roll < 0.5:
            rig.send_event(new_valid())
        elif roll < 0.6:
            items = [new_valid() for _ in range(rng.randint(1, 5))]
            rig.send_task([items if len(items) > 1 else items[0]])
        else:
            n = min(rng.randint(1, 60), 2000 - len(valid))
            items = [new_valid() if rng.random() > 0.05 else new_invalid() for _ in range(max(n, 1))]
            rng.shuffle(items)
            rig.send_event(items)
        rig.failing = rng.random() < refusals
        if rng.random() < 0.3:
            rig.clock.advance(rng.uniform(0, 1.5))
            rig.ingest.tick()
    rig.failing = False
    rig.ingest.flush_all(1.0)
    assert (rig.refused > 0) == (refusals > 0)

    uploaded: Counter[str] = Counter()
    for upload in rig.uploads():
        assert 1 <= len(upload["events"]) <= 50
        for text in upload["events"]:
            item = json.loads(text)
            assert item["asset_id"] == upload["asset_id"]
            uploaded[item["activity_params"]["event_id"]] += 1
    assert len(valid) >= 2000
    assert set(uploaded) == set(valid)
    assert max(uploaded.values()) == 1

    dead = rig.dead_letters()
    dead_invalid = Counter(d["event"]["activity_params"]["event_id"] for d in dead if d["reason"] == "invalid")
    assert dead_invalid == Counter(invalid)
    assert sorted(d["raw"] for d in dead if d["reason"] == "malformed") == sorted(malformed_bodies)
    assert len(dead) == len(invalid) + len(malformed_bodies)

    # Every message acknowledged once, none early (the rig's broker checks each frame), and
    # the last frame with multiple=True covers every tag not acknowledged alone before.
    last = rig.next_tag - 1
    assert rig.unacked == set()
    multiple = [tag for tag, many in rig.acks if many]
    alone = {tag for tag, many in rig.acks if not many}
    assert multiple == sorted(set(multiple))
    assert set(range(multiple[-1] + 1, last + 1)) <= alone
    assert len(rig.acks) <= last
    assert rig.acker.outstanding == 0 and rig.batcher.buffered == 0
    assert rig.ingest.counts["malformed"] == len(malformed_bodies)
    assert rig.ingest.counts["invalid"] == len(invalid)


# --- the replay counter travels with each event -----------------------------------------------------


def test_each_events_replay_count_goes_into_its_batch() -> None:
    """A replayed event shares a batch with fresh ones: its count travels beside it, so that
    whichever stage dead-letters it next says how often it came back (issue: replays reset)."""
    rig = Rig()
    rig.send_event(event(event_id="fresh-1"))
    rig.send_event(event(event_id="replayed"), headers={"x-replays": 2})
    rig.send_event(event(event_id="fresh-2"))
    rig.wait_and_tick()
    (upload,) = rig.uploads()
    ids = [json.loads(text)["activity_params"]["event_id"] for text in upload["events"]]
    assert dict(zip(ids, upload["replays"])) == {"fresh-1": 0, "replayed": 2, "fresh-2": 0}


def test_batches_without_replayed_events_carry_no_counts() -> None:
    rig = Rig()
    rig.send_event(event(event_id="fresh"))
    rig.wait_and_tick()
    (upload,) = rig.uploads()
    assert "replays" not in upload


# --- a bug costs one message, never the consumer ------------------------------------------------------


def test_a_bug_while_batching_sets_that_message_aside_whole_and_the_consumer_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    add = rig.batcher.add

    def buggy(asset_id: str, *args: Any, **kwargs: Any) -> list[Batch]:
        if asset_id == "boom":
            raise KeyError("a bug in batching")
        return add(asset_id, *args, **kwargs)

    monkeypatch.setattr(rig.batcher, "add", buggy)
    body = dumps([event("fine", "1"), event("boom", "2")])
    tag = rig.send(body, ids={"1", "2"})  # raises nothing: kombu would have stopped the worker
    after = rig.send_event(event("fine", "3"))
    rig.wait_and_tick()
    (dead,) = rig.dead_letters()
    assert dead["reason"] == "unhandled" and dead["raw"].encode() == body  # whole, as the producer sent it
    assert dead["details"]["exception"] == "KeyError" and dead["details"]["replay_body"] is True
    assert "KeyError" in caplog.text
    assert rig.acked_up_to() == after and tag in {t for t, _ in rig.acks} | {after}
    assert [json.loads(t)["activity_params"]["event_id"] for u in rig.uploads() for t in u["events"]] == ["1", "3"]


def test_connection_errors_still_reach_celery() -> None:
    import amqp

    rig = Rig()
    rig.ingest.acker._ack = lambda tag, multiple: (_ for _ in ()).throw(amqp.exceptions.RecoverableConnectionError())
    rig.ingest.settings = rig.settings
    with pytest.raises(amqp.exceptions.RecoverableConnectionError):
        rig.send(b"not json")  # its dead letter is confirmed, then the ack meets a dead channel


# --- the broker's max_message_size ----------------------------------------------------------------------


def test_a_hand_off_over_the_brokers_limit_is_split_until_it_fits_and_nothing_is_lost() -> None:
    rig = Rig(batch_size=1000, max_message_size=40_000)
    big = [event(f"a{n % 3}", f"e{n}") for n in range(600)]  # about 200 KB of events in three batches
    tags = [rig.send_event(big[k:k + 100]) for k in range(0, 600, 100)]
    rig.ingest.flush_all(1.0)
    assert rig.ingest.handoff.max_message_bytes == 40_000  # learned from the refusal
    sizes = [len(m.body) for m in rig.outgoing() if m.queue == UPLOAD_QUEUE]
    assert sizes and max(sizes) <= 40_000
    uploaded = [json.loads(t)["activity_params"]["event_id"] for u in rig.uploads() for t in u["events"]]
    assert sorted(uploaded) == sorted(f"e{n}" for n in range(600))
    assert all(len({json.loads(t)["asset_id"] for t in u["events"]}) == 1 for u in rig.uploads())
    assert rig.acked_up_to() == tags[-1] and not rig.ingest.blocked


def test_an_event_alone_over_the_brokers_limit_is_dead_lettered_in_parts() -> None:
    rig = Rig(max_message_size=20_000)
    huge = event("a", "huge", activity_params={"event_id": "huge", "blob": "x" * 60_000})
    tag = rig.send_event([huge, event("a", "small")])
    rig.ingest.flush_all(1.0)
    letters = rig.dead_letters()
    assert letters and {d["reason"] for d in letters} == {"invalid"} and len(letters) > 1  # parts
    assert "max_message_size" in letters[0]["error"]
    assert all(len(m.body) <= 20_000 for m in rig.outgoing())
    assert [json.loads(t)["activity_params"]["event_id"] for u in rig.uploads() for t in u["events"]] == ["small"]
    assert rig.acked_up_to() == tag


# --- suspects are proven guilty alone ---------------------------------------------------------------------


def test_a_message_over_the_delivery_limit_is_moved_to_quarantine_as_it_was() -> None:
    rig = Rig(delivery_limit=3)
    body = b'{"asset_id": "a", "activity_params": {"event_id": "s1"}}'
    tag = rig.send(body, ids={"s1"}, headers={"x-delivery-count": 3, "x-replays": 1})
    (moved,) = [m for m in rig.outgoing() if m.queue == QUARANTINE]
    assert moved.body == body and moved.headers["x-suspect-deliveries"] == 3 and moved.headers["x-replays"] == 1
    assert "x-delivery-count" not in moved.headers
    assert rig.acks == [(tag, True)] and rig.dead_letters() == []  # not poison: not proven yet


def test_a_quarantined_message_is_handled_alone_and_at_once() -> None:
    rig = Rig()
    acked: list[str] = []
    message = FakeMessage(dumps([event("a", "q1"), event("b", "q2"), event(None, "q3")]), 1,
                          headers={"x-delivery-count": 0, "x-suspect-deliveries": 10})
    rig.ingest.handle_alone(message, lambda: acked.append("ack"))
    assert sorted(u["asset_id"] for u in rig.uploads()) == ["a", "b"]  # no waiting for batches to fill
    assert [d["reason"] for d in rig.dead_letters()] == ["invalid"]
    assert acked == ["ack"] and rig.batcher.buffered == 0


def test_a_quarantined_message_that_killed_the_worker_alone_is_poison_kept_whole() -> None:
    rig = Rig()
    acked: list[str] = []
    body = b'{"asset_id": "a", "activity_params": {"event_id": "p"}, "boom": "\xff"}'
    message = FakeMessage(body, 1, headers={"x-delivery-count": 2, "x-suspect-deliveries": 10})
    rig.ingest.handle_alone(message, lambda: acked.append("ack"))
    (dead,) = rig.dead_letters()
    assert dead["reason"] == "poison" and dead["details"] == {"deliveries": 12}
    assert base64.b64decode(dead["raw_base64"]) == body  # the very bytes, to replay once fixed
    assert rig.uploads() == [] and acked == ["ack"]


def test_a_large_quarantined_message_is_cut_into_batches_like_any_other() -> None:
    rig = Rig(batch_size=100, batch_max_bytes=20_000)
    acked: list[str] = []
    events = [event("a", f"big{i}") for i in range(1000)] + [event("b", "small")]
    message = FakeMessage(dumps(events), 1, headers={"x-delivery-count": 0, "x-suspect-deliveries": 10})
    rig.ingest.handle_alone(message, lambda: acked.append("ack"))
    uploads = rig.uploads()
    assert all(len(u["events"]) <= 100 for u in uploads)
    assert all(2 + sum(len(t) + 1 for t in u["events"]) <= 20_000 for u in uploads)
    assert len([u for u in uploads if u["asset_id"] == "a"]) >= 10
    assert sorted(json.loads(t)["activity_params"]["event_id"] for u in uploads for t in u["events"]) == sorted(
        e["activity_params"]["event_id"] for e in events)
    assert acked == ["ack"]


# --- the hand-off runs in the background: the loop never waits for the broker ----------------------


class DeferredRig(Rig):
    """A rig whose broker answers only when the test says so (a :class:`Deferred` submitter)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deferred = Deferred(on_confirm=self._publish)
        self.ingest.handoff.publisher = self.deferred

    def confirm(self, count: int | None = None, *, index: int = 0) -> None:
        self.deferred.confirm(count, index=index)


def test_messages_are_taken_while_a_hand_off_waits_for_its_confirm_and_acked_after_it() -> None:
    rig = DeferredRig(batch_size=2)
    t1 = rig.send_event([event("a", "1"), event("a", "2")])  # a full batch: handed over at once
    t2 = rig.send_event([event("b", "3"), event("b", "4")])  # taken although the first is not confirmed
    assert len(rig.deferred.groups) == 2 and rig.acks == []
    assert not rig.ingest.blocked
    rig.confirm(1)
    assert rig.acks == [(t1, True)]
    rig.confirm()
    assert rig.acks == [(t1, True), (t2, True)]


def test_over_the_limit_one_early_release_waits_for_its_confirm_before_the_next() -> None:
    """Confirms slower than messages (quorum queues): released batches stay big, not one event each."""
    rig = DeferredRig(max_outstanding=3)
    for n, asset in enumerate("abcd"):
        rig.send_event(event(asset, f"e{n}"))  # the fourth goes over the limit: "a" is released
    assert len(rig.deferred.groups) == 1
    sent = ["e0", "e1", "e2", "e3"]
    for n in range(4, 40):  # the broker has not confirmed yet: no more early releases meanwhile
        rig.send_event(event("abcd"[n % 4], f"e{n}"))
        sent.append(f"e{n}")
    assert len(rig.deferred.groups) == 1
    rig.confirm()
    rig.send_event(event("a", "e40"))  # the next release takes what gathered meanwhile
    sent.append("e40")
    ((group, _),) = rig.deferred.groups  # one release again
    assert sum(len(batch["events"]) for message in group for batch in json.loads(message.body)["batches"]) >= 10
    rig.confirm()
    rig.ingest.flush_all(1.0)
    assert sorted(e["activity_params"]["event_id"] for e in uploaded_events(rig)) == sorted(sent)


def test_a_later_hand_off_confirmed_first_waits_for_the_older_message_in_the_acks() -> None:
    rig = DeferredRig(batch_size=2)
    t1 = rig.send_event([event("a", "1"), event("a", "2")])
    t2 = rig.send_event([event("b", "3"), event("b", "4")])
    rig.confirm(1, index=1)  # the broker answers the second group first
    assert rig.acks == []  # t2 is complete, t1 is not: acknowledgements go in order
    rig.confirm()
    assert rig.acks == [(t2, True)] and t1 < t2


def test_an_unconfirmed_hand_off_blocks_the_consumer_and_is_tried_again_after_a_backoff() -> None:
    rig = DeferredRig(batch_size=2)
    tag = rig.send_event([event("a", "1"), event("a", "2")])
    rig.deferred.refuse()
    assert rig.ingest.blocked and rig.deferred.groups == []
    rig.send_event([event("b", "3"), event("b", "4")])  # already in hand: waits behind, not handed over
    assert rig.deferred.groups == []
    rig.ingest.tick()
    assert rig.deferred.groups == []  # the backoff is not over
    rig.clock.advance(RETRY_BASE)
    rig.ingest.tick()
    assert len(rig.deferred.groups) == 2 and not rig.ingest.blocked  # in order, the refused one first
    rig.confirm()
    assert rig.acks[-1][0] == tag + 1 and ids_in([json.loads(t) for u in rig.uploads() for t in u["events"]]) == {
        "1", "2", "3", "4"}


def test_results_of_hand_offs_made_before_a_lost_connection_are_ignored() -> None:
    rig = DeferredRig(batch_size=2)
    rig.send_event([event("a", "1"), event("a", "2")])
    rig.ingest.discard()  # the channel is gone: its tags mean nothing any more
    rig.deferred.confirm()
    assert rig.acks == []


def test_a_bug_while_building_upload_messages_costs_those_events_a_dead_letter_not_the_consumer() -> None:
    rig = Rig(batch_size=2)

    def broken(batches: list[Batch], limit: int | None) -> list[Outgoing]:
        raise KeyError("a bug")

    rig.ingest.handoff.render = broken
    t1 = rig.send_event([event("a", "1"), event("a", "2")])
    dead = rig.dead_letters()
    assert [d["reason"] for d in dead] == ["unhandled", "unhandled"]
    assert {d["event"]["activity_params"]["event_id"] for d in dead} == {"1", "2"}
    assert dead[0]["details"] == {"problem": "internal_error", "exception": "KeyError"}
    assert rig.acks == [(t1, True)] and not rig.ingest.blocked
    rig.ingest.handoff.render = rig.ingest._render  # fixed: the next messages go on as usual
    t2 = rig.send_event([event("b", "3"), event("b", "4")])
    assert rig.acks[-1] == (t2, True) and [u["asset_id"] for u in rig.uploads()] == ["b"]


# --- deliveries kombu cannot decode: through the same one place ------------------------------------


@pytest.mark.parametrize("compression,body,problem", [
    ("gzip", gzip.compress(b'{"asset_id": "a"}'), "does not decompress"),
    ("application/x-snappy", b"xyz", "does not read that compression"),
    ("gzip", zlib.compress(b" " * (11 * 1024 * 1024)), "expands past"),
], ids=["real-gzip-under-kombus-gzip", "unknown-codec", "zip-bomb"])
def test_a_body_kombu_cannot_decompress_is_dead_lettered_whole_through_the_acker(
        compression: str, body: bytes, problem: str) -> None:
    install_bounded_decompression()
    rig = Rig()
    good = rig.send_event(event("a", "g1"))
    connection = Connection("memory://")
    channel = connection.channel()
    queue = Queue(f"hostile-{uuid.uuid4().hex}", channel=channel)
    queue.declare()
    delivered: list[Any] = []

    def on_undecodable(message: Any, exc: Exception) -> None:
        message.delivery_tag = rig.next_tag
        rig.next_tag += 1
        rig.unacked.add(message.delivery_tag)
        delivered.append(message.delivery_tag)
        rig.ingest.on_undecodable(message, exc)

    consumer = KombuConsumer(channel, [queue], on_message=lambda m: pytest.fail("decoded"),
                             on_decode_error=on_undecodable)
    consumer.consume()
    channel.basic_publish(channel.prepare_message(body, headers={"compression": compression}),
                          exchange="", routing_key=queue.name)
    connection.drain_events(timeout=1)
    [dead] = rig.dead_letters()
    assert dead["reason"] == "malformed" and problem in dead["error"]
    assert dead["details"]["problem"] == "compression" and dead["details"]["compression"] == compression
    assert base64.b64decode(dead["raw_base64"]) == body if "raw_base64" in dead else dead["raw"].encode() == body
    rig.wait_and_tick()
    assert rig.acked_up_to() == delivered[0] and good < delivered[0]


def test_a_body_compressed_as_kombu_compresses_it_is_read_as_usual() -> None:
    install_bounded_decompression()
    rig = Rig()
    connection = Connection("memory://")
    channel = connection.channel()
    queue = Queue(f"zlib-{uuid.uuid4().hex}", channel=channel)
    queue.declare()

    def on_message(message: Any) -> None:
        message.delivery_tag = rig.next_tag
        rig.next_tag += 1
        rig.unacked.add(message.delivery_tag)
        rig.contents[message.delivery_tag] = {"z1"}
        rig.ingest.on_message(message)

    KombuConsumer(channel, [queue], on_message=on_message, on_decode_error=lambda m, e: pytest.fail(repr(e))).consume()
    channel.basic_publish(channel.prepare_message(zlib.compress(dumps(event("a", "z1"))),
                                                  content_type="application/json", headers={"compression": "gzip"}),
                          exchange="", routing_key=queue.name)
    connection.drain_events(timeout=1)
    rig.wait_and_tick()
    assert ids_in(uploaded_events(rig)) == {"z1"} and rig.dead_letters() == []

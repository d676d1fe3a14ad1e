"""The worker end to end: RabbitMQ in, sandbox API out, every event accounted for."""

from __future__ import annotations

from collections import Counter

from tests.harness import DeadLetters, QueueSet, event, event_id_of, publish_events
from worker.sandbox import Sandbox


def delivered_ids(sandbox: Sandbox) -> list[str | None]:
    return [event_id_of(e) for e in sandbox.accepted()]


def test_valid_events_are_delivered_once_in_batches(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    sent = [f"e{i}" for i in range(300)]
    singles = [event(i, asset_id=f"asset-{n % 3}") for n, i in enumerate(sent[:100])]
    arrays = [[event(i, asset_id="asset-9") for i in sent[k:k + 50]] for k in range(100, 300, 50)]
    publish_events(queues.settings.queue, singles + arrays)
    start_worker()
    assert sandbox.wait_until(lambda s: s.accepted_count() >= len(sent), timeout=30)
    assert Counter(delivered_ids(sandbox)) == Counter(sent)  # exactly once
    for record in sandbox.requests():
        assert record.status == 200
        assert len(set(record.asset_ids)) == 1 and 1 <= record.events <= 1000


def test_task_messages_feed_the_same_batches(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    from celery import Celery

    producer = Celery("producer", broker=queues.settings.broker_url)
    producer.conf.task_default_queue = queues.settings.task_queue
    start_worker()
    ids = [f"t{i}" for i in range(40)]
    for i in ids[:20]:
        producer.send_task("activities.ingest", args=[event(i)])
    producer.send_task("activities.ingest", args=[[event(i) for i in ids[20:]]])
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 40, timeout=30)
    assert sorted(delivered_ids(sandbox)) == sorted(ids)
    assert len(sandbox.requests()) < 10  # batched, never one POST per event


def test_bad_input_is_dead_lettered_with_its_reason(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    from tests.harness import publish_raw

    publish_raw(queues.settings.queue, [b"{not json", b"\xff\xfe", b"[]"])
    publish_events(queues.settings.queue, [
        event("bad-source", activity_source="WEB"),
        event("no-asset", asset_id=""),
        [event("good-1"), event("impossible-ts", timestamp="2021-02-30T16:47:37Z")],
    ])
    start_worker()
    assert dead_letters.wait_for(6, timeout=30)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 1, timeout=30)
    reasons = Counter(e["reason"] for e in dead_letters.envelopes)
    assert reasons == {"malformed": 3, "invalid": 3}
    by_id = {event_id_of(e["event"]): e for e in dead_letters.envelopes if e["event"]}
    assert set(by_id) == {"bad-source", "no-asset", "impossible-ts"}
    assert "activity_source" in by_id["bad-source"]["details"]
    assert by_id["impossible-ts"]["event"]["timestamp"] == "2021-02-30T16:47:37Z"  # kept whole
    raws = sorted(e.get("raw") for e in dead_letters.envelopes if e["reason"] == "malformed")
    assert "{not json" in raws
    assert delivered_ids(sandbox) == ["good-1"]


#: The timestamp of the API documentation's own samples: no zone.
VENDOR_NAIVE = "2020-04-28T16:47:37"


def test_the_vendors_zone_less_timestamp_is_delivered_as_is(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    sent = ["zoned-1", "naive-1", "naive-2", "zoned-2"]
    publish_events(queues.settings.queue, [
        [event("zoned-1"), event("naive-1", timestamp=VENDOR_NAIVE)],
        event("naive-2", timestamp="2021-12-29T12:06:28.5"),
        event("zoned-2", timestamp="2021-12-29T06:12:28+05:30"),
    ])
    start_worker()
    assert sandbox.wait_until(lambda s: s.accepted_count() >= len(sent), timeout=30)
    assert sorted(delivered_ids(sandbox)) == sorted(sent)
    dead_letters.settle(quiet=0.5)
    assert dead_letters.envelopes == []
    by_id = {event_id_of(e): e for e in sandbox.accepted()}
    assert by_id["naive-1"]["timestamp"] == VENDOR_NAIVE  # forwarded as it is
    assert by_id["naive-2"]["timestamp"] == "2021-12-29T12:06:28.5"


def test_zone_less_timestamps_are_dead_lettered_when_the_setting_says_reject(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    publish_events(queues.settings.queue, [
        [event("zoned-1"), event("naive-1", timestamp=VENDOR_NAIVE)],
        event("zoned-2", timestamp="2021-12-29T06:12:28+05:30"),
    ])
    start_worker(ACTIVITY_NAIVE_TIMESTAMPS="reject")
    assert dead_letters.wait_for(1, timeout=30)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 2, timeout=30)
    dead_letters.settle(quiet=0.5)
    [envelope] = dead_letters.envelopes
    assert envelope["reason"] == "invalid"
    assert envelope["event"] == event("naive-1", timestamp=VENDOR_NAIVE)  # kept whole, to replay
    assert "ACTIVITY_NAIVE_TIMESTAMPS" in envelope["error"] and "add Z (UTC) or an offset" in envelope["error"]
    delivered = sorted(delivered_ids(sandbox))
    assert delivered == ["zoned-1", "zoned-2"]
    assert sorted(delivered + [event_id_of(envelope["event"])]) == ["naive-1", "zoned-1", "zoned-2"]

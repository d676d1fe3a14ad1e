"""What the API answers decides each event's fate: delivered, retried, or dead-lettered."""

from __future__ import annotations

from collections import Counter

from tests.harness import DeadLetters, QueueSet, event, event_id_of, publish_events
from worker.sandbox import Sandbox


def ids_of(events: list) -> list:
    return [event_id_of(e) for e in events]


def test_full_batches_and_the_wait_rule(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    ids = [f"b{i}" for i in range(2500)]
    publish_events(queues.settings.queue, [[event(i) for i in ids[k:k + 500]] for k in range(0, 2500, 500)])
    start_worker()
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 2500, timeout=60)
    sizes = sorted(r.events for r in sandbox.requests())
    assert sizes == [500, 1000, 1000]  # two full batches, the rest released by the wait
    assert sorted(ids_of(sandbox.accepted())) == sorted(ids)


def test_rejected_events_are_isolated_and_the_rest_delivered(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    ids = [f"r{i}" for i in range(1000)]
    bad = {"r17", "r500", "r999"}
    events = [event(i) for i in ids]
    for e in events:
        if e["activity_params"]["event_id"] in bad:
            e["activity_params"]["sandbox_reject"] = True
    publish_events(queues.settings.queue, [events])
    start_worker()
    assert dead_letters.wait_for(3, timeout=60)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 997, timeout=60)
    assert set(dead_letters.ids()) == bad
    assert {e["reason"] for e in dead_letters.envelopes} == {"rejected"}
    assert all(e["details"]["status"] == 400 for e in dead_letters.envelopes)
    assert sorted(ids_of(sandbox.accepted())) == sorted(set(ids) - bad)
    assert len(sandbox.requests()) <= 2 * 3 * 10 + 1  # the bound the README promises


def test_unauthorized_is_dead_lettered_not_retried(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    ids = [f"u{i}" for i in range(20)]
    publish_events(queues.settings.queue, [[event(i) for i in ids]])
    start_worker(NETCORE_API_KEY="a-wrong-key")
    assert dead_letters.wait_for(20, timeout=30)
    assert sorted(dead_letters.ids()) == sorted(ids)
    assert {e["reason"] for e in dead_letters.envelopes} == {"unauthorized"}
    assert "NETCORE_API_KEY" in dead_letters.envelopes[0]["error"]
    assert [r.status for r in sandbox.requests()] == [401]


def test_server_errors_are_retried_until_delivered(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    sandbox.add_fault(status=500, count=3)
    ids = [f"s{i}" for i in range(50)]
    publish_events(queues.settings.queue, [[event(i) for i in ids]])
    start_worker()
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 50, timeout=60)
    assert [r.status for r in sandbox.requests()] == [500, 500, 500, 200]
    assert Counter(ids_of(sandbox.accepted())) == Counter(ids)


def test_retry_after_is_honoured(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    sandbox.add_fault(status=429, retry_after=1, count=1)
    publish_events(queues.settings.queue, [[event("ra1"), event("ra2")]])
    start_worker(UPLOAD_RETRY_BACKOFF="0.01", UPLOAD_RETRY_BACKOFF_MAX="5")
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 2, timeout=30)
    first, second = sandbox.requests()
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0  # not before the server said


def test_retries_exhausted_then_replay_delivers(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    from worker.deadletter import cli as dlq

    sandbox.add_fault(status=503, asset_id="asset-x")  # asset-x's uploads fail until cleared
    ids = [f"x{i}" for i in range(30)]
    publish_events(queues.settings.queue, [[event(i, asset_id="asset-x") for i in ids], event("ok", asset_id="ok")])
    start_worker(UPLOAD_MAX_RETRIES="2", UPLOAD_RETRY_BACKOFF="0.05", UPLOAD_RETRY_BACKOFF_MAX="0.2")
    assert dead_letters.wait_for(30, timeout=60)  # the API took asset "ok": asset-x's failures count
    assert {e["reason"] for e in dead_letters.envelopes} == {"retries_exhausted"}
    assert {e["attempts"] for e in dead_letters.envelopes} == {3}
    assert sum(1 for r in sandbox.requests() if r.status == 503) <= 6
    # put them back where the replay command finds them, then replay after recovery
    dead_letters.close()
    publish_events(queues.settings.dead_letter_queue, dead_letters.envelopes)
    sandbox.clear_faults()
    report = dlq.replay(queues.settings, reasons=["retries_exhausted"])
    assert report.replayed == 30
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 31, timeout=60)
    assert sorted(ids_of(sandbox.accepted())) == sorted(ids + ["ok"])

"""The fault matrix: each fault injected for real, then the ledger.

ids sent = ids delivered + ids dead-lettered, with duplicates counted (allowed only around a
crash). Broker faults (restart, closed connections) are in test_broker_faults.py.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest

from tests.harness import DeadLetters, QueueSet, all_delivered, event, event_id_of, publish_events
from worker.sandbox import Sandbox


def delivered(sandbox: Sandbox) -> Counter:
    return Counter(event_id_of(e) for e in sandbox.accepted())


def test_sigkill_during_an_upload(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    ids = [f"p{i}" for i in range(100)]
    sandbox.add_fault(latency=30, count=1)  # the first upload hangs: the kill lands inside it
    worker = start_worker()
    mark = worker.mark
    publish_events(queues.settings.queue, [[event(i) for i in ids]])
    assert worker.wait_for_log("activities.upload", timeout=30, start=mark)
    assert sandbox.wait_until(lambda s: s.in_flight() >= 1, timeout=30)  # the POST is in progress
    worker.kill()
    start_worker()  # the unacknowledged upload task comes back to the new worker
    assert sandbox.wait_until(all_delivered(ids), timeout=60)
    counts = delivered(sandbox)
    assert set(counts) == set(ids) and max(counts.values()) == 1  # the hung POST never stored


def test_sigkill_of_the_main_process_while_batches_fill(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    partial = [f"m{i}" for i in range(45)]  # 9 per asset: no batch of 10 fills
    marker = [f"z{i}" for i in range(10)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 5}") for n, i in enumerate(partial)])
    publish_events(queues.settings.queue, [event(i, asset_id="asset-z") for i in marker])
    worker = start_worker(ACTIVITY_BATCH_SIZE=10, ACTIVITY_BATCH_WAIT=3600)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 10, timeout=30)  # the 45 are in memory
    os.kill(worker.process.pid, signal.SIGKILL)  # the main process only; its pool is orphaned
    worker.process.wait(30)
    start_worker(ACTIVITY_BATCH_SIZE=10, ACTIVITY_BATCH_WAIT=0.2)
    assert sandbox.wait_until(all_delivered(partial + marker), timeout=60)
    counts = delivered(sandbox)
    assert set(counts) == set(partial + marker)
    assert all(counts[i] == 1 for i in partial)  # in memory only at the kill: redelivered once
    # the marker batch may come twice: it was uploaded just before the kill (allowed duplicates)


def test_sigterm_with_uploads_running_and_batches_filling(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    full = [f"f{i}" for i in range(40)]
    partial = [f"q{i}" for i in range(7)]
    sandbox.add_fault(latency=1.0, count=2)  # two uploads are running when the deploy comes
    worker = start_worker(ACTIVITY_BATCH_SIZE=20, ACTIVITY_BATCH_WAIT=3600)
    publish_events(queues.settings.queue, [[event(i, asset_id="asset-f") for i in full]])
    publish_events(queues.settings.queue, [event(i, asset_id="asset-q") for i in partial])
    assert sandbox.wait_until(lambda s: s.in_flight() >= 1, timeout=30)
    assert worker.terminate(timeout=60) == 0  # bounded: warm shutdown, no hang
    start_worker(ACTIVITY_BATCH_WAIT=0.2)
    assert sandbox.wait_until(all_delivered(full + partial), timeout=60)
    assert set(delivered(sandbox)) == set(full + partial)


@pytest.mark.parametrize(
    "fault",
    [
        {"latency": 3.0, "count": 2},  # slower than UPLOAD_TIMEOUT=1
        {"drop": True, "count": 2},  # connection closed without an answer
        {"status": 200, "body": "<html><body>Gateway</body></html>", "content_type": "text/html", "count": 2},
        {"status": 200, "body": "", "count": 2},
        {"status": 200, "body": '{"status": "fail"}', "count": 2},
    ],
    ids=["slower-than-timeout", "connection-dropped", "200-html", "200-empty", "200-status-fail"],
)
def test_api_misbehaving_is_retried_never_lost(start_worker, queues: QueueSet, sandbox: Sandbox, fault: dict) -> None:
    ids = [f"a{i}" for i in range(30)]
    sandbox.add_fault(**fault)
    publish_events(queues.settings.queue, [[event(i) for i in ids]])
    worker = start_worker(UPLOAD_TIMEOUT=1)
    assert sandbox.wait_until(all_delivered(ids), timeout=60)
    # two failed attempts, then the third went through; with no sign yet that the API works,
    # the failures spent no attempt (it might have been an outage)
    assert worker.log().count("without spending an attempt") == 2
    if "latency" in fault:
        # the API may store a request whose answer came too late: at least once, not exactly
        assert set(delivered(sandbox)) == set(ids)
        assert "no answer from the API within 1" in worker.log()
    else:
        assert delivered(sandbox) == Counter(ids)  # faulty answers stored nothing: exactly once
        assert [r.status for r in sandbox.requests()][-1] == 200


def test_two_workers_one_killed(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    ids = [f"t{i}" for i in range(3000)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(ids)])
    sandbox.add_fault(latency=0.2)
    first = start_worker(ACTIVITY_BATCH_SIZE=100)
    start_worker(ACTIVITY_BATCH_SIZE=100)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 300, timeout=60)
    first.kill()
    sandbox.clear_faults()
    assert sandbox.wait_until(all_delivered(ids), timeout=120)
    counts = delivered(sandbox)
    assert set(counts) == set(ids)


def test_one_batch_failing_alone_is_held_then_given_up_after_its_retries_once_the_api_works(
    start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    """One batch, nothing else flowing, every attempt failing: the worker cannot tell an outage
    from a bad batch, so it spends no attempt and, after a few failures, holds that asset_id (one
    probe per interval). Once another upload goes through, the API works: the batch is the
    problem, its retries are spent and it is dead-lettered, replayable. Outages:
    tests/integration/test_outage.py."""
    ids = [f"d{i}" for i in range(25)]
    sandbox.add_fault(drop=True, asset_id="asset-d")  # every connection of asset-d's uploads reset
    publish_events(queues.settings.queue, [[event(i, asset_id="asset-d") for i in ids]])
    worker = start_worker(UPLOAD_MAX_RETRIES=2, UPLOAD_RETRY_BACKOFF=0.05, UPLOAD_RETRY_BACKOFF_MAX=0.1,
                          UPLOAD_PROBE_INTERVAL_MAX=1)
    assert worker.wait_for_log("asset_id=asset-d failed 3 times in a row with no sign the API works", 60)
    dead_letters.settle(1.0)
    assert dead_letters.envelopes == []  # held, not given up on: it may be an outage
    publish_events(queues.settings.queue, [event("healthy", asset_id="asset-h")])
    assert dead_letters.wait_for(25, timeout=60)
    assert sorted(dead_letters.ids()) == sorted(ids)
    assert {e["reason"] for e in dead_letters.envelopes} == {"retries_exhausted"}
    assert {e["attempts"] for e in dead_letters.envelopes} == {3}
    assert "could not reach the API" in dead_letters.envelopes[0]["error"]
    assert sandbox.wait_until(all_delivered(["healthy"]), timeout=10)

"""Crashes and deploys lose nothing: ids sent = ids delivered + ids dead-lettered."""

from __future__ import annotations

from collections import Counter

from tests.harness import QueueSet, event, event_id_of, publish_events
from worker.sandbox import Sandbox


def ledger(sent: list[str], delivered: list, dead: list | None = None) -> tuple[set, int]:
    """(ids lost, duplicates delivered)."""
    seen = Counter(delivered) + Counter(dead or [])
    lost = set(sent) - set(seen)
    return lost, sum(n - 1 for n in seen.values() if n > 1)


def test_sigkill_of_the_whole_worker_mid_run_loses_nothing(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    sent = [f"k{i}" for i in range(5000)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(sent)])
    sandbox.add_fault(latency=0.3)  # slow uploads: the kill lands mid-run
    worker = start_worker(ACTIVITY_BATCH_SIZE=200)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 200, timeout=60)
    worker.kill()
    assert sandbox.accepted_count() < len(sent), "the kill came too late to test anything"
    sandbox.clear_faults()
    start_worker(ACTIVITY_BATCH_SIZE=200)
    assert sandbox.wait_until(lambda s: set(sent) <= {event_id_of(e) for e in s.accepted()}, timeout=120)
    lost, duplicates = ledger(sent, [event_id_of(e) for e in sandbox.accepted()])
    assert lost == set()
    assert duplicates <= 2000  # only around the crash: at most what was in flight


def test_sigterm_flushes_partial_batches_before_exit(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    partial = [f"w{i}" for i in range(27)]  # 9 per asset: no batch of 10 fills
    marker = [f"m{i}" for i in range(10)]  # one full batch, published after them
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 3}") for n, i in enumerate(partial)])
    publish_events(queues.settings.queue, [event(i, asset_id="asset-z") for i in marker])
    worker = start_worker(ACTIVITY_BATCH_SIZE=10, ACTIVITY_BATCH_WAIT=3600)
    # messages arrive in order: once the marker batch is uploaded, the 27 are in memory
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 10, timeout=30)
    assert worker.terminate(timeout=60) == 0
    assert "Shutdown: handed on 27 buffered events" in worker.log()
    assert queues.depth(queues.settings.queue) == 0  # acknowledged, not returned
    start_worker()  # the flushed batches wait in the upload queue for the next worker
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 37, timeout=60)
    lost, duplicates = ledger(partial + marker, [event_id_of(e) for e in sandbox.accepted()])
    assert (lost, duplicates) == (set(), 0)

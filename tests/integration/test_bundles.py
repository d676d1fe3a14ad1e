"""How many small batches share an upload task follows the API's measured round trip, end to end.

Against a nearby API, the small batches released together travel in one task message (a
task's own cost is what matters there); against a slow one, each goes alone, so that a task
holds its message about one request, which is what a SIGKILL can duplicate.
"""

from __future__ import annotations

import re

from tests.harness import QueueSet, event, event_id_of, publish_events
from worker.sandbox import Sandbox

#: Small batches released together (one event per asset_id, none fills a batch).
ASSETS = 6

#: A bundle's or a lone batch's log line, as the upload task writes it when done.
DONE_RE = re.compile(r"(bundle batches=(\d+)|batch asset_id=\S+) events=(\d+)")


def run(start_worker, queues: QueueSet, sandbox: Sandbox, tag: str) -> list[int]:
    """Warm up (one full batch measures the round trip), then release ``ASSETS`` small batches
    together; return the batches per task of the small ones."""
    worker = start_worker(ACTIVITY_BATCH_SIZE=10, ACTIVITY_BATCH_WAIT=0.5)  # a bundle holds 10 events at most
    warm = [f"{tag}-warm-{i}" for i in range(10)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"{tag}-warm") for i in warm])
    assert sandbox.wait_until(lambda s: s.accepted_count() == len(warm), timeout=60)
    small = [f"{tag}-small-{n}" for n in range(ASSETS)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"{tag}-asset-{n}") for n, i in enumerate(small)])
    assert sandbox.wait_until(lambda s: s.accepted_count() == len(warm) + len(small), timeout=60)
    assert sorted(event_id_of(e) for e in sandbox.accepted()) == sorted(warm + small)

    def small_tasks(output: bytearray) -> list[int] | None:
        text = output.decode("utf-8", "replace")
        sizes = [int(m[2]) if m[2] else 1 for m in DONE_RE.finditer(text)][1:]  # the warm-up apart
        return sizes if sum(sizes) == ASSETS else None

    sizes = worker.output.wait_for(small_tasks, timeout=30)
    assert sizes is not None, f"the tasks' log lines never added up to {ASSETS} batches:\n{worker.log()[-3000:]}"
    return sizes


def test_against_a_nearby_api_small_batches_share_a_task(start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    sizes = run(start_worker, queues, sandbox, "near")
    # all in one task when the loopback round trip is under 25 ms; on a busy machine a few
    assert len(sizes) < ASSETS and max(sizes) > 1, sizes


def test_against_a_slow_api_each_small_batch_is_a_task_of_its_own(
        start_worker, queues: QueueSet, sandbox: Sandbox) -> None:
    sandbox.add_fault(latency=0.4)  # every request: a round trip slower than one bundle may take
    assert run(start_worker, queues, sandbox, "far") == [1] * ASSETS

"""The worker on RabbitMQ 4.x (Debian 13's 4.0, ``tests/rabbitmq4.py``): classic and quorum
queues end to end, and a SIGKILL of the worker mid-run; every ledger: ids delivered plus ids
dead-lettered equal ids sent.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.harness import DeadLetters, QueueSet, event, event_id_of, publish_events
from worker.broker.topology import Topology
from worker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(300)

CLASSIC_AND_QUORUM = pytest.mark.parametrize("kind", ["classic", pytest.param("quorum", marks=pytest.mark.quorum)])


def publish(queues: QueueSet, events: list[dict[str, Any]]) -> None:
    """Publish events to the test's ``activities`` as a producer would (declaring it as the worker does)."""
    source = Topology.of(queues.settings).source_queue()
    publish_events(source.name, events, queue_arguments=source.queue_arguments)


def ledger(sent: list[str], delivered: list[str | None], dead: list[str | None]) -> tuple[set[str], int]:
    """(ids lost, ids seen more than once) of ``sent`` against what was delivered and dead-lettered."""
    seen = Counter(delivered) + Counter(dead)
    return set(sent) - set(seen), sum(n - 1 for n in seen.values() if n > 1)


@CLASSIC_AND_QUORUM
def test_every_event_is_delivered_retried_or_dead_lettered_on_4x(
    kind: str, start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    """Batches, retries through the delay queues (the API fails the first uploads), events the
    API rejects and events the worker refuses: each id ends delivered or dead-lettered, once."""
    good = [f"g{n}" for n in range(300)]
    rejected = [f"r{n}" for n in range(5)]  # pass the worker's checks; the API answers 400
    invalid = [f"i{n}" for n in range(5)]  # refused by the worker's validation
    events = [event(i, asset_id=f"asset-{n % 4}") for n, i in enumerate(good)]
    for i in rejected:
        events.append(event(i, asset_id="asset-0"))
        events[-1]["activity_params"]["sandbox_reject"] = True
    events += [event(i, activity_source="WEB") for i in invalid]
    publish(queues, events)
    sandbox.add_fault(status=503, count=3)  # the first uploads fail: retried from the delay queues
    worker = start_worker()
    assert worker.env["ACTIVITY_QUEUE_TYPE"] == kind
    assert sandbox.wait_until(lambda s: s.accepted_count() >= len(good), timeout=120), worker.log()[-3000:]
    assert dead_letters.wait_for(len(rejected) + len(invalid), timeout=60), dead_letters.by_reason()
    dead_letters.settle(quiet=1.0)
    delivered = [event_id_of(e) for e in sandbox.accepted()]
    assert dead_letters.by_reason() == {"rejected": len(rejected), "invalid": len(invalid)}
    assert sorted(i for i in dead_letters.ids() if i) == sorted(rejected + invalid)
    assert ledger(good + rejected + invalid, delivered, dead_letters.ids()) == (set(), 0)
    assert "trying again in" in worker.log() or "retry" in worker.log()  # the 503s were retried


@CLASSIC_AND_QUORUM
def test_a_sigkill_of_the_worker_mid_run_loses_nothing_on_4x(
    kind: str, start_worker, queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters
) -> None:
    """Killed with batches in flight and messages unacknowledged, restarted: everything comes
    back from the 4.x broker and is delivered (duplicates only around the crash)."""
    sent = [f"k{n}" for n in range(3000)]
    publish(queues, [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(sent)])
    sandbox.add_fault(latency=0.3)  # slow uploads: the kill lands mid-run
    worker = start_worker(ACTIVITY_BATCH_SIZE=200)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 200, timeout=60), worker.log()[-3000:]
    worker.kill()
    assert sandbox.accepted_count() < len(sent), "the kill came too late to test anything"
    sandbox.clear_faults()
    restarted = start_worker(ACTIVITY_BATCH_SIZE=200)
    assert sandbox.wait_until(lambda s: set(sent) <= {event_id_of(e) for e in s.accepted()}, timeout=120), \
        restarted.log()[-3000:]
    dead_letters.settle(quiet=1.0)
    lost, duplicates = ledger(sent, [event_id_of(e) for e in sandbox.accepted()], dead_letters.ids())
    assert lost == set()
    assert dead_letters.envelopes == []
    assert duplicates <= 2000  # only around the crash: at most what was in flight

"""A RabbitMQ 4.x node killed (SIGKILL of its VM) and started again mid-run: the worker
reconnects by itself and loses nothing. The test faults a 4.x node of its own (``rabbit4_node``),
not the package's."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from tests.harness import QueueSet, event, event_id_of, publish_events
from tests.rabbitmq_node import RabbitNode
from worker.broker.topology import Topology
from worker.sandbox import Sandbox

pytestmark = [pytest.mark.timeout(420), pytest.mark.quorum]


@pytest.fixture
def queues(rabbit4_node: RabbitNode) -> Iterator[QueueSet]:
    """The test's quorum queues on its own 4.x node."""
    queues = QueueSet(broker_url=rabbit4_node.url, quorum=True)
    queues.declare()
    yield queues
    queues.delete()


def test_a_killed_4x_node_started_again_mid_run_loses_nothing(
    start_worker, queues: QueueSet, sandbox: Sandbox, rabbit4_node: RabbitNode
) -> None:
    sent = [f"b{n}" for n in range(3000)]
    source = Topology.of(queues.settings).source_queue()
    publish_events(source.name, [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(sent)],
                   queue_arguments=source.queue_arguments)
    sandbox.add_fault(latency=0.3)  # slow uploads: the crash lands mid-run
    worker = start_worker(ACTIVITY_BATCH_SIZE=100)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 300, timeout=60), worker.log()[-3000:]
    mark = worker.mark
    rabbit4_node.kill()
    assert sandbox.accepted_count() < len(sent), "the crash came too late to test anything"
    rabbit4_node.start()
    sandbox.clear_faults()
    assert worker.wait_for_log("Connected to amqp://", timeout=120, start=mark), "the worker did not reconnect"
    wanted = set(sent)
    assert sandbox.wait_until(lambda s: wanted <= {event_id_of(e) for e in s.accepted()}, timeout=180), (
        f"{len(wanted - {event_id_of(e) for e in sandbox.accepted()})} events not delivered"
    )
    counts = Counter(event_id_of(e) for e in sandbox.accepted())
    assert set(counts) == wanted
    assert queues.depth(queues.settings.dead_letter_queue) == 0  # delivered + dead-lettered (none) == sent
    assert sum(counts.values()) - len(counts) <= len(sent) // 10  # duplicates only around the crash
    assert worker.process is not None and worker.process.poll() is None  # reconnected by itself

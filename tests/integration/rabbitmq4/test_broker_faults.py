"""A RabbitMQ 4.x node killed (SIGKILL of its VM) and started again mid-run: the worker
reconnects by itself and loses nothing. The test faults a 4.x node of its own (``rabbit4_node``),
not the package's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import QueueSet, assert_recovered_from_broker_fault, event, publish_events
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
    assert_recovered_from_broker_fault(worker, mark, sandbox, queues, sent)

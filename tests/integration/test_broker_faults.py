"""Broker faults: RabbitMQ restarted, killed, or every connection closed, in the middle of a run.

The worker must reconnect by itself, lose nothing, and not deliver everything twice. The faults
hit a RabbitMQ node of the test's own (``rabbit_node``), never the machine's broker: the
worker, the producer and the dead-letter reader all use that node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.harness import QueueSet, all_delivered, assert_recovered_from_broker_fault, event, publish_events
from tests.rabbitmq_node import RabbitNode
from worker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def queues(rabbit_node: RabbitNode) -> Iterator[QueueSet]:
    """The test's queues on its own node (in place of a vhost on the machine's broker)."""
    queues = QueueSet(broker_url=rabbit_node.url)
    queues.declare()
    yield queues
    queues.delete()


def restart_app(node: RabbitNode) -> None:
    """``rabbitmqctl stop_app`` then ``start_app``: every client is cut off, the data stays."""
    node.stop_app()
    node.start_app()


def close_all_connections(node: RabbitNode) -> None:
    node.close_all_connections("fault injected by a test")


def kill_and_start(node: RabbitNode) -> None:
    """SIGKILL of the node's VM (a crash), then the node started again on its data."""
    node.kill()
    node.start()


@pytest.mark.parametrize("fault", [restart_app, close_all_connections, kill_and_start],
                         ids=["restart", "close-connections", "kill"])
def test_broker_fault_mid_run(start_worker, queues: QueueSet, sandbox: Sandbox, rabbit_node: RabbitNode,
                              fault: Callable[[RabbitNode], None]) -> None:
    sent = [f"b{i}" for i in range(3000)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(sent)])
    sandbox.add_fault(latency=0.3)  # slow uploads: the fault lands mid-run
    worker = start_worker(ACTIVITY_BATCH_SIZE=100)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 300, timeout=60)
    mark = worker.mark
    fault(rabbit_node)
    sandbox.clear_faults()
    duplicates = assert_recovered_from_broker_fault(worker, mark, sandbox, queues, sent)
    print(f"\n{fault.__name__}: {len(sent)} events delivered, {duplicates} duplicates")


def test_a_memory_alarm_pauses_the_worker_and_it_resumes_by_itself(
        start_worker, queues: QueueSet, sandbox: Sandbox, rabbit_node: RabbitNode) -> None:
    """RabbitMQ blocks every publishing connection while a memory (or disk) alarm is on: the worker
    cannot hand its batches on, so it stops taking messages and waits (nothing acknowledged);
    once the alarm clears it goes on by itself, nothing lost, no restart."""
    sent = [f"m{i}" for i in range(3000)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(sent)])
    # batches of 1000 per asset_id never fill: they leave after ACTIVITY_BATCH_WAIT, during the alarm
    worker = start_worker(ACTIVITY_BATCH_WAIT=8)
    rabbit_node.ctl("set_vm_memory_high_watermark", "absolute", "1")  # an alarm at once: publishers blocked
    mark = worker.mark
    try:
        assert worker.wait_for_log("the broker does not confirm", timeout=150, start=mark), worker.log()[-3000:]
        assert sandbox.accepted_count() == 0  # nothing handed on, so nothing uploaded...
        assert queues.depth(queues.settings.queue) == 0  # ... and nothing given back: held, unacknowledged
        assert worker.process is not None and worker.process.poll() is None
    finally:
        rabbit_node.ctl("set_vm_memory_high_watermark", "0.4")
    assert sandbox.wait_until(all_delivered(sent), timeout=180)
    assert worker.wait_for_log("resumed: the broker confirms again", timeout=60, start=mark)
    assert queues.depth(queues.settings.dead_letter_queue) == 0
    assert worker.process.poll() is None  # no restart needed

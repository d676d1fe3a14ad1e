"""The private RabbitMQ nodes of ``tests/rabbitmq_node.py``: a cluster of three that keeps a
quorum queue's messages through a killed node, and nothing left behind once a test is done.
"""

from __future__ import annotations

import json
import socket

import pytest
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from tests.harness import publish_raw, wait_for_exit
from tests.rabbitmq_node import RabbitNodes

pytestmark = pytest.mark.timeout(300)

#: Seconds to wait for messages or for a killed VM to be gone.
DEADLINE = 30.0


def read_all(url: str, queue: Queue, count: int) -> list[str]:
    """Consume ``count`` message bodies from ``queue`` (acknowledged), event-driven with a deadline."""
    bodies: list[str] = []
    with Connection(url, heartbeat=0) as connection:
        def on_message(message: Message) -> None:
            bodies.append(message.body.decode())
            message.ack()

        with Consumer(connection.channel(), [queue], on_message=on_message, prefetch_count=100):
            while len(bodies) < count:
                try:
                    connection.drain_events(timeout=DEADLINE)
                except socket.timeout:
                    break
    return bodies


def test_a_cluster_of_three_keeps_a_quorum_queue_through_a_killed_node(rabbit_nodes: RabbitNodes) -> None:
    first, second, third = rabbit_nodes.cluster(3)
    status = json.loads(first.ctl("cluster_status", "--formatter", "json"))
    assert sorted(status["running_nodes"]) == sorted(node.name for node in (first, second, third))

    queue = Queue("quorum-smoke", durable=True, queue_arguments={"x-queue-type": "quorum"})
    sent = [f"q{n}" for n in range(200)]
    publish_raw(queue.name, sent, broker_url=second.url, queue_arguments=queue.queue_arguments)  # confirmed
    members = first.ctl("list_queues", "name", "members", "--formatter", "json")
    assert all(node.name in members for node in (first, second, third)), members

    vm = second.os_pid()
    second.kill()
    assert not wait_for_exit([vm], DEADLINE)

    assert sorted(read_all(third.url, queue, len(sent))) == sorted(sent)  # a majority is left: nothing lost


def test_nodes_leave_nothing_behind_even_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        with RabbitNodes() as nodes:
            node = nodes.start_node()
            vm, base = node.os_pid(), nodes.base
            raise RuntimeError("the test failed")
    assert not wait_for_exit([vm], DEADLINE), "the node's VM outlived its test"
    assert not base.exists()

"""The tests of this package run on RabbitMQ 4.x: each test's queues (and with them
``worker_env``, ``start_worker`` and ``dead_letters``) live on the package's 4.x node, not in a
vhost of the machine's broker. One node serves the package (a boot costs seconds, and more on a
busy machine): every test has queues of its own on it, and none faults it (a test that does
takes a node of its own, ``rabbit4_node``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import rabbitmq4
from tests.harness import TEST_BROKER_PASSWORD, TEST_BROKER_USER, QueueSet
from tests.rabbitmq_node import RabbitNode


@pytest.fixture(scope="package")
def shared_rabbit4_node() -> Iterator[RabbitNode]:
    """The package's RabbitMQ 4.x node, removed after its last test."""
    rabbitmq4.require()
    with rabbitmq4.Rabbit4Nodes(user=TEST_BROKER_USER, password=TEST_BROKER_PASSWORD) as nodes:
        node = nodes.start_node()
        assert node.ctl("version").startswith("4."), "the node is not RabbitMQ 4.x"
        yield node


@pytest.fixture
def queues(shared_rabbit4_node: RabbitNode, request: pytest.FixtureRequest) -> Iterator[QueueSet]:
    """Queues of this test's own on the 4.x node (``@pytest.mark.quorum``: quorum queues)."""
    queues = QueueSet(broker_url=shared_rabbit4_node.url, quorum=request.node.get_closest_marker("quorum") is not None)
    queues.declare()
    yield queues
    queues.delete()

"""The tests of this package run on RabbitMQ 4.x: each test's queues (and with them
``worker_env``, ``start_worker`` and ``dead_letters``) live on a 4.x node of its own
(``rabbit4_node``), not in a vhost of the machine's broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import QueueSet
from tests.rabbitmq_node import RabbitNode


@pytest.fixture
def queues(rabbit4_node: RabbitNode, request: pytest.FixtureRequest) -> Iterator[QueueSet]:
    """Queues of this test's own on its RabbitMQ 4.x node (``@pytest.mark.quorum``: quorum queues)."""
    assert rabbit4_node.ctl("version").startswith("4."), "the node is not RabbitMQ 4.x"
    queues = QueueSet(broker_url=rabbit4_node.url, quorum=request.node.get_closest_marker("quorum") is not None)
    queues.declare()
    yield queues
    queues.delete()

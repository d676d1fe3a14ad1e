"""Fixtures for the integration tests: the real RabbitMQ, the sandbox over HTTP, real workers.

Each test's queues live in a vhost of its own on the machine's broker (``queues``), deleted
after it; a test that faults the broker gets a private node of its own (``rabbit_node``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import rabbitmq4
from tests.harness import (
    EVENT_TEMPLATE,
    TEST_BROKER_PASSWORD,
    TEST_BROKER_USER,
    DeadLetters,
    QueueSet,
    WorkerProcess,
    require_broker,
)
from tests.rabbitmq_node import RabbitNode, RabbitNodes, find_tools
from worker.sandbox import Sandbox

#: The API key the sandbox expects and the worker sends in these tests.
API_KEY = "test-key-0123456789"


@pytest.fixture
def queues(request: pytest.FixtureRequest) -> Iterator[QueueSet]:
    """Queues of this test's own; ``@pytest.mark.quorum`` makes every one a quorum queue."""
    require_broker()
    queues = QueueSet(quorum=request.node.get_closest_marker("quorum") is not None)
    queues.declare()
    yield queues
    queues.delete()


@pytest.fixture
def rabbit_nodes() -> Iterator[RabbitNodes]:
    """RabbitMQ nodes of this test's own (``.start_node()``, ``.cluster(3)``), to stop, kill or
    disconnect; all removed after the test, whatever happened.

    Without RabbitMQ installed, the test fails on CI and is skipped elsewhere, saying why.
    """
    require_rabbitmq()
    with RabbitNodes(user=TEST_BROKER_USER, password=TEST_BROKER_PASSWORD) as nodes:
        yield nodes


def require_rabbitmq() -> None:
    """Fail on CI, skip elsewhere, saying why, when RabbitMQ's scripts are not installed."""
    if find_tools() is None:
        message = "RabbitMQ is not installed (rabbitmq-server and rabbitmqctl are not on PATH)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[list[RabbitNode]]:
    """Three RabbitMQ nodes of the tests' own joined in one cluster, shared by the tests of a
    module (about 15 s to start). A test that stops or kills nodes brings them back
    (``node.bring_up()``) and uses queues of its own; the cluster is removed after the module.
    Connect with ``failover(nodes, first)`` (``tests.rabbitmq_node``)."""
    require_rabbitmq()
    with RabbitNodes(user=TEST_BROKER_USER, password=TEST_BROKER_PASSWORD) as nodes:
        yield nodes.cluster(3)


@pytest.fixture
def rabbit_node(rabbit_nodes: RabbitNodes) -> RabbitNode:
    """One started RabbitMQ node of this test's own (see ``rabbit_nodes``)."""
    return rabbit_nodes.start_node()


@pytest.fixture
def rabbit4_nodes() -> Iterator[rabbitmq4.Rabbit4Nodes]:
    """Like ``rabbit_nodes``, RabbitMQ 4.x nodes (``tests/rabbitmq4.py``). Without the Debian 13
    root they run from, the test fails on CI and is skipped elsewhere, naming the command that
    builds it."""
    rabbitmq4.require()
    with rabbitmq4.Rabbit4Nodes(user=TEST_BROKER_USER, password=TEST_BROKER_PASSWORD) as nodes:
        yield nodes


@pytest.fixture
def rabbit4_node(rabbit4_nodes: rabbitmq4.Rabbit4Nodes) -> RabbitNode:
    """One started RabbitMQ 4.x node of this test's own (see ``rabbit4_nodes``)."""
    return rabbit4_nodes.start_node()


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(api_key=API_KEY, seed=7) as sandbox:
        yield sandbox


@pytest.fixture
def worker_env(queues: QueueSet, sandbox: Sandbox) -> dict[str, str]:
    """Settings for a worker of this test: its own queues, the sandbox, short waits."""
    return {
        **queues.env,
        "NETCORE_API_KEY": API_KEY,
        "NETCORE_API_URL": sandbox.url,
        "ACTIVITY_BATCH_WAIT": "0.5",
        "UPLOAD_TIMEOUT": "5",
        "UPLOAD_MAX_RETRIES": "4",
        "UPLOAD_RETRY_BACKOFF": "0.2",
        "UPLOAD_RETRY_BACKOFF_MAX": "1",
        "METRICS_PORT": "0",  # tests that scrape set their own port
    }


@pytest.fixture
def dead_letters(queues: QueueSet) -> Iterator[DeadLetters]:
    collector = DeadLetters(queues.settings.dead_letter_queue, quorum=queues.quorum)
    yield collector
    collector.close()


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers (``start_worker(**extra_env)``); every one is killed at teardown."""
    started: list[WorkerProcess] = []

    def start(concurrency: int | None = None, **extra: Any) -> WorkerProcess:
        env = {**worker_env, **{k: str(v) for k, v in extra.items()}}
        worker = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log", concurrency=concurrency)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.kill()
    for worker in started:
        assert_no_secrets(worker.log(), worker.env["NETCORE_API_KEY"])



def assert_no_secrets(log: str, api_key: str) -> None:
    """Nothing the worker logged may hold a secret or an event's personal data."""
    secrets = {"the API key": api_key, "the identity": str(EVENT_TEMPLATE["identity"]),
               "the broker password": TEST_BROKER_PASSWORD}
    for what, value in secrets.items():
        assert not value or value not in log, f"{what} appears in the worker's log"

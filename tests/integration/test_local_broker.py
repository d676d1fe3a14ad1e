"""make run's own RabbitMQ node against real brokers: a broker that answers is used, even when it
refuses the login or the vhost (the settings are wrong, not the broker missing); a port held by
something that is not a broker gets the node on another port, which serves, and stops.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from kombu import Connection

from tests.harness import TEST_BROKER_PASSWORD, QueueSet, free_port, wait_for_exit
from tests.integration.conftest import require_rabbitmq
from tests.test_local_broker import started_for
from worker.ops.localbroker import start_if_needed

pytestmark = pytest.mark.timeout(180)


def test_a_broker_that_answers_is_used_even_when_it_refuses(queues: QueueSet, tmp_path: Path) -> None:
    url = queues.broker_url
    for answering in (url, url.replace(f":{TEST_BROKER_PASSWORD}@", ":wrong@"), url.rsplit("/", 1)[0] + "/no-vhost"):
        assert not started_for(answering, tmp_path / "node")
    assert not (tmp_path / "node").exists()


def test_a_port_held_by_something_else_gets_the_node_on_another_port(tmp_path: Path) -> None:
    require_rabbitmq()
    with socket.socket() as silent:  # accepts connections (the kernel does), never speaks AMQP
        silent.bind(("127.0.0.1", free_port()))
        silent.listen()
        held = silent.getsockname()[1]
        node, why = start_if_needed(f"amqp://guest:guest@localhost:{held}//", directory=tmp_path / "node",
                                    timeout=1.0)
    assert node is not None
    try:
        assert node.port != held and why.endswith("timed out"), why
        with Connection(node.url, connect_timeout=10) as connection:
            connection.ensure_connection(max_retries=1)
        vm = int(node.pid_file.read_text())
    finally:
        node.stop()
    assert not wait_for_exit([vm], 30), "the node's Erlang VM is still running"
    assert (tmp_path / "node" / "mnesia").is_dir() and os.stat(tmp_path / "node").st_mode & 0o077 == 0

"""The first node of the broker URL list down, or silent: every connection of the worker fails over.

Celery's consumer fails over across ``CELERY_BROKER_URL``'s nodes by itself; the worker's own
connections must too: the publishers that hand batches on and publish outcomes, the queue watcher
that reads the upload queues' depths for the metrics, the dead-letter command. A node that refuses
connections (down) and one that takes them and never answers (a silent node, as behind a network
fault that drops packets) are both passed over in a bounded time, and the event loop never waits
for them (the watcher and the publishers work on threads of their own).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.harness import ROOT, DeadLetters, QueueSet, WorkerProcess, event, event_id_of, publish_events
from tests.integration.test_metrics import Scrape, free_port, scrape_until
from worker.sandbox import Sandbox

#: Seconds for everything to be delivered (a silent node costs each connection its connect timeout once).
DEADLINE = 90.0


class SilentNode:
    """A TCP listener that accepts connections and never says a word (the AMQP handshake hangs)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.held.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


@pytest.fixture(params=["down", "silent"])
def first_node(request: pytest.FixtureRequest) -> Iterator[int]:
    """The port of a first node that refuses connections, or of one that never answers."""
    if request.param == "down":
        yield free_port()  # nothing listens there: connections are refused
        return
    node = SilentNode()
    try:
        yield node.port
    finally:
        node.close()


def with_first_node(broker_url: str, port: int) -> str:
    """A failover list: the node at ``port`` first (same credentials and vhost), then the real one."""
    parts = urlsplit(broker_url)
    credentials = parts.netloc.rpartition("@")[0]
    first = urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{port}"))
    return f"{first};{broker_url}"


def test_every_connection_passes_over_a_first_node_that_is_down_or_silent(
        first_node: int, start_worker: Callable[..., WorkerProcess], queues: QueueSet, sandbox: Sandbox,
        dead_letters: DeadLetters) -> None:
    url = with_first_node(queues.broker_url, first_node)
    metrics_port = free_port()
    sandbox.add_fault(status=500, count=2)  # two uploads fail once: their retries are published too
    start_worker(CELERY_BROKER_URL=url, METRICS_PORT=metrics_port)
    sent = [f"side-{n}" for n in range(600)]
    publish_events(queues.settings.queue, [[event(i, asset_id=f"side-{n % 3}") for i in sent[n::6]] for n in range(6)])

    assert sandbox.wait_until(lambda s: set(sent) <= {event_id_of(e) for e in s.accepted()}, timeout=DEADLINE)
    dead_letters.settle(0.5)
    assert dead_letters.envelopes == []  # ledger: sent = delivered + dead-lettered (none)

    # the queue watcher read the upload queue's depth through the list (a gauge only a reading sets)
    def watched(s: Scrape) -> bool:
        return bool(s.labels("upload_queue_ready"))

    assert watched(scrape_until(metrics_port, watched, timeout=DEADLINE)), "no queue depth was read"

    # a command's side connection: the dead-letter count, through the same list
    dead_letters.close()  # (a consumer on the queue would make the command wait for it to let go)
    done = subprocess.run([sys.executable, "-m", "worker.dlq", "count", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=DEADLINE, env={**os.environ, **queues.env, "CELERY_BROKER_URL": url})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] == 0

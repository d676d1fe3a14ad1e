"""A network partition between the worker and RabbitMQ, twice, in the middle of a run.

The broker runs on a host of its own (a network namespace with a private RabbitMQ node,
``tests/netns.py``); the worker, the producers and the sandbox API run on this machine. Each
partition lasts longer than the worker takes to notice it (it logs the lost connection, then a
failed attempt to reconnect) and shorter than the broker's heartbeat timeout: when the network
comes back, the broker still holds the worker's old connection, with its unacknowledged messages
and Celery's exclusive remote-control queue, and keeps it until that timeout (the test makes sure
of it: see ``NetnsHost.hold_abandoned``). The worker must reconnect, wait for the broker to let
the old connection go, and carry on: it never exits, answers remote control again (a liveness
probe's ping), sends its events again, and delivers every event sent.

Timing is driven by what the worker logs and what the broker answers, never by sleeping. The
margins: the worker notices a partition a second or two after its next write (py-amqp's 1 s
``TCP_USER_TIMEOUT``; it acks all the time and sends a heartbeat every 5 s at least), measured
1.3 to 27 s: the worker's own hand-off publisher may hold the event loop for 10 to 25 s first.
The broker lets a connection go two to three heartbeat intervals (30 to 45 s) after the last byte
it received, so the partition is healed right after the worker's first failed reconnection, once
the test has seen that the broker still holds the worker's remote-control queue;
:data:`NOTICE_DEADLINE` is the latest the broker could have held it. The worker was healthy again
38 to 50 s after a partition began; :data:`RECOVERY_DEADLINE` allows more than twice that, and
far less than the four to six minutes of Celery's default heartbeat of 120 s.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from tests.harness import DeadLetters, QueueSet, WorkerProcess, all_delivered, event, event_id_of, publish_events
from tests.netns import NetnsHost, start_node, unavailable
from tests.rabbitmq_node import RabbitNode, RabbitNodes
from worker.ops import health
from worker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(900)

#: Events published before each partition.
PER_PHASE = 3000

#: Events of a phase delivered before its partition starts: the run is then in full swing.
MID_RUN = 300

#: Seconds the worker may take to notice a partition, and then to fail to reconnect once: the
#: broker's latest heartbeat timeout (three intervals). A worker that has not noticed by then has
#: had its event loop stuck; by two intervals the broker may already have let go of the old
#: connection, which the test checks (it holds the worker's remote-control queue) before healing.
NOTICE_DEADLINE = 45.0

#: Seconds from a partition's start until the worker must be healthy again (the broker lets the
#: old connection go within three heartbeat intervals, 45 s).
RECOVERY_DEADLINE = 120.0

#: Seconds to wait for every event to be delivered once the partitions are over.
DELIVERY_DEADLINE = 240.0


@pytest.fixture
def netns_host() -> Iterator[NetnsHost]:
    """A host of the test's own, removed after it, whatever happened (tests/netns.py)."""
    reason = unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with NetnsHost() as host:
        yield host


@pytest.fixture
def rabbit_node(netns_host: NetnsHost, rabbit_nodes: RabbitNodes) -> RabbitNode:
    """The test's RabbitMQ node, on its own host."""
    return start_node(rabbit_nodes, netns_host)


@pytest.fixture
def queues(rabbit_node: RabbitNode, netns_host: NetnsHost) -> Iterator[QueueSet]:
    """The test's queues on that node (deleted after the network is back, if a failure left it cut)."""
    queues = QueueSet(broker_url=rabbit_node.url)
    queues.declare()
    yield queues
    if netns_host.partitioned:
        netns_host.heal()
    queues.delete()


def name_of(worker: WorkerProcess) -> str:
    """The worker's node name (Celery's hostname), as it said when ready."""
    found = re.search(r"(\S+@\S+) ready\.", worker.log())
    assert found, worker.log()[-3000:]
    return found.group(1)


def produce(queues: QueueSet, phase: str) -> list[str]:
    """Publish a phase's events (confirmed), spread over 7 asset_ids; their ids."""
    ids = [f"{phase}-{n}" for n in range(PER_PHASE)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(ids)])
    return ids


def wait_until_healthy(worker: WorkerProcess, queues: QueueSet, name: str, deadline: float) -> health.Health:
    """Ask as a liveness probe does (a consumer on ``activities``, a remote-control ping answered)
    until the worker is healthy, it has exited, or the deadline (monotonic) has passed; the last
    verdict."""
    app = Celery(broker=queues.broker_url, set_as_current=False)
    assert worker.process is not None
    try:
        while True:
            verdict = health.check(queues.settings, hostname=name, timeout=5, app=app)
            if verdict.ok or worker.process.poll() is not None or time.monotonic() > deadline:
                return verdict
    finally:
        app.close()


def wait_for_worker_event(url: str, name: str, timeout: float) -> bool:
    """Whether a ``worker-heartbeat`` event of the worker arrives (sent every 2 s on its events
    connection) within ``timeout`` seconds."""
    seen: list[bool] = []
    queue = Queue(exchange=Exchange("celeryev", "topic", durable=True), routing_key="worker.heartbeat",
                  exclusive=True, auto_delete=True)

    def on_message(body: dict[str, object], message: object) -> None:
        seen.append(body.get("hostname") == name)

    deadline = time.monotonic() + timeout
    with Connection(url, heartbeat=0) as connection:
        with connection.Consumer(queue, callbacks=[on_message], no_ack=True, accept=["json"]):
            while not any(seen) and time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=1.0)
                except socket.timeout:
                    pass
    return any(seen)


def holds_remote_control(node: RabbitNode, name: str) -> bool:
    """Whether the broker still has the worker's remote-control queue (exclusive to the connection
    that declared it, it goes when that connection goes)."""
    queues = json.loads(node.ctl("list_queues", "name", "--formatter", "json"))
    return f"{name}.celery.pidbox" in {queue["name"] for queue in queues}


def ride_out(phase: str, worker: WorkerProcess, host: NetnsHost, node: RabbitNode, queues: QueueSet,
             name: str) -> None:
    """Cut the network mid-run, heal it once the worker has noticed and failed to reconnect, and
    wait until the worker is healthy again (see the module docstring for the margins)."""
    mark = worker.mark
    start = time.monotonic()
    host.partition()
    assert worker.wait_for_log("Connection to broker lost", NOTICE_DEADLINE, start=mark), (
        f"the worker did not notice the partition:\n{worker.log()[mark:][-5000:]}")
    noticed = time.monotonic() - start
    assert worker.wait_for_log("consumer: Cannot connect to", start + NOTICE_DEADLINE - time.monotonic(),
                               start=mark), f"the worker did not try to reconnect:\n{worker.log()[mark:][-5000:]}"
    assert holds_remote_control(node, name), (
        f"the broker let the worker's old connection go before the worker noticed ({noticed:.1f} s): "
        f"not the partition this test is about\n{worker.log()[mark:][-5000:]}")
    held = host.heal()
    healed = time.monotonic() - start
    verdict = wait_until_healthy(worker, queues, name, start + RECOVERY_DEADLINE)
    print(f"\n{phase} partition: noticed after {noticed:.1f} s, healed after {healed:.1f} s with {held} old "
          f"connection(s) still held by the broker; {verdict} after {time.monotonic() - start:.1f} s")
    assert worker.process is not None and worker.process.poll() is None, f"the worker exited:\n{worker.log()[-5000:]}"
    assert verdict.ok, f"{verdict}\n{worker.log()[mark:][-5000:]}"


def test_the_worker_rides_out_two_partitions(start_worker: Callable[..., WorkerProcess], queues: QueueSet,
                                             sandbox: Sandbox, netns_host: NetnsHost, rabbit_node: RabbitNode) -> None:
    sandbox.add_fault(latency=0.3)  # slow uploads: each partition lands mid-run
    worker = start_worker(ACTIVITY_BATCH_SIZE=100, concurrency=4)
    name = name_of(worker)
    sent: list[str] = []
    for phase in ("first", "second"):
        delivered = sandbox.accepted_count()
        sent += produce(queues, phase)
        assert sandbox.wait_until(lambda s: s.accepted_count() >= delivered + MID_RUN, timeout=120)
        ride_out(phase, worker, netns_host, rabbit_node, queues, name)

    assert wait_for_worker_event(queues.broker_url, name, 60), "no worker-heartbeat event after the partitions"
    wanted = set(sent)
    # every event delivered (or, if one were dead-lettered, the deadline: the ledger below decides)
    sandbox.wait_until(all_delivered(wanted), timeout=DELIVERY_DEADLINE)
    dead = DeadLetters(queues.settings.dead_letter_queue, broker_url=queues.broker_url)
    dead.settle()
    dead.close()
    counts = Counter(event_id_of(e) for e in sandbox.accepted())
    assert set(counts) | set(dead.ids()) == wanted  # ids delivered + ids dead-lettered == ids sent
    print(f"{len(sent)} events sent, {len(counts)} delivered, {len(dead.ids())} dead-lettered, "
          f"{sum(counts.values()) - len(counts)} duplicates")
    assert worker.process is not None and worker.process.poll() is None
    assert "Unrecoverable error" not in worker.log()

"""Broker faults: RabbitMQ restarted, or every connection closed, in the middle of a run.

The worker must reconnect by itself, lose nothing, and not deliver everything twice. These
tests need `rabbitmqctl` on the broker's machine (CI has it); they fail in CI without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter

import pytest

from tests.harness import QueueSet, event, event_id_of, publish_events, require_broker
from worker.sandbox import Sandbox


def rabbitmqctl(*args: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def restart_broker() -> None:
    rabbitmqctl("stop_app")
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    require_broker()


def close_all_connections() -> None:
    rabbitmqctl("close_all_connections", "fault injected by a test")


@pytest.mark.parametrize("fault", [restart_broker, close_all_connections], ids=["restart", "close-connections"])
def test_broker_fault_mid_run(start_worker, queues: QueueSet, sandbox: Sandbox, fault) -> None:
    sent = [f"b{i}" for i in range(3000)]
    publish_events(queues.settings.queue, [event(i, asset_id=f"asset-{n % 7}") for n, i in enumerate(sent)])
    sandbox.add_fault(latency=0.3)  # slow uploads: the fault lands mid-run
    worker = start_worker(ACTIVITY_BATCH_SIZE=100)
    assert sandbox.wait_until(lambda s: s.accepted_count() >= 300, timeout=60)
    mark = worker.mark
    fault()
    sandbox.clear_faults()
    assert worker.wait_for_log("Connected to amqp://", timeout=120, start=mark), "the worker did not reconnect"
    wanted = set(sent)
    assert sandbox.wait_until(lambda s: wanted <= {event_id_of(e) for e in s.accepted()}, timeout=180), (
        f"{len(wanted - {event_id_of(e) for e in sandbox.accepted()})} events not delivered"
    )
    counts = Counter(event_id_of(e) for e in sandbox.accepted())
    duplicates = sum(counts.values()) - len(counts)
    assert set(counts) == wanted
    print(f"\n{fault.__name__}: {len(sent)} events delivered, {duplicates} duplicates")
    assert duplicates <= len(sent) // 4, f"{duplicates} duplicates: a storm"  # only what was in flight
    assert worker.process.poll() is None  # it reconnected by itself, no restart needed

"""No property of a message can stop a worker or make it run code, on any queue it consumes.

Producers can set any header and content type. Each kind of message here went to each queue the
worker consumes (``activities``, Celery's ``celery``, the upload queue, the quarantine, the
salvage's ``.dead.unhandled``) while good traffic flowed: a ``compression`` header its body does
not match (a real gzip file: kombu's ``gzip`` is zlib), a codec kombu does not know, a zip bomb,
pickle and YAML content types (a pickle whose loading would create a file), another
application's task, a pickled task, a message with no task headers, a header no task message
has. Each is delivered or dead-lettered with its reason; no file appears; the worker never exits
(before the fix, the first of them made every worker of a fleet exit, one after another); the
good events all arrive.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import DeadLetters, QueueSet, WorkerProcess, event, event_id_of, publish_events, publish_raw
from worker.broker.topology import Topology
from worker.events import jsonutil
from worker.sandbox import Sandbox


class CreatesAFile:
    """A pickle that creates a file when loaded: proof that nothing ever unpickles."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def task_body(args: list[Any]) -> bytes:
    return jsonutil.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])


def task_headers(name: str, **more: Any) -> dict[str, Any]:
    return {"lang": "py", "task": name, "id": f"hostile-{name}", "argsrepr": "()", "kwargsrepr": "{}", **more}


def test_every_hostile_property_on_every_queue_is_set_aside_and_the_worker_stays_up(
        start_worker: Callable[..., WorkerProcess], queues: QueueSet, sandbox: Sandbox,
        dead_letters: DeadLetters, tmp_path: Path) -> None:
    worker = start_worker()
    topology = Topology.of(queues.settings)
    marker = tmp_path / "unpickled"
    bomb = zlib.compress(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces in 64 KiB
    good = [f"g{i}" for i in range(600)]
    publish_events(topology.source, [[event(i, asset_id=f"asset-{n % 5}") for i in good[n:n + 30]]
                                     for n in range(0, 300, 30)])

    def send(queue: str, body: bytes, *, arguments: dict[str, Any] | None = None, **kwargs: Any) -> None:
        publish_raw(queue, [body], queue_arguments=arguments, **kwargs)

    source, celery = topology.source, topology.task_source
    upload = topology.upload
    upload_args = topology.upload_queue().queue_arguments
    quarantine_args = topology.quarantine_queue().queue_arguments
    expected_dead = 0

    # activities: five unreadable, one compressed as kombu compresses (delivered)
    for body, headers, content_type in [
        (gzip.compress(jsonutil.dumps(event("x1"))), {"compression": "application/x-gzip"}, "application/json"),
        (b"zzz", {"compression": "application/x-snappy"}, "application/json"),
        (bomb, {"compression": "gzip"}, "application/json"),
        (pickle.dumps(CreatesAFile(marker)), {}, "application/x-python-serialize"),
        (b"!!python/object/apply:os.system ['touch x']", {}, "application/x-yaml"),
    ]:
        send(source, body, headers=headers, content_type=content_type)
        expected_dead += 1
    send(source, zlib.compress(jsonutil.dumps(event("zipped"))), headers={"compression": "gzip"})

    # celery: our task pickled (never read), other applications' tasks (set aside whole), a plain event (delivered)
    send(celery, pickle.dumps(([CreatesAFile(marker)], {}, {})), content_type="application/x-python-serialize",
         headers=task_headers("activities.ingest"))
    send(celery, task_body(["someone@example.com"]), headers=task_headers("shop.send_email"))
    send(celery, pickle.dumps(([CreatesAFile(marker)], {}, {})), content_type="application/x-python-serialize",
         headers=task_headers("shop.send_email"))
    send(celery, gzip.compress(b"{}"), headers={**task_headers("activities.ingest"), "compression": "gzip"})
    expected_dead += 4
    send(celery, jsonutil.dumps(event("wrong-queue")))  # a producer publishing to the wrong queue: delivered

    # the upload queue: whatever Celery cannot take goes down the dead-letter route to the salvage
    for body, headers, content_type in [
        (gzip.compress(b"[]"), {**task_headers("activities.upload"), "compression": "gzip"}, "application/json"),
        (task_body([[]]), {**task_headers("activities.upload"), "task": ["a", "list"]}, "application/json"),
        (task_body([]), task_headers("shop.unknown"), "application/json"),
        (pickle.dumps(([CreatesAFile(marker)], {}, {})), task_headers("activities.upload"),
         "application/x-python-serialize"),
        (jsonutil.dumps(event("no-task-headers")), {}, "application/json"),
    ]:
        send(upload, body, arguments=upload_args, headers=headers, content_type=content_type)
        expected_dead += 1

    # the quarantine and the salvage's own queue
    send(topology.quarantine, gzip.compress(b"{}"), arguments=quarantine_args, headers={"compression": "gzip"})
    send(topology.quarantine, pickle.dumps(CreatesAFile(marker)), arguments=quarantine_args,
         content_type="application/x-python-serialize")
    send(topology.unhandled, gzip.compress(b"{}"), headers={"compression": "gzip"})
    expected_dead += 3

    # more good traffic after all of it: the worker is still consuming
    publish_events(topology.source, [[event(i, asset_id=f"asset-{n % 5}") for i in good[n:n + 30]]
                                     for n in range(300, 600, 30)])
    delivered_ids = set(good) | {"zipped", "wrong-queue"}
    assert sandbox.wait_until(lambda s: delivered_ids <= {event_id_of(e) for e in s.accepted()}, timeout=90)
    assert dead_letters.wait_for(expected_dead, timeout=90), dead_letters.by_reason()
    dead_letters.settle(2.0)
    assert len(dead_letters.envelopes) == expected_dead, dead_letters.by_reason()
    reasons = dead_letters.by_reason()
    assert reasons == {"malformed": 9, "unhandled": 8}, reasons
    assert all(e["error"] for e in dead_letters.envelopes)  # a sentence a person can act on
    assert not marker.exists(), "a pickle was loaded"
    assert worker.process is not None and worker.process.poll() is None, "the worker exited"
    assert "Unrecoverable error" not in worker.log()
    foreign = [e for e in dead_letters.envelopes if e["details"].get("problem") == "foreign_task"]
    assert {e["details"]["task"] for e in foreign} == {"shop.send_email"}
    assert all(e["details"]["message"]["queue"] == celery for e in foreign)  # where it came from: replayable

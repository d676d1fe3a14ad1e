"""Real parts for integration tests: the broker, queues of a test's own (in a vhost of their
own), worker processes, and the processes a command leaves behind.

Nothing here sleeps: every wait is a blocking read (a process's output, the broker's
``drain_events``, the sandbox's condition variable, a process's exit) with a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kombu import Connection, Consumer, Queue

from config.settings import MAX_BACKOFF, Settings
from tests.vhosts import SessionVhosts
from worker.broker.publisher import Outgoing, Publisher
from worker.broker.topology import Topology, dead_letter_arguments, delay_ladder
from worker.events import jsonutil
from worker.sandbox import Sandbox

#: The machine's broker (the worker's own default, or the runner's ``CELERY_BROKER_URL``). Tests do
#: not use its default vhost: each :class:`QueueSet` lives in a vhost of its own on it.
BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//")

#: The tests' broker user (a name of its own per session, see ``tests/vhosts.py``) and its
#: password, which cannot be mistaken for anything else: a grep of the worker's logs for it
#: proves the broker password never leaks.
TEST_BROKER_USER, TEST_BROKER_PASSWORD = "activity-tests", "brk-pw-7f3a9c1e5d"

T = TypeVar("T")

#: The project's root, where the worker process runs.
ROOT = Path(__file__).resolve().parent.parent

#: A valid event's fields, besides asset_id and the id that makes it traceable.
EVENT_TEMPLATE: dict[str, Any] = {
    "activity_name": "Purchase",
    "timestamp": "2026-11-26T12:06:28Z",
    "identity": "customer-42@example.com",
    "activity_source": "web",
}


def require_broker() -> None:
    """Fail (in CI) or skip (locally, saying why) when RabbitMQ is unreachable."""
    try:
        with Connection(BROKER_URL, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # any reason the broker is not there
        message = f"RabbitMQ is not reachable at {BROKER_URL.split('@')[-1]}: {exc!r}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message + " (start it with `rabbitmq-server -detached`)")


def event(event_id: str, asset_id: str = "asset-1", **overrides: Any) -> dict[str, Any]:
    """A valid event carrying ``event_id`` in its params (the ledger's key)."""
    body = dict(EVENT_TEMPLATE, asset_id=asset_id, activity_params={"event_id": event_id, "total": 2})
    body.update(overrides)
    return body


def event_id_of(event: Any) -> str | None:
    """The ledger id of an event (or None for events that carry none)."""
    if isinstance(event, dict) and isinstance(event.get("activity_params"), dict):
        value = event["activity_params"].get("event_id")
        return value if isinstance(value, str) else None
    return None


#: The session's vhosts on the machine's broker, one per QueueSet (see ``tests/vhosts.py``).
VHOSTS = SessionVhosts(BROKER_URL, user_prefix=TEST_BROKER_USER, password=TEST_BROKER_PASSWORD)


#: Every live QueueSet by its prefix: how :func:`publish_raw` and :class:`DeadLetters` find the
#: broker (and vhost) of a queue.
_QUEUE_SETS: dict[str, QueueSet] = {}


def undelivered(sandbox: Sandbox, ids: Iterable[str]) -> set[str]:
    """The ids in ``ids`` the sandbox has not accepted (yet)."""
    return set(ids) - {event_id_of(e) for e in sandbox.accepted()}


def all_delivered(ids: Iterable[str]) -> Callable[[Sandbox], bool]:
    """A ``Sandbox.wait_until`` condition: every id in ``ids`` accepted."""
    wanted = set(ids)
    return lambda sandbox: not undelivered(sandbox, wanted)


@dataclass
class QueueSet:
    """Queue names of one test, in a vhost of its own, so tests never see each other's messages.

    Without ``broker_url``, the set takes a fresh vhost on the machine's broker (:data:`VHOSTS`),
    deleted by :meth:`delete`; with one (a private node's), it uses that broker as it is.
    """

    prefix: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}")
    broker_url: str = ""
    #: ACTIVITY_QUEUE_TYPE=quorum for the worker, the producers and the test's own declarations.
    quorum: bool = False
    _own_vhost: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.broker_url:
            self.broker_url, self._own_vhost = VHOSTS.take(), True
        _QUEUE_SETS[self.prefix] = self

    @property
    def env(self) -> dict[str, str]:
        """The worker's settings for these queues, on this broker and vhost."""
        return {
            "CELERY_BROKER_URL": self.broker_url,
            "ACTIVITY_QUEUE": f"{self.prefix}.activities",
            "ACTIVITY_DEAD_LETTER_QUEUE": f"{self.prefix}.dead",
            "ACTIVITY_TASK_QUEUE": f"{self.prefix}.celery",
            "ACTIVITY_UPLOAD_QUEUE": f"{self.prefix}.upload",
            "ACTIVITY_QUEUE_TYPE": "quorum" if self.quorum else "classic",
        }

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env, require_api=False)

    def declare(self) -> None:
        """The dead-letter queue, so a test can collect dead letters before the worker starts."""
        with Connection(self.broker_url) as connection:
            Topology.of(self.settings).dead_letter_queue()(connection.default_channel).declare()

    def names(self) -> list[str]:
        """Every queue a worker with these settings may declare, whatever its backoff settings
        (every ladder of delay queues is the start of the longest one)."""
        topology = Topology.of(self.settings)
        queues = [self.env[name] for name in ("ACTIVITY_QUEUE", "ACTIVITY_DEAD_LETTER_QUEUE", "ACTIVITY_TASK_QUEUE",
                                              "ACTIVITY_UPLOAD_QUEUE")]
        return [*queues, topology.unhandled, topology.quarantine,
                *(topology.delay_name(r) for r in delay_ladder(MAX_BACKOFF))]

    def delete(self) -> None:
        """Delete the queues, and the vhost if it is the set's own."""
        _QUEUE_SETS.pop(self.prefix, None)
        if self._own_vhost and VHOSTS.give_back(self.broker_url):
            return  # the vhost goes, and its queues with it
        with Connection(self.broker_url) as connection:
            channel = connection.default_channel
            for name in self.names():
                try:
                    channel.queue_delete(name)
                except Exception:
                    channel = connection.channel()

    def depth(self, name: str) -> int:
        with Connection(self.broker_url) as connection:
            _, count, _ = connection.default_channel.queue_declare(name, passive=True)
            return count


def broker_url_of(queue: str) -> str:
    """The broker URL (with its vhost) of the QueueSet that named ``queue``."""
    for prefix, queues in _QUEUE_SETS.items():
        if queue.startswith(f"{prefix}."):
            return queues.broker_url
    raise LookupError(f"no live QueueSet named the queue {queue!r}: pass broker_url")


def publish_raw(queue: str, bodies: Iterable[bytes | str], *, content_type: str | None = "application/json",
                headers: Mapping[str, Any] | None = None, encoding: str | None = None,
                queue_arguments: Mapping[str, Any] | None = None, broker_url: str | None = None) -> int:
    """Publish bodies as a producer would: persistent, confirmed (in groups), to the broker of the
    queue's QueueSet unless ``broker_url`` says otherwise."""
    publisher = Publisher(broker_url or broker_url_of(queue),
                          declare=[Queue(queue, durable=True, queue_arguments=queue_arguments)])
    try:
        messages = [
            Outgoing(queue, b if isinstance(b, bytes) else b.encode(), dict(headers or {}), content_type or "",
                     content_encoding=encoding)
            for b in bodies
        ]
        for start in range(0, len(messages), 1000):
            publisher.publish(messages[start:start + 1000])
        return len(messages)
    finally:
        publisher.close()


def publish_events(queue: str, payloads: Iterable[Any], **kwargs: Any) -> int:
    """Publish each payload (an event or a list of events) as one JSON message."""
    return publish_raw(queue, (jsonutil.dumps(p) for p in payloads), **kwargs)


class DeadLetters:
    """Collects the dead-letter queue's envelopes as they arrive (event-driven, acked)."""

    def __init__(self, queue: str, *, broker_url: str | None = None, quorum: bool = False) -> None:
        self.queue = queue
        self.envelopes: list[dict[str, Any]] = []
        self._closed = False
        self._connection = Connection(broker_url or broker_url_of(queue))
        arguments = dead_letter_arguments(quorum)
        self._consumer = Consumer(
            self._connection.channel(), [Queue(queue, durable=True, queue_arguments=arguments)],
            callbacks=[self._on_message],
            accept=["json"], prefetch_count=2000,
        )
        self._consumer.consume()

    def _on_message(self, body: Any, message: Any) -> None:
        self.envelopes.append(jsonutil.loads(message.body) if isinstance(message.body, (bytes, str)) else body)
        message.ack()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until ``count`` envelopes arrived or the deadline passes."""
        deadline = time.monotonic() + timeout
        while len(self.envelopes) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                self._connection.drain_events(timeout=min(remaining, 1.0))
            except socket.timeout:
                pass
        return True

    def settle(self, quiet: float = 1.0) -> None:
        """Read until nothing arrives for ``quiet`` seconds (catches extra dead letters)."""
        while True:
            try:
                self._connection.drain_events(timeout=quiet)
            except socket.timeout:
                return

    def ids(self) -> list[str | None]:
        return [event_id_of(e.get("event")) for e in self.envelopes]

    def by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.envelopes:
            counts[e["reason"]] = counts.get(e["reason"], 0) + 1
        return counts

    def close(self) -> None:
        """Stop collecting (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.cancel()
        finally:
            self._connection.release()


class Output:
    """A child process's output, gathered by a reader thread (copied to ``log_path`` if given).

    Every new line wakes up whoever waits in :meth:`wait_for`: waiting for a process to say
    something is event-driven, with a deadline.
    """

    def __init__(self, log_path: Path | None = None) -> None:
        self.log_path = log_path
        self._data = bytearray()
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None

    def follow(self, process: subprocess.Popen[bytes]) -> None:
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        log = open(self.log_path, "ab") if self.log_path else None
        try:
            for line in process.stdout:
                if log:
                    log.write(line)
                    log.flush()
                with self._changed:
                    self._data += line
                    self._changed.notify_all()
        finally:
            if log:
                log.close()
            with self._changed:
                self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return self._data.decode(errors="replace")

    @property
    def mark(self) -> int:
        """A position in the output, to wait for what comes after it."""
        with self._changed:
            return len(self._data)

    def wait_for(self, found: Callable[[bytearray], T | None], timeout: float) -> T | None:
        """Block until ``found(output)`` is truthy (returned), the process ends, or the deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = found(self._data)
                if result or (self._reader is not None and not self._reader.is_alive()):
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def join(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)


class WorkerProcess:
    """``celery -A worker.app worker`` in a process group of its own, its output followed."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, concurrency: int | None = None) -> None:
        self.log_path = log_path
        self.env = {**os.environ, "CELERY_BROKER_URL": BROKER_URL, "PYTHONUNBUFFERED": "1",
                    "METRICS_PORT": "0", **env}  # tests that scrape /metrics choose their own port
        if concurrency is not None:  # uploads in flight at most (the pool's threads)
            self.env["UPLOAD_CONCURRENCY"] = str(concurrency)
        self.process: subprocess.Popen[bytes] | None = None
        self.output = Output(log_path)

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker; return once it says it is ready (or fail with its log)."""
        mark = self.output.mark
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--loglevel=INFO",
             "--without-gossip", "--without-mingle",
             f"--hostname=test-{uuid.uuid4().hex[:8]}@%h"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.output.follow(self.process)
        if not self.wait_for_log(" ready.", timeout, start=mark):
            self.kill()
            raise AssertionError(f"the worker did not start; its log:\n{self.log()[-5000:]}")
        return self

    def log(self) -> str:
        return self.output.text()

    @property
    def mark(self) -> int:
        """A position in the output, to wait for lines written after it."""
        return self.output.mark

    def wait_for_log(self, text: str, timeout: float, *, start: int = 0) -> bool:
        """Block until ``text`` appears in the output after ``start``, or the process ends."""
        needle = text.encode()
        return bool(self.output.wait_for(lambda data: needle in data[start:], timeout))

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM to the main process (a deploy): warm shutdown; return the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group: main process and pool, no goodbye."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap(30)

    def pool_pids(self) -> list[int]:
        assert self.process is not None
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def _reap(self, timeout: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        try:  # orphaned pool processes, if any
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.output.join(10)
        return code


@contextmanager
def running_worker(env: Mapping[str, str], log_path: Path, **kwargs: Any) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(env, log_path, **kwargs).start()
    try:
        yield worker
    finally:
        if worker.process and worker.process.poll() is None:
            worker.kill()


def processes_marked(variable: str, value: str) -> dict[int, str]:
    """Every live process whose environment has ``variable=value``, with its command line (Linux).

    A variable set for a command is inherited by all it starts, including what outlives it: the
    way to find every process a command left behind, however it was started.
    """
    wanted = f"{variable}={value}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie has exited; only its parent has not looked yet
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def assert_recovered_from_broker_fault(worker: WorkerProcess, mark: int, sandbox: Sandbox, queues: QueueSet,
                                       sent: list[str]) -> int:
    """After a broker fault (the worker's log at ``mark`` when it began): the worker reconnects by
    itself and every event in ``sent`` is delivered, none dead-lettered, duplicates only around
    the fault (a tenth at most). Returns the number of duplicates."""
    assert worker.wait_for_log("Connected to amqp://", timeout=120, start=mark), "the worker did not reconnect"
    assert sandbox.wait_until(all_delivered(sent), timeout=180), (
        f"{len(undelivered(sandbox, sent))} events not delivered")
    counts = Counter(event_id_of(e) for e in sandbox.accepted())
    duplicates = sum(counts.values()) - len(counts)
    assert set(counts) == set(sent)
    assert queues.depth(queues.settings.dead_letter_queue) == 0  # delivered + dead-lettered (none) == sent
    # the uploads in flight finish and their redeliveries are recognised: not sent twice
    assert duplicates <= len(sent) // 10, f"{duplicates} duplicates: a storm"
    assert worker.process is not None and worker.process.poll() is None  # it reconnected by itself
    return duplicates


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL every process in ``pids``; one already gone is fine."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_exit(pids: Iterable[int], timeout: float) -> set[int]:
    """Block until every process in ``pids`` has exited, or the deadline; return those still running.

    Works for processes that are not our children (``pidfd_open``, Linux 5.3+): each becomes
    readable when its process exits.
    """
    descriptors: dict[int, int] = {}
    for pid in pids:
        try:
            descriptors[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        while descriptors:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            exited, _, _ = select.select(list(descriptors), [], [], remaining)
            for fd in exited:
                os.close(fd)
                del descriptors[fd]
        return set(descriptors.values())
    finally:
        for fd in descriptors:
            os.close(fd)


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])

"""Real parts for integration tests: the broker, queues of a test's own, worker processes.

Nothing here sleeps: every wait is a blocking read (a process's output, the broker's
``drain_events``, the sandbox's condition variable) with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kombu import Connection, Consumer, Queue

from config.settings import MAX_BACKOFF, Settings
from worker import jsonutil
from worker.broker.topology import Topology, delay_ladder
from worker.publisher import Outgoing, Publisher

#: The broker every integration test uses (the worker's own default).
DEFAULT_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//")

#: A broker user of the tests' own, with a password that cannot be mistaken for anything
#: else, so that a grep of the worker's logs for it proves the password never leaks.
TEST_BROKER_USER, TEST_BROKER_PASSWORD = "activity-tests", "brk-pw-7f3a9c1e5d"


def _test_broker_url() -> str:
    """The tests' own broker user, created with rabbitmqctl when it can be; else the default."""
    try:
        subprocess.run(["rabbitmqctl", "add_user", TEST_BROKER_USER, TEST_BROKER_PASSWORD],
                       capture_output=True, timeout=60)
        done = subprocess.run(["rabbitmqctl", "set_permissions", "-p", "/", TEST_BROKER_USER, ".*", ".*", ".*"],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_BROKER_URL
    if done.returncode != 0:
        return DEFAULT_BROKER_URL
    return f"amqp://{TEST_BROKER_USER}:{TEST_BROKER_PASSWORD}@localhost:5672//"


BROKER_URL = _test_broker_url() if "CELERY_BROKER_URL" not in os.environ else DEFAULT_BROKER_URL

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


@dataclass
class QueueSet:
    """Queue names of one test, so tests never see each other's messages."""

    prefix: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}")
    #: ACTIVITY_QUEUE_TYPE=quorum for the worker, the producers and the test's own declarations.
    quorum: bool = False

    @property
    def env(self) -> dict[str, str]:
        return {
            "ACTIVITY_QUEUE": f"{self.prefix}.activities",
            "ACTIVITY_DEAD_LETTER_QUEUE": f"{self.prefix}.dead",
            "ACTIVITY_TASK_QUEUE": f"{self.prefix}.celery",
            "ACTIVITY_UPLOAD_QUEUE": f"{self.prefix}.upload",
            "ACTIVITY_QUEUE_TYPE": "quorum" if self.quorum else "classic",
        }

    @property
    def settings(self) -> Settings:
        return Settings.from_env({"CELERY_BROKER_URL": BROKER_URL, **self.env}, require_api=False)

    def declare(self) -> None:
        """The dead-letter queue, so a test can collect dead letters before the worker starts."""
        with Connection(BROKER_URL) as connection:
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
        with Connection(BROKER_URL) as connection:
            channel = connection.default_channel
            for name in self.names():
                try:
                    channel.queue_delete(name)
                except Exception:
                    channel = connection.channel()

    def depth(self, name: str) -> int:
        with Connection(BROKER_URL) as connection:
            _, count, _ = connection.default_channel.queue_declare(name, passive=True)
            return count


def publish_raw(queue: str, bodies: Iterable[bytes | str], *, content_type: str | None = "application/json",
                headers: Mapping[str, Any] | None = None, encoding: str | None = None,
                queue_arguments: Mapping[str, Any] | None = None) -> int:
    """Publish bodies as a producer would: persistent, confirmed (in groups)."""
    publisher = Publisher(BROKER_URL, declare=[Queue(queue, durable=True, queue_arguments=queue_arguments)])
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

    def __init__(self, queue: str, *, quorum: bool = False) -> None:
        self.queue = queue
        self.envelopes: list[dict[str, Any]] = []
        self._connection = Connection(BROKER_URL)
        arguments = {"x-queue-type": "quorum"} if quorum else None
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

"""Flower for the integration tests: started the way the Procfile starts it, and polled.

Shared by ``test_flower.py`` (Flower's HTTP API) and ``test_flower_browser.py`` (its pages in a
real browser).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

from tests.harness import ROOT, Output, QueueSet, WorkerProcess

#: Credentials the test's Flower is started with.
USER = "ops"
PASSWORD = f"pw-{uuid.uuid4().hex}"

#: How long a test waits for the worker, Flower or the sandbox.
DEADLINE = 60.0

#: Between two questions to Flower's HTTP API (see :func:`poll`).
POLL_INTERVAL = 0.2

T = TypeVar("T")


class FlowerProcess:
    """``python -m worker.ops.flower`` (the Procfile's command) on a free port.

    A reader thread collects its output and wakes up :meth:`wait_for_log`: Flower says where it
    listens ("Visit me at ..."), which is how the test learns the port it was given.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.ops.flower", "--port=0", "--address=127.0.0.1"],
            cwd=ROOT, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.output = Output()
        self.output.follow(self.process)

    def log(self) -> str:
        return self.output.text()

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """Block until ``pattern`` matches the output, the process ends, or the deadline."""
        return self.output.wait_for(lambda data: re.search(pattern, data.decode(errors="replace")), timeout)

    def stop(self) -> None:
        """SIGTERM (Flower exits cleanly on it), then SIGKILL to the group if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        self.output.join(10)


def flower_env(queues: QueueSet, **extra: str) -> dict[str, str]:
    """This test's environment (its vhost and queues), without any FLOWER_* setting of the machine."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    return {**base, **queues.env, **extra}


@contextmanager
def running_flower(queues: QueueSet, **extra: str) -> Iterator[tuple[FlowerProcess, str]]:
    """A running Flower with the test's credentials (and ``extra`` environment), and its base URL."""
    process = FlowerProcess(flower_env(queues, FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}", **extra))
    try:
        found = process.wait_for_log(r"Visit me at (http://127\.0\.0\.1:\d+)", DEADLINE)
        assert found, f"Flower did not start; its output:\n{process.log()[-5000:]}"
        yield process, found.group(1)
    finally:
        process.stop()


def poll(fetch: Callable[[], T | None], timeout: float) -> T | None:
    """Ask ``fetch`` until it returns something, or the deadline passes.

    Flower 2 offers its HTTP clients nothing to wait on (no long-poll, no websocket), so this
    asks again every :data:`POLL_INTERVAL`; the pause is ``threading.Event().wait``, bounded by
    the deadline, since there is no event to be woken by.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        result = fetch()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            return None
        pause.wait(POLL_INTERVAL)


def worker_name(worker: WorkerProcess) -> str:
    """The worker's node name, from the line it logs when ready (``name@host ready.``)."""
    found = re.search(r"(\S+@\S+) ready\.", worker.log())
    assert found, worker.log()[-3000:]
    return found.group(1)

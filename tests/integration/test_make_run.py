"""``make run`` stops everything it started on Ctrl-C, whatever its output is piped into.

The classic trap: ``make run 2>&1 | tee run.log``, then Ctrl-C. The terminal sends SIGINT to
the whole foreground process group, so ``tee`` dies at once, and whatever runs the Procfile
finds its output broken just as it should be stopping the worker, Flower and the sandbox.

The test runs exactly that command line in a process group of its own (as a terminal's
foreground job), sends that group SIGINT (what Ctrl-C does), and waits, event-driven with a
deadline, until every process the command started has exited. It finds those processes by a
variable of the test's own in their environment, so none escapes by changing its process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, Output, QueueSet, free_port, processes_marked, wait_for_exit

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes through /proc"),
]

#: The environment variable that marks every process of one ``make run`` of this test.
MARK = "MAKE_RUN_TEST_MARK"

#: What each process prints once it is up (the worker, Flower, the sandbox).
READY = (b" ready.", b"Visit me at http://", b"Netcore SANDBOX (NOT the real Netcore API) listening")

#: Seconds for everything to start, and to stop after Ctrl-C.
START_DEADLINE, STOP_DEADLINE = 120.0, 60.0


def make_run_env(queues: QueueSet, mark: str) -> dict[str, str]:
    """``make run``'s environment: sandbox mode, the test's vhost and queues, free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "NETCORE_", "SANDBOX_"))}
    return {
        **env, **queues.env, MARK: mark,
        "FLOWER_PORT": str(free_port()), "SANDBOX_PORT": str(free_port()), "METRICS_PORT": str(free_port()),
        "WORKER_CONCURRENCY": "1",
    }


class PipedRun:
    """``make run 2>&1 | tee run.log`` as a foreground job of its own (a new process group)."""

    def __init__(self, queues: QueueSet, log: Path) -> None:
        self.mark = uuid.uuid4().hex
        # -o: never reinstall the virtualenv here (make run depends on make install)
        command = f"make -o .venv/.installed run 2>&1 | tee {log}"
        self.shell = subprocess.Popen(["/bin/sh", "-c", command], cwd=ROOT, env=make_run_env(queues, self.mark),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.output = Output()
        self.output.follow(self.shell)

    def wait_until_up(self) -> bool:
        return bool(self.output.wait_for(lambda data: all(text in data for text in READY), START_DEADLINE))

    def processes(self) -> dict[int, str]:
        return processes_marked(MARK, self.mark)

    def ctrl_c(self) -> None:
        """What Ctrl-C on the terminal does: SIGINT to every process of the foreground group."""
        os.killpg(self.shell.pid, signal.SIGINT)

    def kill_leftovers(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.shell.wait(30)
        self.output.join(10)


@pytest.fixture
def piped_run(queues: QueueSet, tmp_path: Path) -> Iterator[PipedRun]:
    run = PipedRun(queues, tmp_path / "run.log")
    try:
        yield run
    finally:
        run.kill_leftovers()


def test_ctrl_c_stops_everything_even_with_the_output_piped_into_tee(piped_run: PipedRun) -> None:
    assert piped_run.wait_until_up(), f"make run did not start; its output:\n{piped_run.output.text()[-5000:]}"
    started = piped_run.processes()
    commands = " ".join(started.values())
    assert "worker.sandbox" in commands and "flower" in commands and "celery" in commands, started

    piped_run.ctrl_c()
    left = wait_for_exit(started, STOP_DEADLINE)

    assert not left, (
        f"still running {STOP_DEADLINE:.0f} s after Ctrl-C: "
        + "; ".join(f"{pid}: {started[pid][:100]}" for pid in sorted(left))
        + f"\nthe output:\n{piped_run.output.text()[-3000:]}"
    )

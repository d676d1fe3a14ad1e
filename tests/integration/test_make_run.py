"""``make run`` stops everything it started on Ctrl-C, whatever its output is piped into; where no
broker answers, it runs a RabbitMQ node of its own for as long as the rest.

The classic trap: ``make run 2>&1 | tee run.log``, then Ctrl-C. The terminal sends SIGINT to
the whole foreground process group, so ``tee`` dies at once, and whatever runs the Procfile
finds its output broken just as it should be stopping the worker, Flower and the sandbox.

The test runs exactly that command line in a process group of its own (as a terminal's
foreground job), sends that group SIGINT (what Ctrl-C does), and waits, event-driven with a
deadline, until every process the command started has exited. It finds those processes by a
variable of the test's own in their environment, so none escapes by changing its process group.

With the broker URL on a port nobody listens on, ``make run`` starts a RabbitMQ node of its own
(data in the test's directory): an event published to it is delivered through the sandbox, and
after Ctrl-C the node has gone with the rest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.harness import ROOT, Output, QueueSet, event, free_port, processes_marked, publish_events, wait_for_exit
from tests.integration.conftest import require_rabbitmq

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

#: What make run says when it starts a RabbitMQ node of its own.
OWN_NODE = "Started a RabbitMQ node of this checkout's own"


def make_run_env(settings: Mapping[str, str]) -> dict[str, str]:
    """``make run``'s environment: sandbox mode, ``settings`` (the broker, queues), free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "NETCORE_", "SANDBOX_"))}
    return {
        **env, **settings,
        "FLOWER_PORT": str(free_port()), "SANDBOX_PORT": str(free_port()), "METRICS_PORT": str(free_port()),
        "WORKER_CONCURRENCY": "1",
    }


class PipedRun:
    """``make run 2>&1 | tee run.log`` as a foreground job of its own (a new process group)."""

    def __init__(self, settings: Mapping[str, str], log: Path, *make_args: str) -> None:
        self.mark = uuid.uuid4().hex
        self.env = {**make_run_env(settings), MARK: self.mark}
        # -o: never reinstall the virtualenv here (make run depends on make install)
        command = f"make -o .venv/.installed run {' '.join(make_args)} 2>&1 | tee {log}"
        self.shell = subprocess.Popen(["/bin/sh", "-c", command], cwd=ROOT, env=self.env,
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
    run = PipedRun(queues.env, tmp_path / "run.log")
    try:
        yield run
    finally:
        run.kill_leftovers()


def assert_all_stop_on_ctrl_c(run: PipedRun, started: Mapping[int, str]) -> None:
    run.ctrl_c()
    left = wait_for_exit(started, STOP_DEADLINE)
    assert not left, (
        f"still running {STOP_DEADLINE:.0f} s after Ctrl-C: "
        + "; ".join(f"{pid}: {started[pid][:100]}" for pid in sorted(left))
        + f"\nthe output:\n{run.output.text()[-3000:]}"
    )


def test_ctrl_c_stops_everything_even_with_the_output_piped_into_tee(piped_run: PipedRun) -> None:
    assert piped_run.wait_until_up(), f"make run did not start; its output:\n{piped_run.output.text()[-5000:]}"
    started = piped_run.processes()
    commands = " ".join(started.values())
    assert "netcore-activity sandbox" in commands and "flower" in commands and "celery" in commands, started
    assert OWN_NODE not in piped_run.output.text()  # the machine's broker answered

    assert_all_stop_on_ctrl_c(piped_run, started)


def test_without_a_broker_make_run_brings_its_own_and_takes_it_away(tmp_path: Path) -> None:
    require_rabbitmq()
    url = f"amqp://guest:guest@localhost:{free_port()}//"  # nobody listens there
    run = PipedRun({"CELERY_BROKER_URL": url}, tmp_path / "run.log", f"RABBITMQ_DIR={tmp_path / 'rabbitmq'}")
    try:
        assert run.wait_until_up(), f"make run did not start; its output:\n{run.output.text()[-5000:]}"
        assert OWN_NODE in run.output.text()
        started = run.processes()
        assert any("beam.smp" in command and "rabbitmq" in command for command in started.values()), started

        event_id = uuid.uuid4().hex
        publish_events("activities", [event(event_id)], broker_url=url)
        delivered = run.output.wait_for(lambda data: re.search(rb"batch asset_id=\S+ events=1 delivered=1 ", data),
                                        START_DEADLINE)
        assert delivered, run.output.text()[-3000:]
        sandbox = f"http://127.0.0.1:{run.env['SANDBOX_PORT']}/_sandbox/accepted"
        with urllib.request.urlopen(sandbox, timeout=10) as answer:
            accepted = json.load(answer)["events"]
        assert [e["activity_params"]["event_id"] for e in accepted] == [event_id]

        assert_all_stop_on_ctrl_c(run, started)  # the node's Erlang VM and its helpers too
    finally:
        run.kill_leftovers()

"""``python -m worker.ops.supervisor``, with real processes: Ctrl-C stops them all, whatever happens
to its output; a second Ctrl-C (or the grace period) kills what ignores the first; one process
exiting stops the others.

Each test writes a Procfile of small Python programs, runs the supervisor on it as
``make run`` does (in a foreground job of its own, its output piped into ``tee``), and sends
the job SIGINT as a terminal's Ctrl-C does. Waits block on the job's output or on the
processes' exit (``pidfd``), with deadlines.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.harness import ROOT, Output, wait_for_exit
from worker.ops.supervisor import ProcessSpec, read_procfile, select_processes

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="waits on processes with pidfd_open"),
]

#: Seconds to wait for the job to say something, or for processes to exit.
DEADLINE = 20.0

#: Small programs the Procfiles run, by name.
PROGRAMS = {
    # runs until signalled; on SIGTERM writes a farewell (into a pipe that may be broken by then)
    "polite": """
import signal, sys
def bye(*args):
    print("bye " * 2000, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("up", flush=True)
signal.pause()
""",
    # ignores SIGTERM and SIGINT: only SIGKILL stops it
    "stubborn": """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("up", flush=True)
signal.pause()
""",
    # leaves a stubborn child behind when it exits (on SIGTERM): only a kill of its group stops it
    "parent": """
import pathlib, signal, subprocess, sys
subprocess.Popen([sys.executable, str(pathlib.Path(__file__).with_name("stubborn.py"))], stdout=subprocess.DEVNULL)
print("up", flush=True)
signal.pause()
""",
    # like polite, then tells "crashing" (through a FIFO) that its SIGTERM handler is in place
    "ready": """
import pathlib, signal, sys
def bye(*args):
    print("bye", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("up", flush=True)
with open(pathlib.Path(__file__).with_name("ready.fifo"), "w") as fifo:
    fifo.write("ready")
signal.pause()
""",
    # exits with status 3 once "ready" is ready (opening the FIFO blocks until it is)
    "crashing": """
import pathlib
pathlib.Path(__file__).with_name("ready.fifo").read_text()
raise SystemExit(3)
""",
}


class Job:
    """``python -m worker.ops.supervisor ... | tee LOG`` as a foreground job (a process group).

    The supervisor's exit status follows its output into the pipe (``exit status N``).
    """

    def __init__(self, tmp_path: Path, procfile: Mapping[str, str], *args: str) -> None:
        """``procfile`` maps process names to names of :data:`PROGRAMS`."""
        for program, code in PROGRAMS.items():
            (tmp_path / f"{program}.py").write_text(code)
        if not (tmp_path / "ready.fifo").exists():
            os.mkfifo(tmp_path / "ready.fifo")
        (tmp_path / "Procfile").write_text(
            "".join(f"{name}: {sys.executable} {tmp_path / program}.py\n" for name, program in procfile.items()))
        supervisor = f"{sys.executable} -m worker.ops.supervisor --procfile {tmp_path / 'Procfile'} {' '.join(args)}"
        self.shell = subprocess.Popen(
            ["/bin/sh", "-c", f"{{ {supervisor} 2>&1; echo \"exit status $?\"; }} | tee {tmp_path / 'log'}"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.output = Output()
        self.output.follow(self.shell)
        self.pids: dict[str, int] = {}

    def wait_for(self, pattern: str) -> re.Match[str] | None:
        return self.output.wait_for(lambda data: re.search(pattern, data.decode(errors="replace")), DEADLINE)

    def wait_until_started(self, count: int) -> None:
        started = self.wait_for(r"started (.*); Ctrl-C stops them all")
        assert started, self.output.text()
        self.pids = {name: int(pid) for name, pid in re.findall(r"(\w+) \(pid (\d+)\)", started.group(1))}
        assert len(self.pids) == count, started.group(0)
        assert self.output.wait_for(lambda data: data.count(b"| up") >= count, DEADLINE), self.output.text()

    def supervisor_pid(self) -> int:
        """The supervisor's process id (in the job's group, beside the shells and tee)."""
        out = subprocess.run(["pgrep", "-f", "-g", str(self.shell.pid), r"^\S*python\S* -m worker\.ops\.supervisor"],
                             capture_output=True, text=True).stdout.split()
        assert len(out) == 1, out
        return int(out[0])

    def ctrl_c(self) -> None:
        os.killpg(self.shell.pid, signal.SIGINT)

    def cleanup(self) -> None:
        for pid in self.pids.values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.shell.wait(DEADLINE)
        self.output.join(DEADLINE)


def group_members(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[list[Job]]:
    started: list[Job] = []
    yield started
    for job in started:
        job.cleanup()


def start(jobs: list[Job], tmp_path: Path, procfile: Mapping[str, str], *args: str) -> Job:
    job = Job(tmp_path, procfile, *args)
    jobs.append(job)
    return job


def test_ctrl_c_stops_everything_though_tee_died_with_it(jobs: list[Job], tmp_path: Path) -> None:
    job = start(jobs, tmp_path, {"one": "polite", "two": "polite", "three": "parent"})
    job.wait_until_started(3)
    supervisor = job.supervisor_pid()
    grandchild = [pid for pid in group_members(job.pids["three"]) if pid != job.pids["three"]]
    assert len(grandchild) == 1

    job.ctrl_c()  # tee dies at once; the farewells and the supervisor's lines hit a broken pipe

    left = wait_for_exit([supervisor, *job.pids.values(), *grandchild], DEADLINE)
    assert not left, f"still running: {left}; the output:\n{job.output.text()[-2000:]}"


def test_a_second_ctrl_c_kills_what_ignores_the_first(jobs: list[Job], tmp_path: Path) -> None:
    job = start(jobs, tmp_path, {"polite": "polite", "stubborn": "stubborn"}, "--grace", "600")
    job.wait_until_started(2)
    supervisor = job.supervisor_pid()
    tee_output_until_now = job.output.mark

    os.kill(supervisor, signal.SIGINT)  # the supervisor alone: tee keeps showing what it says
    assert job.wait_for(r"SIGINT received: stopping polite, stubborn"), job.output.text()[tee_output_until_now:]
    assert job.wait_for(r"polite stopped \(status 0\)")
    assert wait_for_exit([job.pids["stubborn"]], 1.0) == {job.pids["stubborn"]}  # it ignored SIGTERM

    os.kill(supervisor, signal.SIGINT)
    assert job.wait_for(r"SIGINT received again: killing stubborn")
    assert not wait_for_exit([supervisor, job.pids["stubborn"]], DEADLINE)
    assert job.wait_for(r"exit status 0")  # asked to stop: a clean exit


def test_the_grace_period_ends_in_sigkill(jobs: list[Job], tmp_path: Path) -> None:
    job = start(jobs, tmp_path, {"stubborn": "stubborn"}, "--grace", "0.5")
    job.wait_until_started(1)
    supervisor = job.supervisor_pid()

    os.kill(supervisor, signal.SIGTERM)

    assert job.wait_for(r"still running 0.5 s after being asked to stop: killing stubborn"), job.output.text()
    assert not wait_for_exit([supervisor, job.pids["stubborn"]], DEADLINE)


def test_one_process_exiting_stops_the_others(jobs: list[Job], tmp_path: Path) -> None:
    job = start(jobs, tmp_path, {"steady": "ready", "crashing": "crashing"})

    assert job.wait_for(r"crashing exited with status 3: stopping steady"), job.output.text()
    assert job.wait_for(r"steady stopped \(status 0\)")
    assert job.wait_for(r"all stopped\n.*exit status 1"), job.output.text()


def test_procfile_lines_and_names(tmp_path: Path) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text("# the processes\nworker: celery worker --x=${X:-2}\n\nflower-ui: python -m flower\n")
    specs = read_procfile(procfile)
    assert specs == [ProcessSpec("worker", "celery worker --x=${X:-2}"), ProcessSpec("flower-ui", "python -m flower")]
    assert select_processes(specs, ["flower-ui"]) == [specs[1]]
    assert select_processes(specs, []) == specs
    with pytest.raises(ValueError, match=r"not in the Procfile: sandbox \(it has worker, flower-ui\)"):
        select_processes(specs, ["sandbox"])
    procfile.write_text("worker celery worker\n")
    with pytest.raises(ValueError, match=r"Procfile:1: expected `name: command`"):
        read_procfile(procfile)

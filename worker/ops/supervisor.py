"""``python -m worker.ops.supervisor [NAME...]``: run the Procfile's processes, and stop them all.

``make run`` runs the worker, Flower and the sandbox through this module rather than a generic
Procfile runner, because of one common way of using it: ``make run 2>&1 | tee run.log``, then
Ctrl-C. The terminal sends SIGINT to the whole foreground job, ``tee`` included, so the runner's
output breaks at the very moment it should stop its processes; a runner that dies of the broken
pipe (honcho does) leaves the worker, Flower and the sandbox running with nobody to stop them.

Here:

* every process runs in a process group of its own, so a Ctrl-C reaches only the supervisor,
  which decides what each process gets;
* threads read every process's output and copy it, prefixed with its name; once our own output
  is broken they keep reading and drop it, so no process ever blocks or dies on a full or
  broken pipe, and neither does the supervisor;
* the first SIGINT, SIGTERM or SIGHUP sends SIGTERM to each process (a warm shutdown for the
  Celery worker: running uploads finish, partial batches are handed on); once a process has
  exited, what is left of its group is killed; after ``--grace`` seconds every group is killed;
* a second signal kills every group at once (SIGKILL);
* when a process exits by itself, the others are stopped the same way and the exit status is 1.

With ``--local-broker DIR`` (``make run``), when nothing answers on this machine's broker URL, a
RabbitMQ node of its own runs for as long as the processes do (:mod:`worker.ops.localbroker`).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from config.settings import process_environment
from worker.ops import localbroker

#: Seconds the processes get to stop after the first signal, before they are killed.
DEFAULT_GRACE = 30.0

#: The signals that stop everything: Ctrl-C, a process manager's stop, the terminal closing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: The name the supervisor's own lines are prefixed with.
OWN_NAME = "supervisor"


@dataclass(frozen=True)
class ProcessSpec:
    """One line of the Procfile: ``name: command``."""

    name: str
    command: str


def read_procfile(path: Path) -> list[ProcessSpec]:
    """The processes of a Procfile; blank lines and ``#`` comments are skipped.

    A line that is not ``name: command`` raises ValueError naming its line number.
    """
    specs: list[ProcessSpec] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, command = line.partition(":")
        if not colon or not name.strip().replace("-", "").replace("_", "").isalnum() or not command.strip():
            raise ValueError(f"{path}:{number}: expected `name: command`, got {line!r}")
        specs.append(ProcessSpec(name.strip(), command.strip()))
    return specs


def select_processes(specs: Sequence[ProcessSpec], names: Sequence[str]) -> list[ProcessSpec]:
    """The processes named (all of them when ``names`` is empty); ValueError for an unknown name."""
    if not names:
        return list(specs)
    known = {spec.name: spec for spec in specs}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"not in the Procfile: {', '.join(unknown)} (it has {', '.join(known)})")
    return [known[name] for name in names]


class Output:
    """Our standard output, shared by every process's lines and ours.

    A write that fails (the reader is gone: ``tee`` killed by the same Ctrl-C) makes the output
    *broken*: later lines are dropped, and nothing else changes.
    """

    def __init__(self, stream: BinaryIO, names: Sequence[str]) -> None:
        self.stream = stream
        self.width = max(len(name) for name in [*names, OWN_NAME])
        self.broken = False
        self._lock = threading.Lock()

    def line(self, name: str, text: bytes) -> None:
        """Write one line, prefixed with ``name``."""
        prefix = f"{name:<{self.width}} | ".encode()
        with self._lock:
            if self.broken:
                return
            try:
                self.stream.write(prefix + text.rstrip(b"\n") + b"\n")
                self.stream.flush()
            except (OSError, ValueError):  # EPIPE, EIO, or a closed stream
                self.broken = True
                self._discard()

    def _discard(self) -> None:
        """Point the stream's descriptor at /dev/null, so that what the stream still buffers (and
        Python flushes at exit) goes nowhere instead of failing again."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def say(self, message: str) -> None:
        """One line of the supervisor's own."""
        self.line(OWN_NAME, message.encode())


class Child:
    """One running process of the Procfile, in a process group of its own."""

    def __init__(self, spec: ProcessSpec, process: subprocess.Popen[bytes]) -> None:
        self.spec = spec
        self.process = process
        self.status: int | None = None  # set by the main loop once it has exited

    @property
    def name(self) -> str:
        return self.spec.name

    def signal(self, signum: int, *, group: bool) -> None:
        """Send ``signum`` to the process, or to its whole group; nothing if already gone."""
        try:
            if group:
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)
        except (ProcessLookupError, PermissionError):
            pass


class Supervisor:
    """Starts the processes, copies their output, and stops them all (see the module's doc)."""

    def __init__(self, specs: Sequence[ProcessSpec], *, output: Output, grace: float = DEFAULT_GRACE,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        """``env``: variables the processes get on top of this process's environment."""
        self.specs = list(specs)
        self.output = output
        self.grace = grace
        self.cwd = cwd
        self.env = dict(env or {})
        self.children: list[Child] = []
        self.stopping = False
        self.deadline: float | None = None  # when the processes asked to stop get killed
        self.failed = False
        # what woke the main loop: signal numbers and exited children, appended by signal
        # handlers and waiter threads (deque.append is atomic; a lock could deadlock a handler)
        self._events: deque[int | Child] = deque()
        self._wake_read, self._wake_write = os.pipe()

    def run(self) -> int:
        """Run until every process has exited; 0 if they were asked to stop, else 1."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            for spec in self.specs:
                if not self._start(spec):
                    self.failed = True
                    self._stop(f"{spec.name} could not start")
                    break
            else:
                started = ", ".join(f"{c.name} (pid {c.process.pid})" for c in self.children)
                self.output.say(f"started {started}; Ctrl-C stops them all")
            while any(child.status is None for child in self.children):
                self._wait_for_events()
                self._handle_events()
            self.output.say("all stopped")
            return 1 if self.failed else 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _start(self, spec: ProcessSpec) -> bool:
        inherited = {**process_environment(), **self.env}
        env = {**inherited, "PYTHONUNBUFFERED": inherited.get("PYTHONUNBUFFERED", "1")}
        try:
            # exec: the command replaces the shell, so the signals reach the program itself
            process = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {spec.command}"], cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as error:
            self.output.say(f"cannot start {spec.name}: {error}")
            return False
        child = Child(spec, process)
        self.children.append(child)
        threading.Thread(target=self._copy_output, args=(child,), daemon=True, name=f"{spec.name}-output").start()
        threading.Thread(target=self._await_exit, args=(child,), daemon=True, name=f"{spec.name}-exit").start()
        return True

    def _copy_output(self, child: Child) -> None:
        assert child.process.stdout is not None
        for line in child.process.stdout:
            self.output.line(child.name, line)

    def _await_exit(self, child: Child) -> None:
        child.process.wait()
        self._post(child)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._post(signum)

    def _post(self, event: int | Child) -> None:
        self._events.append(event)
        try:
            os.write(self._wake_write, b"\0")
        except OSError:
            pass  # the pipe is full: the main loop is awake already

    def _wait_for_events(self) -> None:
        """Block until a signal arrives or a process exits (or the grace period ends)."""
        timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        readable, _, _ = select.select([self._wake_read], [], [], timeout)
        if readable:
            os.read(self._wake_read, 4096)
        else:
            self._kill_all(f"still running {self.grace:g} s after being asked to stop")

    def _handle_events(self) -> None:
        while self._events:
            event = self._events.popleft()
            if isinstance(event, Child):
                self._on_exit(event)
            elif not self.stopping:
                self._stop(f"{signal.Signals(event).name} received")
            else:
                self._kill_all(f"{signal.Signals(event).name} received again")

    def _on_exit(self, child: Child) -> None:
        child.status = child.process.returncode
        child.signal(signal.SIGKILL, group=True)  # what it left behind, if anything
        if not self.stopping:
            self.failed = True
            self._stop(f"{child.name} exited with status {child.status}")
        else:
            self.output.say(f"{child.name} stopped (status {child.status})")

    def _stop(self, why: str) -> None:
        """Ask every running process to stop: SIGTERM to the process (not its group)."""
        self.stopping = True
        self.deadline = time.monotonic() + self.grace
        running = [child for child in self.children if child.status is None]
        if running:
            names = ", ".join(child.name for child in running)
            self.output.say(f"{why}: stopping {names} (Ctrl-C again kills them; so does waiting {self.grace:g} s)")
        for child in running:
            child.signal(signal.SIGTERM, group=False)

    def _kill_all(self, why: str) -> None:
        """SIGKILL every process group still running (it cannot be ignored: no deadline after it)."""
        self.deadline = None
        running = [child for child in self.children if child.status is None]
        if running:
            self.output.say(f"{why}: killing {', '.join(child.name for child in running)}")
        for child in running:
            child.signal(signal.SIGKILL, group=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker.ops.supervisor",
        description="Run the Procfile's processes in the foreground; Ctrl-C stops them all "
                    "(twice: kills them), whatever this command's output is piped into.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="processes to run (default: all)")
    parser.add_argument("--procfile", type=Path, default=Path("Procfile"))
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                        help="seconds the processes get to stop before they are killed (default: %(default)s)")
    parser.add_argument("--local-broker", type=Path, metavar="DIR",
                        help="when nothing answers on this machine's broker URL (CELERY_BROKER_URL), run a "
                             "RabbitMQ node of its own, with its data in DIR, for as long as the processes run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        specs = select_processes(read_procfile(args.procfile), args.names)
    except (OSError, ValueError) as error:
        print(f"python -m worker.ops.supervisor: {error}", file=sys.stderr)
        return 2
    if not specs:
        print(f"python -m worker.ops.supervisor: {args.procfile} lists no process", file=sys.stderr)
        return 2
    output = Output(sys.stdout.buffer, [spec.name for spec in specs])
    supervisor = Supervisor(specs, output=output, grace=args.grace, cwd=args.procfile.resolve().parent)
    if args.local_broker is not None:
        return localbroker.run_with(args.local_broker, run=supervisor.run, env=supervisor.env, say=output.say)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())

"""Processes the benchmark starts, and the /proc figures it reads from them.

Each process runs in a session of its own, so that a Ctrl-C in the terminal reaches only the
benchmark, which then kills every process group it started (:func:`kill_all`): a benchmark
that leaves a worker behind would go on eating the broker's messages and skew the next run.

CPU time comes from ``/proc/<pid>/stat`` (utime + stime, in clock ticks) and peak memory from
``VmHWM`` in ``/proc/<pid>/status``: both are what the kernel itself accounted, with no
sampling and no agent inside the measured process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: Clock ticks per second of the utime/stime fields of /proc/<pid>/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Every process started and not yet reaped: what :func:`kill_all` must end.
_LIVE: list[Spawned] = []
_LIVE_LOCK = threading.Lock()


class Spawned:
    """A child process in its own session, its output copied to a log file.

    A reader thread keeps the pipe drained (a worker logging one line per batch must never
    block on a full pipe) and notes *when* each awaited line arrived, so a run's clock starts
    when the worker connected, not at whenever the benchmark got round to looking; a hook
    given for a line runs on that thread as it arrives (the CPU meters start there).
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
                 cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self._output = bytearray()
        self._changed = threading.Condition()
        self._seen: dict[bytes, float] = {}  #: awaited text -> unix time it first appeared
        self._watch: list[bytes] = []
        self._hooks: dict[bytes, Callable[[], None]] = {}
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self, *watch: str, hooks: Mapping[str, Callable[[], None]] | None = None) -> Spawned:
        """Start the process; note the arrival time of any line holding one of ``watch`` (or of
        ``hooks``, whose function is called the first time its text appears)."""
        self._hooks = {text.encode(): hook for text, hook in (hooks or {}).items()}
        self._watch = [text.encode() for text in (*watch, *(hooks or {}))]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with _LIVE_LOCK:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            _LIVE.append(self)
        self._reader = threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.log_path, "ab") as log:
            for line in self.process.stdout:
                now = time.time()
                log.write(line)
                with self._changed:
                    self._output += line
                    for text in self._watch:
                        if text not in self._seen and text in line:
                            self._seen[text] = now
                            hook = self._hooks.get(text)
                            if hook is not None:
                                hook()
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> float:
        """The unix time ``text`` appeared in the output; raises if it did not in time."""
        needle = text.encode()
        deadline = time.monotonic() + timeout
        with self._changed:
            while needle not in self._seen:
                remaining = deadline - time.monotonic()
                done = self._reader is not None and not self._reader.is_alive()
                if remaining <= 0 or done:
                    tail = self._output[-3000:].decode(errors="replace")
                    raise RuntimeError(f"{self.name} did not print {text!r} within {timeout:.0f} s; "
                                       f"its output ends with:\n{tail}")
                self._changed.wait(remaining)
            return self._seen[needle]

    def output(self) -> str:
        with self._changed:
            return self._output.decode(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def children(self) -> list[int]:
        """Direct children (a Celery worker's pool processes)."""
        return children_of(self.pid)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20.0) -> None:
        """Signal the whole process group, reap it, and forget it."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)
        try:  # pool processes the main one left behind
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._reader is not None:
            self._reader.join(5)
        with _LIVE_LOCK:
            if self in _LIVE:
                _LIVE.remove(self)


def kill_all() -> None:
    """Kill every process group still running (on exit, Ctrl-C or an error)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for spawned in reversed(live):
        try:
            spawned.kill()
        except Exception:  # keep going: the others must die too
            pass


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (every thread's ``children`` list)."""
    found: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.update(int(child) for child in handle.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return sorted(found)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces: cut after it
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of ``pid`` in MB; None once it is gone."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    """Resident memory (VmRSS) of ``pid`` now, in MB; None once it is gone."""
    return _status_mb(pid, "VmRSS")


def _status_mb(pid: int, key: str) -> float | None:
    """A memory figure of ``/proc/PID/status`` (given there in kB), in MB."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def broker_pid() -> int | None:
    """The RabbitMQ node's Erlang VM (``beam.smp``) on this machine, if there is one.

    ``rabbitmqctl`` and ``rabbitmq-diagnostics`` run a ``beam.smp`` of their own for a moment:
    the node is the one that started first (the lowest start time in ``/proc/<pid>/stat``).
    """
    out = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True).stdout.split()
    started = {pid: _start_ticks(pid) for pid in map(int, out)}
    running = {pid: ticks for pid, ticks in started.items() if ticks is not None}
    return min(running, key=running.__getitem__) if running else None


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (field 22 of stat(5)); None once gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


class CpuMeter:
    """CPU seconds used by a set of processes between :meth:`start` and :meth:`stop`.

    Processes that appear later (a pool process replaced) count from zero; their use before
    the start, if they existed, is negligible next to a run of several seconds.
    """

    def __init__(self) -> None:
        self._before: dict[int, float] = {}

    def start(self, pids: Sequence[int]) -> None:
        self._before = {pid: cpu_seconds(pid) or 0.0 for pid in pids}

    def stop(self, pids: Sequence[int]) -> float:
        total = 0.0
        for pid in set(pids) | set(self._before):
            now = cpu_seconds(pid)
            if now is not None:
                total += now - self._before.get(pid, 0.0)
        return total


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

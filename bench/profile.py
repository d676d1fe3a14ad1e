"""``--profile``: where the worker's process spends its time, by py-spy, thread by thread.

The worker is one process: its event loop (the main thread) consumes, batches and hands on,
its upload threads screen and post; all share one interpreter, so the process's CPU bounds its
throughput. A sampling profiler attached from outside (py-spy) sees it as it runs, without
changing its code. The profile is taken in a run of its own, after the measured ones: a
sampler costs the process some speed, and the table's numbers must not carry that cost.

py-spy's "raw" output is one line per distinct stack with its sample count. A function's
*inclusive* share is the share of samples whose stack holds it anywhere (time in it and in
what it calls), counted once per sample even when it recurses; its *self* share is the share
where it is the innermost frame. Idle samples (waiting in epoll) are left out by py-spy, so
shares are of the time the process was busy. Samples are grouped by thread (the event loop,
the upload threads, any other), and each group's table leaves out the frames on nearly all of
its own samples that do nothing themselves (start-up, the loop, the pool's plumbing).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: Samples per second: enough for a run of ten seconds, cheap for the sampled process.
SAMPLE_RATE = 200

#: Functions the report lists, per group of threads, by inclusive share and by self share.
TOP = 15
SELF_TOP = 10

#: Functions on the stack of at least this share of a group's samples, doing nothing themselves,
#: are start-up frames, the event loop or the pool's plumbing: true of any worker, so left out.
EVERYWHERE = 0.9

#: ... provided their own (self) share is below this.
IDLE_SELF = 0.01

#: One frame of a raw stack: ``function (file:line)``; the line is dropped to aggregate.
FRAME_RE = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

#: Directories stripped from file names, so that they read ``celery/worker/...``: the
#: project's, the installed packages' and the standard library's, longest first.
PATH_PREFIXES: tuple[str, ...] = tuple(sorted(
    {str(Path(__file__).resolve().parent.parent) + "/",
     sysconfig.get_paths()["purelib"] + "/", sysconfig.get_paths()["stdlib"] + "/"},
    key=len, reverse=True,
))


@dataclass(frozen=True)
class Row:
    """One function of the profile."""

    function: str
    inclusive: float  #: share of busy samples with this function on the stack
    self_share: float  #: share of busy samples with this function innermost


@dataclass
class Group:
    """The samples of one kind of thread, and its functions that say something."""

    name: str
    samples: int
    rows: list[Row]  #: by inclusive share
    busiest: list[Row]  #: by self share: where the time goes, whatever calls it
    left_out: int  #: frames on nearly every sample of the group, doing nothing themselves
    innermost_left_out: str | None


#: A frame that names its thread's kind: the event loop runs in the main thread, uploads in the pool's.
THREAD_KINDS: tuple[tuple[str, str], ...] = (
    ("_worker (concurrent/futures/thread.py)", "upload threads"),
    ("Thread._bootstrap (threading.py)", "other threads"),
)

#: The main thread's kind.
MAIN = "event loop (main thread)"


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on the PATH; None when not installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """Runs ``py-spy record --format raw`` on one process until :meth:`stop`."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None
        self.log = b""

    def start(self, pid: int) -> None:
        executable = py_spy()
        if executable is None:
            raise RuntimeError("py-spy is not installed: `make install` installs it (requirements.txt)")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [executable, "record", "--pid", str(pid), "--format", "raw", "--rate", str(SAMPLE_RATE),
             "--nonblocking", "--output", str(self.output)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def stop(self) -> None:
        """Stop sampling; py-spy writes its file on SIGINT."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.log, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.log, _ = self.process.communicate()
        self.process = None


def short(file: str) -> str:
    """A file name without the machine's directories."""
    for prefix in PATH_PREFIXES:
        if file.startswith(prefix):
            return file[len(prefix):]
    return file.split("site-packages/", 1)[-1]


def frame_key(frame: str) -> str:
    """``function (file)`` of a raw frame, its line number dropped."""
    match = FRAME_RE.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({short(match['file'])})"


def thread_kind(frames: list[str]) -> str:
    """Which kind of thread a stack (outermost frame first) was sampled in."""
    for frame, kind in THREAD_KINDS:
        if frame in frames:
            return kind
    return MAIN


def stacks(raw: Path) -> list[tuple[list[str], int]]:
    """(frames, samples) of each distinct stack of a py-spy raw file, frames as :func:`frame_key`."""
    found = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            found.append(([frame_key(f) for f in stack.split(";")], int(count_text)))
    return found


def groups(raw: Path, top: int = TOP) -> tuple[int, list[Group]]:
    """(busy samples, one :class:`Group` per kind of thread, busiest first) of a py-spy raw file.

    Shares are of all the process's busy samples, so that the groups' add up."""
    by_kind: dict[str, list[tuple[list[str], int]]] = {}
    for frames, count in stacks(raw):
        by_kind.setdefault(thread_kind(frames), []).append((frames, count))
    total = sum(count for found in by_kind.values() for _, count in found)
    out = [_group(kind, found, total, top) for kind, found in by_kind.items()]
    return total, sorted(out, key=lambda g: -g.samples)


def _group(name: str, found: list[tuple[list[str], int]], total: int, top: int) -> Group:
    inclusive: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    depth: dict[str, int] = {}
    samples = 0
    for frames, count in found:
        samples += count
        for position, key in enumerate(frames):
            depth[key] = max(depth.get(key, 0), position)
        for key in set(frames):
            inclusive[key] += count
        innermost[frames[-1]] += count
    plumbing = {key for key, n in inclusive.items() if n >= EVERYWHERE * samples and innermost[key] < IDLE_SELF * samples}
    rows = [Row(key, n / total, innermost[key] / total) for key, n in inclusive.most_common() if key not in plumbing]
    busiest = sorted((r for r in rows if r.self_share), key=lambda r: -r.self_share)
    deepest = max(plumbing, key=depth.__getitem__) if plumbing else None
    return Group(name, samples, rows[:top], busiest[:SELF_TOP], len(plumbing), deepest)


def render(raw: Path, top: int = TOP) -> str:
    """The profile as markdown: a table per kind of thread."""
    total, found = groups(raw, top)
    if not total:
        return "(py-spy recorded no busy samples)"
    parts = [f"{total:,} busy samples of the worker's process (py-spy, {SAMPLE_RATE} Hz); shares of all of them"]
    for group in found:
        under = (f"; {group.left_out} frames on nearly all of its samples (down to `{group.innermost_left_out}`) "
                 "left out" if group.innermost_left_out else "")
        lines = [f"**{group.name}**: {group.samples / total:.1%} of the samples{under}", "",
                 "| # | function (file) | inclusive | self |", "| ---: | --- | ---: | ---: |"]
        lines += [f"| {n} | `{r.function}` | {r.inclusive:6.1%} | {r.self_share:6.1%} |"
                  for n, r in enumerate(group.rows, 1)]
        lines += ["", f"{group.name}, by self share:", "", "| # | function (file) | self |", "| ---: | --- | ---: |"]
        lines += [f"| {n} | `{r.function}` | {r.self_share:6.1%} |" for n, r in enumerate(group.busiest, 1)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)

"""``--profile``: where the worker's main process (the consumer) spends its time, by py-spy.

The consumer is the one process every message goes through, so it bounds the worker's
throughput; a sampling profiler attached from outside (py-spy) sees it as it runs, without
changing its code. The profile is taken in a run of its own, after the measured ones: a
sampler costs the process some speed, and the table's numbers must not carry that cost.

py-spy's "raw" output is one line per distinct stack with its sample count. A function's
*inclusive* share is the share of samples whose stack holds it anywhere (time in it and in
what it calls), counted once per sample even when it recurses; its *self* share is the share
where it is the innermost frame. Idle samples (waiting in epoll) are left out by py-spy, so
shares are of the time the process was busy.
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

#: Functions the report lists.
TOP = 25

#: Functions on the stack of at least this share of the samples, doing nothing themselves,
#: are start-up frames and the event loop: true of any worker, so left out of the list.
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


def top_functions(raw: Path, top: int = TOP) -> tuple[int, list[Row]]:
    """(busy samples, the ``top`` functions by inclusive share) of a py-spy raw file.

    Functions on the stack of (nearly) every sample that do nothing themselves, the start-up
    and event-loop frames Celery runs everything under, are left out: "97 %" for twenty of
    them would push the informative rows off the list. :func:`loop_frames` names them.
    """
    total, inclusive, innermost, _ = _counts(raw)
    if not total:
        return 0, []
    rows = [Row(key, samples / total, innermost[key] / total) for key, samples in inclusive.most_common()
            if samples < EVERYWHERE * total or innermost[key] >= IDLE_SELF * total]
    return total, rows[:top]


def _counts(raw: Path) -> tuple[int, Counter[str], Counter[str], dict[str, int]]:
    """(samples, inclusive samples, innermost samples, deepest position) per function of a
    py-spy raw file."""
    inclusive: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    depth: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_key(f) for f in stack.split(";")]
        total += count
        for position, key in enumerate(frames):
            depth[key] = max(depth.get(key, 0), position)
        for key in set(frames):
            inclusive[key] += count
        innermost[frames[-1]] += count
    return total, inclusive, innermost, depth


def loop_frames(raw: Path) -> tuple[int, str | None]:
    """(how many frames :func:`top_functions` leaves out, the innermost of them)."""
    total, inclusive, innermost, depth = _counts(raw)
    left_out = [key for key, samples in inclusive.items()
                if samples >= EVERYWHERE * total and innermost[key] < IDLE_SELF * total]
    innermost_frame = max(left_out, key=depth.__getitem__) if left_out else None
    return len(left_out), innermost_frame


def render(total: int, rows: list[Row], loop: tuple[int, str | None]) -> str:
    """The profile as a markdown table."""
    if not rows:
        return "(py-spy recorded no busy samples)"
    left_out, innermost = loop
    under = (f"; {left_out} start-up and event-loop frames (down to `{innermost}`) on nearly every "
             "sample are left out" if innermost else "")
    lines = [f"{total:,} busy samples of the worker's main process (py-spy, {SAMPLE_RATE} Hz){under}", "",
             "| # | function (file) | inclusive | self |", "| ---: | --- | ---: | ---: |"]
    for number, row in enumerate(rows, 1):
        lines.append(f"| {number} | `{row.function}` | {row.inclusive:6.1%} | {row.self_share:6.1%} |")
    return "\n".join(lines)

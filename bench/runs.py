"""One measured run: consumer processes drain a preloaded backlog into the sandbox.

The clock starts when the first worker process has connected to RabbitMQ (Celery's
"Connected to" line: the worker consumes from then on, seconds before it prints "ready.") and
stops at the arrival of the upload that completed the N-th event (the sandbox dates each
upload), so the figure is the end-to-end rate a backlog of N events really sees, including the
worker's ramp-up and its last partial batches. The steady rate (10 % to 90 % of the events) is
given beside it, because on a short run those two ends weigh a lot.

CPU is the kernel's accounting of every process concerned between the same two moments (read
as the "Connected to" line arrives, and at the end), and the run also checks what a benchmark
must not take on faith: every event delivered once, nothing dead-lettered, nothing left in the
queue, no upload mixing asset_ids.

The worker is one process: its event loop consumes and batches, its thread pool uploads, as
many threads as ``UPLOAD_CONCURRENCY``. It is started as the Procfile starts it, without
``--concurrency`` (which would cap those threads); the naive design keeps its prefork pool.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import broker
from bench.api import Progress, SandboxProcess
from bench.procs import CpuMeter, Spawned, peak_rss_mb
from bench.procs import broker_pid as broker_pid_of
from bench.profile import Profiler
from config.settings import Settings

#: The line a Celery worker prints once all its parts started (it consumes before that).
READY = " ready."

#: The line a Celery worker prints once connected to the broker: a run's clock starts there.
CONNECTED = "Connected to "

#: Seconds a worker may take to print it.
READY_TIMEOUT = 90.0

#: Seconds between two looks at the sandbox's records (the least: see POLL_COST_SHARE).
POLL_INTERVAL = 0.2

#: Polling may use at most this share of the wall time (long record lists cost to list).
POLL_COST_SHARE = 0.05

#: Seconds without a new delivery after which a run is declared stalled.
STALL_SECONDS = 30.0

#: Log markers counted as worker problems.
PROBLEM_MARKERS: tuple[str, ...] = ("ERROR", "CRITICAL", "Traceback", "WARNING")

#: Lines of each problem kind kept for the report.
PROBLEM_EXAMPLES = 3


@dataclass
class RunResult:
    """What one run measured; every rate is events per second."""

    label: str
    processes: int
    concurrency: int  #: uploads (threads) or pool processes per worker process
    expected: int
    delivered: int = 0
    unique: int | None = None
    duplicates: int | None = None
    seconds: float = 0.0
    events_per_s: float = 0.0
    steady_events_per_s: float | None = None
    first_upload_s: float | None = None
    tail_s: float | None = None  #: from 99 % of the events delivered to 100 %
    longest_gap_s: float = 0.0  #: the longest pause between two uploads
    source_read_s: float | None = None  #: until the source queue had no ready message left
    upload_backlog_peak: int | None = None  #: most upload-task messages waiting at one look
    worker_cpu_us: float = 0.0
    main_cpu_us: float = 0.0  #: the main process (the consumer) alone
    broker_cpu_us: float | None = None
    sandbox_cpu_us: float = 0.0
    rss_main_mb: float = 0.0
    rss_child_mb: float = 0.0
    uploads: int = 0
    failed_uploads: int = 0
    mean_batch: float = 0.0
    mixed_batches: int = 0
    dead_letters: int | None = None
    left_in_queue: int | None = None
    stalled: bool = False
    log_problems: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    started_at: float = 0.0  #: unix time the run's clock started (the first worker connected)
    timeline: list[int] = field(default_factory=list)  #: events delivered in each second
    api_faults: list[dict[str, Any]] = field(default_factory=list)  #: the sandbox's faults (a latency)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def celery_worker(app: str, concurrency: int | None = None) -> list[str]:
    """The command of one Celery worker, as the Procfile runs it (INFO logs).

    ``concurrency`` only for an app with a process pool (the naive design): the worker's own
    pool is threads, as many as ``UPLOAD_CONCURRENCY``, and ``--concurrency`` would override it.
    """
    return [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel=INFO",
            *([f"--concurrency={concurrency}"] if concurrency is not None else []),
            "--without-gossip", "--without-mingle", f"--hostname=bench-{uuid.uuid4().hex[:8]}@%h"]


def upload_concurrency(env: Mapping[str, str]) -> int:
    """``UPLOAD_CONCURRENCY`` as a worker started with ``env`` reads it (its default when unset)."""
    return Settings.from_env(env, require_api=False).upload_concurrency


def measure(
    *,
    label: str,
    commands: Sequence[list[str]],
    env: Mapping[str, str],
    sandbox: SandboxProcess,
    expected: int,
    root: Path,
    logs: Path,
    source_queue: str | None = None,
    upload_queue: str | None = None,
    dead_letter_queue: str | None = None,
    check_ids: bool = True,
    profiler: Profiler | None = None,
    faults: Sequence[dict[str, Any]] = (),
) -> RunResult:
    """Start ``commands`` on a preloaded backlog of ``expected`` events; measure until delivered.

    ``faults``: the sandbox's fault rules for this run (``{"latency": 0.15}``: a slow API).
    """
    flag = _arg(commands[0], "--concurrency=")
    result = RunResult(label, len(commands), int(flag) if flag else upload_concurrency(env), expected,
                       api_faults=list(faults))
    sandbox.reset(faults)
    worker_cpu, main_cpu, broker_cpu, sandbox_cpu = CpuMeter(), CpuMeter(), CpuMeter(), CpuMeter()
    broker_pid = broker_pid_of()
    workers = [Spawned(f"{label}-{i}", argv, env, logs / f"{label}-{i}.log", root)
               for i, argv in enumerate(commands)]
    begun = threading.Lock()

    def begin() -> None:
        """The first worker connected: every meter starts (on that worker's reader thread)."""
        if begun.acquire(blocking=False):
            live = [w for w in workers if w.process is not None]
            worker_cpu.start(_tree(live))
            main_cpu.start([w.pid for w in live])
            broker_cpu.start([broker_pid] if broker_pid else [])
            sandbox_cpu.start([sandbox.pid])

    for worker in workers:
        worker.start(READY, hooks={CONNECTED: begin})
    try:
        for worker in workers:
            worker.wait_for(READY, READY_TIMEOUT)
        started = min(w.wait_for(CONNECTED, 0) for w in workers)
        if profiler is not None:
            profiler.start(workers[0].pid)
        watch = broker.QueueWatch([q for q in (source_queue, upload_queue) if q])
        try:
            progress = _wait_for_delivery(workers, sandbox, expected, result, watch, source_queue, upload_queue,
                                          started)
        finally:
            watch.close()
        worker_seconds = worker_cpu.stop(_tree(workers))
        main_seconds = main_cpu.stop([w.pid for w in workers])
        broker_seconds = broker_cpu.stop([broker_pid] if broker_pid else [])
        sandbox_seconds = sandbox_cpu.stop([sandbox.pid])
        result.rss_main_mb = max(peak_rss_mb(w.pid) or 0.0 for w in workers)
        result.rss_child_mb = max((peak_rss_mb(pid) or 0.0 for w in workers for pid in w.children()), default=0.0)
        if source_queue:
            result.left_in_queue = broker.depth(source_queue)
        if dead_letter_queue:
            result.dead_letters = broker.depth(dead_letter_queue)
    finally:
        if profiler is not None:
            profiler.stop()
        for w in workers:
            w.kill()
    _rates(result, progress, started)
    per_event = 1e6 / max(1, min(progress.delivered, expected))
    result.worker_cpu_us = worker_seconds * per_event
    result.main_cpu_us = main_seconds * per_event
    result.broker_cpu_us = broker_seconds * per_event if broker_pid else None
    result.sandbox_cpu_us = sandbox_seconds * per_event
    _tally(result, sandbox, check_ids)
    result.log_problems = log_problems_of(workers)
    _judge(result)
    return result


def _rates(result: RunResult, progress: Progress, started: float) -> None:
    """Rates and timings, from the arrival times of the uploads."""
    expected = result.expected
    result.started_at = started
    done_at = progress.time_reaching(1.0, expected) or progress.last_at() or started
    result.seconds = max(1e-6, done_at - started)
    result.events_per_s = min(progress.delivered, expected) / result.seconds
    t10, t90 = progress.time_reaching(0.1, expected), progress.time_reaching(0.9, expected)
    if t10 is not None and t90 is not None and t90 > t10:
        result.steady_events_per_s = 0.8 * expected / (t90 - t10)
    t99 = progress.time_reaching(0.99, expected)
    if t99 is not None and progress.delivered >= expected:
        result.tail_s = done_at - t99
    first = progress.ok[0]["at"] if progress.ok else None
    result.first_upload_s = first - started if first is not None else None
    result.longest_gap_s = progress.longest_gap()
    result.timeline = progress.timeline(started)


def _tally(result: RunResult, sandbox: SandboxProcess, check_ids: bool) -> None:
    """What the API ended up with, uploads that arrived after the count was reached included."""
    final = sandbox.progress()
    result.delivered = final.delivered
    result.uploads = len(final.ok)
    result.failed_uploads = final.failed
    result.mean_batch = final.delivered / result.uploads if result.uploads else 0.0
    result.mixed_batches = final.mixed_batches()
    if check_ids:
        ids = sandbox.event_ids()
        result.unique = len(ids)
        result.duplicates = sum(ids.values()) - len(ids)


def _arg(argv: list[str], prefix: str) -> str | None:
    return next((a[len(prefix):] for a in argv if a.startswith(prefix)), None)


def _tree(workers: Sequence[Spawned]) -> list[int]:
    """Main processes and their pool processes."""
    return [pid for w in workers if w.alive() for pid in (w.pid, *w.children())]


def _wait_for_delivery(workers: Sequence[Spawned], sandbox: SandboxProcess, expected: int, result: RunResult,
                       watch: broker.QueueWatch, source_queue: str | None, upload_queue: str | None,
                       started: float) -> Progress:
    """Poll the sandbox until ``expected`` events were accepted, a stall, or a dead worker;
    note on the way when the source queue ran dry and how deep the upload queue got."""
    last_count, last_change = -1, time.monotonic()
    while True:
        asked = time.monotonic()
        depths = watch.sample()
        if source_queue and result.source_read_s is None and depths.get(source_queue) == 0:
            result.source_read_s = time.time() - started
        upload_depth = depths.get(upload_queue) if upload_queue else None
        if upload_depth is not None:
            result.upload_backlog_peak = max(result.upload_backlog_peak or 0, upload_depth)
        count = sandbox.poll()
        cost = time.monotonic() - asked
        if count >= expected:
            return sandbox.progress()
        now = time.monotonic()
        if count != last_count:
            last_count, last_change = count, now
        elif now - last_change > STALL_SECONDS:
            result.stalled = True
            result.warnings.append(f"STALLED: no upload for {STALL_SECONDS:.0f} s at {count:,} of "
                                   f"{expected:,} events")
            return sandbox.progress()
        dead = [w.name for w in workers if not w.alive()]
        if dead:
            result.warnings.append(f"worker process exited during the run: {', '.join(dead)}")
            return sandbox.progress()
        time.sleep(max(POLL_INTERVAL, cost / POLL_COST_SHARE))


def log_problems_of(workers: Sequence[Spawned]) -> dict[str, list[str]]:
    """The first few log lines of each problem kind, with their count, from every process."""
    found: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for w in workers:
        for line in w.output().splitlines():
            for marker in PROBLEM_MARKERS:
                if marker in line:
                    counts[marker] = counts.get(marker, 0) + 1
                    if len(found.setdefault(marker, [])) < PROBLEM_EXAMPLES:
                        found[marker].append(line.strip()[:300])
                    break
    return {f"{marker} x{counts[marker]}": lines for marker, lines in found.items()}


def _judge(result: RunResult) -> None:
    """Loud warnings for anything that makes the run's numbers suspect."""
    if result.delivered < result.expected:
        result.warnings.append(f"LOST EVENTS: {result.expected - result.delivered:,} of "
                               f"{result.expected:,} never reached the API")
    if result.unique is not None and result.unique != result.expected:
        result.warnings.append(f"EVENTS MISSING: {result.unique:,} distinct events stored, "
                               f"{result.expected:,} sent")
    if result.duplicates:
        result.warnings.append(f"DUPLICATES: {result.duplicates:,} events delivered twice or more")
    if result.failed_uploads:
        result.warnings.append(f"{result.failed_uploads:,} uploads were not answered 200")
    if result.mixed_batches:
        result.warnings.append(f"CONTRACT BREACH: {result.mixed_batches:,} uploads mixed asset_ids")
    if result.dead_letters:
        result.warnings.append(f"{result.dead_letters:,} messages in the dead-letter queue")
    if result.left_in_queue:
        result.warnings.append(f"{result.left_in_queue:,} messages left unread in the source queue")


def worker_env(base: Mapping[str, str], queues: Mapping[str, str], sandbox: SandboxProcess,
               key: str, *, metrics_port: int = 0) -> dict[str, str]:
    """The environment of a worker run: the caller's, this run's queues, the sandbox.

    The metrics endpoint is off unless a port is given: its default port is one per machine,
    and another worker there (or a second one of the same run) may hold it.
    """
    return {**base, "CELERY_BROKER_URL": broker.BROKER_URL, "PYTHONUNBUFFERED": "1", **queues,
            "NETCORE_API_URL": sandbox.url, "NETCORE_API_KEY": key, "METRICS_PORT": str(metrics_port)}


def tuning_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Worker settings the caller set (ACTIVITY_*, UPLOAD_*): recorded, since they change results."""
    return {k: v for k, v in env.items()
            if k.startswith(("ACTIVITY_", "UPLOAD_", "WORKER_")) and k not in broker.QUEUE_ROLES}

"""``python -m bench`` / ``make bench``: every measurement, in one run, in a few minutes.

The order keeps what is compared close in time: each case's bare drain runs just before the
worker on the same backlog, so a burst of noise on the machine hits both or neither. Every
process started is killed and every queue deleted on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import broker, events, naive, runs
from bench.api import API_KEY, SandboxProcess
from bench.events import CASES, Case
from bench.procs import kill_all
from bench.profile import Profiler, loop_frames, render, top_functions
from bench.report import CaseResult, Results

#: The project's root: where the worker runs and results are written.
ROOT = Path(__file__).resolve().parent.parent

#: Events per case unless ``--events`` or ``BENCH_EVENTS`` says otherwise.
DEFAULT_EVENTS = 100_000

#: Cases with at least this many asset ids are the slow ones (small batches, many uploads).
MANY_ASSETS = 1000

#: Their default events: at 100,000 they alone would take the run past five minutes, as the
#: worker makes batches of about ten events there (the run says so in its notes).
DEFAULT_MANY_ASSETS_EVENTS = 50_000

#: The naive design is slow: at most this many events for it unless told otherwise.
DEFAULT_NAIVE_EVENTS = 5_000

#: Where the results go (git-ignored).
RESULTS = ROOT / "bench-results"

#: Signals that stop the benchmark (and every process it started).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: The case the scale-out table and the profile use.
SCALE_CASE = CASES[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="The worker's throughput, CPU and memory, against a bare drain and a naive design measured "
                    "in the same run.")
    parser.add_argument("--events", type=int, default=_env_int("BENCH_EVENTS"),
                        help=f"events per case (default $BENCH_EVENTS, else {DEFAULT_EVENTS:,}; "
                             f"{DEFAULT_MANY_ASSETS_EVENTS:,} for the 1000-asset cases)")
    parser.add_argument("--naive-events", type=int, default=None,
                        help=f"events for the naive design (default min(events, {DEFAULT_NAIVE_EVENTS:,}))")
    parser.add_argument("--cases", nargs="+", choices=[c.key for c in CASES], default=[c.key for c in CASES],
                        help="run only these cases")
    parser.add_argument("--no-scale-out", action="store_true", help="skip the scale-out table")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the worker's main process (py-spy) on single-event messages")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json",
                        help="where the JSON results go (default bench-results/latest.json)")
    args = parser.parse_args(argv)
    if args.events is not None and args.events < 100:
        parser.error("--events must be at least 100")
    if args.naive_events is None:
        args.naive_events = min(args.events or DEFAULT_EVENTS, DEFAULT_NAIVE_EVENTS)
    return args


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def events_for(case: Case, chosen: int | None) -> int:
    """Events of ``case``: as chosen, else the default (smaller for the slow 1000-asset cases)."""
    if chosen is not None:
        return chosen
    return DEFAULT_EVENTS if case.assets < MANY_ASSETS else DEFAULT_MANY_ASSETS_EVENTS


class Bench:
    """Runs the whole benchmark; :meth:`close` undoes everything it set up."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.queues = broker.Queues()
        self.logs = RESULTS / "logs"
        self.results = Results({c.key: events_for(c, args.events) for c in CASES if c.key in args.cases},
                               args.naive_events)
        self.sandbox: SandboxProcess | None = None
        #: The scale-out runs' queues, filled by the same preload as the first case's.
        self.scale_queues: list[dict[str, str]] = []
        self.results.notes.append(
            "events/s, end to end: from the first \"ready.\" of the worker to the arrival at the API of "
            "the upload that completed the N-th event; steady: from 10 % to 90 % of the events. CPU: "
            "the kernel's utime + stime of each process over the same span, per event delivered.")
        cut = [c.title for c in CASES if c.key in args.cases and args.events is None and c.assets >= MANY_ASSETS]
        if cut:
            self.results.notes.append(
                f"{' and '.join(cut)}: {DEFAULT_MANY_ASSETS_EVENTS:,} events instead of {DEFAULT_EVENTS:,}, so "
                "that the default run stays under five minutes (the worker uploads small batches there); "
                "--events or BENCH_EVENTS sets every case.")

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.0f} s] {text}", flush=True)

    def run(self) -> Results:
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.logs.glob("*.log"):
            old.unlink()
        self.results.environment = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                    "worker_settings": runs.tuning_env(), "worker_code": _code_version()}
        self.sandbox = SandboxProcess(ROOT, self.logs / "sandbox.log", dict(os.environ)).start()
        counts = ", ".join(f"{key} {n:,}" for key, n in self.results.events.items())
        self.say(f"sandbox API on {self.sandbox.url}; events per case: {counts}; run {self.queues.run_id}")
        if not self.args.no_scale_out:
            self.scale_queues = [self.queues.worker_env("scale1"), self.queues.worker_env("scale2")]
        scale_bodies: list[bytes] = []
        for case in (c for c in CASES if c.key in self.args.cases):
            bodies = events.bodies(self.queues.run_id, case, self.results.events[case.key])
            extra = [q["ACTIVITY_QUEUE"] for q in self.scale_queues] if case == SCALE_CASE else []
            self.results.cases.append(self._case(case, bodies, extra))
            if case == SCALE_CASE:
                scale_bodies = bodies
        self._naive()
        if self.scale_queues:
            self._scale_out(scale_bodies)
        if self.args.profile:
            self._profile(scale_bodies or self._scale_bodies())
        self.results.total_seconds = time.monotonic() - self.started
        return self.results

    def _scale_bodies(self) -> list[bytes]:
        return events.bodies(self.queues.run_id, SCALE_CASE, events_for(SCALE_CASE, self.args.events))

    def _case(self, case: Case, bodies: list[bytes], extra_queues: list[str]) -> CaseResult:
        """Preload (also into ``extra_queues``), bare drain, then the worker on the same backlog."""
        drain_queue = self.queues.single(f"{case.key}.drain")
        env = self.queues.worker_env(case.key)
        copies = [drain_queue, env["ACTIVITY_QUEUE"], *extra_queues]
        preload_s = broker.preload(copies, bodies)
        self.say(f"{case.title}: preloaded {len(bodies):,} messages into {len(copies)} queues in {preload_s:.1f} s")
        drain = broker.bare_drain(drain_queue, len(bodies))
        self.say(f"{case.title}: bare drain {drain.messages_per_s:,.0f} msg/s "
                 f"({drain.messages_per_s * case.per_message:,.0f} events/s)")
        worker = self._worker(case.key, env, [runs.celery_worker("worker.app", 2)], self.results.events[case.key])
        return CaseResult(case, len(bodies), events.mean_event_bytes(bodies[:1000], case.per_message),
                          preload_s, drain, worker)

    def _worker(self, label: str, queues: dict[str, str], commands: list[list[str]], expected: int,
                profiler: Profiler | None = None) -> runs.RunResult:
        assert self.sandbox is not None
        result = runs.measure(
            label=label, commands=commands, env=runs.worker_env(os.environ, queues, self.sandbox, API_KEY),
            sandbox=self.sandbox, expected=expected, root=ROOT, logs=self.logs,
            source_queue=queues["ACTIVITY_QUEUE"], upload_queue=queues["ACTIVITY_UPLOAD_QUEUE"],
            dead_letter_queue=queues["ACTIVITY_DEAD_LETTER_QUEUE"],
            profiler=profiler,
        )
        self.say(f"{label}: worker {result.events_per_s:,.0f} events/s in {result.seconds:.1f} s, "
                 f"{result.uploads:,} uploads" + "".join(f"\n      WARNING: {w}" for w in result.warnings))
        return result

    def _naive(self) -> None:
        assert self.sandbox is not None
        count = self.args.naive_events
        queue = self.queues.single("naive")
        started = time.perf_counter()
        naive.preload(queue, events.events(self.queues.run_id, Case("naive", 1, 7), count))
        self.say(f"naive: {count:,} task messages sent in {time.perf_counter() - started:.1f} s")
        env = {**os.environ, "CELERY_BROKER_URL": broker.BROKER_URL, "PYTHONUNBUFFERED": "1",
               "BENCH_NAIVE_QUEUE": queue, "NETCORE_API_URL": self.sandbox.url, "NETCORE_API_KEY": API_KEY}
        result = runs.measure(label="naive", commands=[runs.celery_worker("bench.naive", 2)], env=env,
                              sandbox=self.sandbox, expected=count, root=ROOT, logs=self.logs, source_queue=queue)
        self.results.naive = result
        self.say(f"naive: {result.events_per_s:,.0f} events/s")

    def _scale_out(self, bodies: list[bytes]) -> None:
        """One process, two processes, of one pool process each; the backlogs are preloaded."""
        one, two = self.scale_queues
        if not bodies:  # the first case did not run: preload here
            bodies = self._scale_bodies()
            preload_s = broker.preload([one["ACTIVITY_QUEUE"], two["ACTIVITY_QUEUE"]], bodies)
            self.say(f"scale-out: preloaded {len(bodies):,} messages into 2 queues in {preload_s:.1f} s")
        expected = len(bodies)
        single = self._worker("scale-1x1", one, [runs.celery_worker("worker.app", 1)], expected)
        double = self._worker("scale-2x1", two, [runs.celery_worker("worker.app", 1) for _ in range(2)], expected)
        self.results.scale_out = [("one process, --concurrency=1", single),
                                  ("two processes, --concurrency=1 each", double)]
        reference = next((c.worker for c in self.results.cases if c.case == SCALE_CASE), None)
        if reference is not None:
            self.results.scale_out.append(("one process, --concurrency=2 (the case above)", reference))

    def _profile(self, bodies: list[bytes]) -> None:
        env = self.queues.worker_env("profile")
        broker.preload([env["ACTIVITY_QUEUE"]], bodies)
        raw = RESULTS / "profile-main.txt"
        raw.unlink(missing_ok=True)
        profiler = Profiler(raw)
        self.say("profile: a run of its own, with py-spy on the worker's main process")
        self._worker("profile", env, [runs.celery_worker("worker.app", 2)], len(bodies), profiler=profiler)
        if not raw.exists():
            self.results.notes.append(f"py-spy wrote no profile: {profiler.log.decode(errors='replace')[-500:]}")
            return
        total, rows = top_functions(raw)
        self.results.profile = [{"function": r.function, "inclusive": round(r.inclusive, 4),
                                 "self": round(r.self_share, 4)} for r in rows]
        self.results.profile_text = render(total, rows, loop_frames(raw)) + f"\n\nRaw stacks: {raw.relative_to(ROOT)}"

    def close(self) -> None:
        kill_all()
        try:
            self.queues.delete_all()
        except Exception as exc:  # the broker went away: say so, do not hide the real error
            print(f"could not delete the benchmark's queues: {exc!r}", file=sys.stderr)


def _code_version() -> str:
    """The commit measured, and whether the worker's code differs from it (results of a
    work in progress must not pass for a commit's)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "worker", "config") else "")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGINT explicitly: a job started in the background begins with it ignored.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    atexit.register(kill_all)
    bench = Bench(args)
    try:
        results = bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process and deleting the queues", file=sys.stderr)
        return 130
    finally:
        for signum in STOP_SIGNALS:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        bench.close()
    results.write_json(args.output)
    print()
    print(results.markdown())
    print(f"\nTotal run time: {results.total_seconds:.0f} s. JSON: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

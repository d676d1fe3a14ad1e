"""``python -m bench`` / ``make bench``: every measurement, in one run, in about 10 minutes
(``--quick``: under 2).

The order keeps what is compared close in time: each case's bare drain runs just before the
worker on the same backlog (and, with ``--baseline``, the worker of another commit right after
it), so a burst of noise on the machine hits both or neither, and the 100-asset_id backlog runs
against the instant API and then against the slow one right after.
The two scenarios come last (a SIGKILL mid-run, then an outage of several minutes). Every
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
from typing import Any

import orjson

from bench import accounts, baseline, broker, events, naive, runs, scenarios
from bench.api import API_KEY, SandboxProcess
from bench.events import CASES, LATENCY_CASE, Case
from bench.procs import kill_all
from bench.profile import Profiler, render
from bench.report import CaseResult, LatencyResult, Results

#: The project's root: where the worker runs and results are written.
ROOT = Path(__file__).resolve().parent.parent

#: Events per case unless ``--events`` or ``BENCH_EVENTS`` says otherwise.
DEFAULT_EVENTS = 100_000

#: Cases with at least this many asset ids are the slow ones (small batches, many uploads).
MANY_ASSETS = 1000

#: Their default events: at 100,000 they alone would add minutes to the run, as the worker
#: makes small batches there (the run says so in its notes).
DEFAULT_MANY_ASSETS_EVENTS = 50_000

#: The naive design is slow: at most this many events for it unless told otherwise.
DEFAULT_NAIVE_EVENTS = 5_000

#: Seconds the sandbox waits before answering each upload in the slow-API runs: the real
#: API's round trip from a data centre nearby is 100-300 ms.
DEFAULT_LATENCY = 0.15

#: Seconds the API is down in the outage scenario, and the events published meanwhile.
DEFAULT_OUTAGE_SECONDS = 300.0
DEFAULT_OUTAGE_EVENTS = 100_000

#: The SIGKILL scenario's backlog, and the share of it delivered when the worker is killed:
#: early enough that the consumer still reads the backlog (it hands events on faster than a
#: 150 ms API takes them, and by 40 % had read all of it), so that every kind of duplicate
#: (requests in flight, tasks not acknowledged, source messages not acknowledged) can occur.
DEFAULT_KILL_EVENTS = 50_000
DEFAULT_KILL_AT = 0.2

#: ``--quick``: events per case (and for the kill), naive events, outage seconds and events.
QUICK_EVENTS = 5_000
QUICK_NAIVE_EVENTS = 500
QUICK_OUTAGE_SECONDS = 30.0
QUICK_OUTAGE_EVENTS = 5_000

#: What ``--skip`` can leave out.
PARTS: tuple[str, ...] = ("latency", "naive", "scale-out", "kill", "outage", "accounts")

#: Where the results go (git-ignored).
RESULTS = ROOT / "bench-results"

#: Signals that stop the benchmark (and every process it started).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: The case the scale-out table uses, and the profile unless told which.
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
    parser.add_argument("--cases", nargs="*", choices=[c.key for c in CASES], default=[c.key for c in CASES],
                        help="run only these cases")
    parser.add_argument("--no-scale-out", action="store_true", help="skip the scale-out table (= --skip scale-out)")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="leave these parts out")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY, metavar="SECONDS",
                        help=f"the slow API's latency per request, for the slow-API comparison, the kill and "
                             f"the outage (default {DEFAULT_LATENCY})")
    parser.add_argument("--latency-assets", type=int, default=LATENCY_CASE.assets, metavar="N",
                        help=f"asset_ids of the slow-API comparison's backlog (default {LATENCY_CASE.assets}; 1000 "
                             "makes small batches, which need many requests in flight)")
    parser.add_argument("--outage", type=float, default=None, metavar="SECONDS",
                        help=f"how long the API answers 503 (default {DEFAULT_OUTAGE_SECONDS:.0f}; "
                             f"--quick {QUICK_OUTAGE_SECONDS:.0f})")
    parser.add_argument("--outage-events", type=int, default=None,
                        help=f"events published during the outage (default {DEFAULT_OUTAGE_EVENTS:,}; "
                             f"--quick {QUICK_OUTAGE_EVENTS:,})")
    parser.add_argument("--kill-events", type=int, default=None,
                        help=f"the SIGKILL scenario's backlog (default {DEFAULT_KILL_EVENTS:,}; --quick "
                             f"{QUICK_EVENTS:,})")
    parser.add_argument("--kill-at", type=float, default=DEFAULT_KILL_AT, metavar="SHARE",
                        help=f"share of that backlog delivered when the worker is killed (default {DEFAULT_KILL_AT})")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke test of every part in a few minutes: {QUICK_EVENTS:,} events per case, "
                             f"a {QUICK_OUTAGE_SECONDS:.0f} s outage (options given explicitly still win)")
    parser.add_argument("--profile", nargs="*", choices=[c.key for c in CASES], default=None, metavar="CASE",
                        help=f"also profile the worker (py-spy), in a run of its own for each CASE (default "
                             f"{SCALE_CASE.key}): {', '.join(c.key for c in CASES)}")
    parser.add_argument("--baseline", metavar="REF",
                        help="also run the worker of commit REF (e.g. main) on each case's backlog, right after "
                             "this checkout's: an A/B of two versions in one run")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json",
                        help="where the JSON results go (default bench-results/latest.json)")
    args = parser.parse_args(argv)
    if args.profile == []:
        args.profile = [SCALE_CASE.key]
    if args.no_scale_out and "scale-out" not in args.skip:
        args.skip.append("scale-out")
    if args.quick:
        args.events = args.events or QUICK_EVENTS
        args.naive_events = args.naive_events or QUICK_NAIVE_EVENTS
        args.outage = args.outage if args.outage is not None else QUICK_OUTAGE_SECONDS
        args.outage_events = args.outage_events or QUICK_OUTAGE_EVENTS
        args.kill_events = args.kill_events or QUICK_EVENTS
    if args.outage is None:
        args.outage = DEFAULT_OUTAGE_SECONDS
    args.outage_events = args.outage_events or DEFAULT_OUTAGE_EVENTS
    args.kill_events = args.kill_events or DEFAULT_KILL_EVENTS
    if args.events is not None and args.events < 100:
        parser.error("--events must be at least 100")
    if args.latency_assets < 1:
        parser.error("--latency-assets must be >= 1")
    if args.latency < 0 or args.outage <= 0 or args.outage_events < 1 or args.kill_events < 100:
        parser.error("--latency must be >= 0, --outage > 0, --outage-events >= 1, --kill-events >= 100")
    if not 0 < args.kill_at < 1:
        parser.error("--kill-at must be a share between 0 and 1")
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
        #: (commit, directory) of the --baseline worker.
        self.baseline = baseline.extract(args.baseline, repository=ROOT, into=RESULTS / "baseline") \
            if args.baseline else None
        self.results.baseline = self.baseline[0] if self.baseline else None
        #: The scale-out runs' queues (two processes; one process on quorum queues), filled by
        #: the same preload as the first case's.
        self.scale_queues: list[dict[str, str]] = []
        self.results.notes.append(
            "events/s, end to end: from the worker's connection to RabbitMQ (it consumes from then on, seconds "
            "before it prints \"ready.\") to the arrival at the API of the upload that completed the N-th "
            "event; steady: from 10 % to 90 % of the events. CPU: the kernel's utime + stime of each process "
            "over the same span, per event delivered.")
        cut = [c.title for c in CASES if c.key in args.cases and args.events is None and c.assets >= MANY_ASSETS]
        if cut:
            self.results.notes.append(
                f"{' and '.join(cut)}: {DEFAULT_MANY_ASSETS_EVENTS:,} events instead of {DEFAULT_EVENTS:,}, so "
                "that the default run stays near ten minutes (the worker uploads small batches there); "
                "--events or BENCH_EVENTS sets every case.")
        if args.quick:
            self.results.notes.append(
                "--quick: a smoke test that every part runs. At these sizes the fixed costs (the first batch "
                "waits ACTIVITY_BATCH_WAIT, the adaptive concurrency ramps up) dominate: the rates and ratios "
                "mean nothing; run without --quick to judge the targets.")
        self.results.notes.append(
            "The four cases, the bare drains and the scale-out run against the instant API; the 100-asset_id "
            "comparison, the SIGKILL and the outage against the API with --latency (per request, 503s too).")

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.0f} s] {text}", flush=True)

    def run(self) -> Results:
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.logs.glob("*.log"):
            old.unlink()
        self.results.environment = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                    "worker_settings": runs.tuning_env(), "worker_code": _code_version()}
        self.sandbox = SandboxProcess(ROOT, self.logs / "sandbox.log", dict(os.environ),
                                      accounts={accounts.DOWN_ACCOUNT: accounts.DOWN_KEY}).start()
        counts = ", ".join(f"{key} {n:,}" for key, n in self.results.events.items())
        self.say(f"sandbox API on {self.sandbox.url}; events per case: {counts}; run {self.queues.run_id}")
        skip = set(self.args.skip)
        if "scale-out" not in skip:
            self.scale_queues = [self.queues.worker_env("scale2"), self.queues.worker_env("quorum", quorum=True)]
        scale_bodies: list[bytes] = []
        for case in (c for c in CASES if c.key in self.args.cases):
            bodies = events.bodies(self.queues.run_id, case, self.results.events[case.key])
            extra = [q["ACTIVITY_QUEUE"] for q in self.scale_queues] if case == SCALE_CASE else []
            self.results.cases.append(self._case(case, bodies, extra))
            if case == SCALE_CASE:
                scale_bodies = bodies
            del bodies
        if "latency" not in skip:
            self._latency()
        if "naive" not in skip:
            self._naive()
        if self.scale_queues:
            self._scale_out(scale_bodies)
        del scale_bodies
        for key in self.args.profile or []:
            self._profile(next(c for c in CASES if c.key == key))
        if "kill" not in skip:
            self._kill()
        if "outage" not in skip:
            self._outage()
        if "accounts" not in skip:
            self._accounts()
        self.results.total_seconds = time.monotonic() - self.started
        return self.results

    def _scale_bodies(self) -> list[bytes]:
        return events.bodies(self.queues.run_id, SCALE_CASE, events_for(SCALE_CASE, self.args.events))

    def _case(self, case: Case, bodies: list[bytes], extra_queues: list[str]) -> CaseResult:
        """Preload (also into ``extra_queues``), bare drain, then the worker on the same backlog."""
        drain_queue = self.queues.single(f"{case.key}.drain")
        env = self.queues.worker_env(case.key)
        old = self.queues.worker_env(f"{case.key}-baseline") if self.baseline else None
        copies = [drain_queue, env["ACTIVITY_QUEUE"], *([old["ACTIVITY_QUEUE"]] if old else []), *extra_queues]
        preload_s = broker.preload(copies, bodies, quorum=self._quorum_sources())
        self.say(f"{case.title}: preloaded {len(bodies):,} messages into {len(copies)} queues in {preload_s:.1f} s")
        drain = broker.bare_drain(drain_queue, len(bodies))
        self.say(f"{case.title}: bare drain {drain.messages_per_s:,.0f} msg/s "
                 f"({drain.messages_per_s * case.per_message:,.0f} events/s)")
        expected = self.results.events[case.key]
        worker = self._worker(case.key, env, [runs.celery_worker("worker.app")], expected)
        before = None
        if old is not None and self.baseline is not None:
            commit, root = self.baseline
            before = self._worker(f"{case.key}-baseline", old, [runs.celery_worker("worker.app")], expected, root=root)
            self.say(f"{case.title}: {worker.events_per_s / max(1.0, before.events_per_s):.2f} x the events/s of {commit}")
        return CaseResult(case, len(bodies), events.mean_event_bytes(bodies[:1000], case.per_message),
                          preload_s, drain, worker, before)

    def _worker(self, label: str, queues: dict[str, str], commands: list[list[str]], expected: int,
                profiler: Profiler | None = None, faults: list[dict[str, Any]] | None = None,
                root: Path = ROOT) -> runs.RunResult:
        """One measured run of ``commands``, started in ``root`` (a --baseline's tree runs its own code)."""
        assert self.sandbox is not None
        result = runs.measure(
            label=label, commands=commands, env=runs.worker_env(os.environ, queues, self.sandbox, API_KEY),
            sandbox=self.sandbox, expected=expected, root=root, logs=self.logs,
            source_queue=queues["ACTIVITY_QUEUE"], upload_queue=queues["ACTIVITY_UPLOAD_QUEUE"],
            dead_letter_queue=queues["ACTIVITY_DEAD_LETTER_QUEUE"],
            profiler=profiler, faults=faults or [],
        )
        self.say(f"{label}: worker {result.events_per_s:,.0f} events/s in {result.seconds:.1f} s, "
                 f"{result.uploads:,} uploads" + "".join(f"\n      WARNING: {w}" for w in result.warnings))
        return result

    def _latency(self) -> None:
        """The same backlog of ``--latency-assets`` asset_ids (100) against the instant API, then the slow one."""
        case, latency = Case(f"single-{self.args.latency_assets}", 1, self.args.latency_assets), self.args.latency
        count = events_for(case, self.args.events)
        bodies = events.bodies(self.queues.run_id, case, count)
        instant_env, slow_env = self.queues.worker_env(f"{case.key}-instant"), self.queues.worker_env(f"{case.key}-slow")
        preload_s = broker.preload([instant_env["ACTIVITY_QUEUE"], slow_env["ACTIVITY_QUEUE"]], bodies)
        self.say(f"{case.title}: preloaded {len(bodies):,} messages into 2 queues in {preload_s:.1f} s")
        del bodies
        instant = self._worker(f"{case.key}-instant", instant_env, [runs.celery_worker("worker.app")], count)
        slow = self._worker(f"{case.key}-latency", slow_env, [runs.celery_worker("worker.app")], count,
                            faults=[{"latency": latency}] if latency > 0 else [])
        self.results.latency = LatencyResult(case, latency, instant, slow)
        self.say(f"{case.title}: {latency * 1000:.0f} ms API at {self.results.latency.ratio:.2f} x the instant API")

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

    def _quorum_sources(self) -> set[str]:
        return {q["ACTIVITY_QUEUE"] for q in self.scale_queues if q.get("ACTIVITY_QUEUE_TYPE") == "quorum"}

    def _scale_out(self, bodies: list[bytes]) -> None:
        """Two worker processes on one backlog, and one process on quorum queues (what a cluster
        runs, on this one node: no replicas to write to), next to the one process of the first
        case (the same backlog, preloaded with it); each process has its UPLOAD_CONCURRENCY threads."""
        two, quorum = self.scale_queues
        reference = next((c.worker for c in self.results.cases if c.case == SCALE_CASE), None)
        if not bodies:  # the first case did not run: preload here, and measure one process too
            bodies = self._scale_bodies()
            one = self.queues.worker_env("scale1")
            copies = [one["ACTIVITY_QUEUE"], two["ACTIVITY_QUEUE"], quorum["ACTIVITY_QUEUE"]]
            preload_s = broker.preload(copies, bodies, quorum=self._quorum_sources())
            self.say(f"scale-out: preloaded {len(bodies):,} messages into {len(copies)} queues in {preload_s:.1f} s")
            reference = self._worker("scale-1", one, [runs.celery_worker("worker.app")], len(bodies))
        assert reference is not None
        double = self._worker("scale-2", two, [runs.celery_worker("worker.app") for _ in range(2)], len(bodies))
        on_quorum = self._worker("scale-quorum", quorum, [runs.celery_worker("worker.app")], len(bodies))
        self.results.scale_out = [("one worker process (the first case)", reference),
                                  ("two worker processes", double),
                                  ("one worker process, quorum queues (one node)", on_quorum)]

    def _kill(self) -> None:
        """A backlog against the slow API; SIGKILL the worker mid-run, let a new one finish."""
        assert self.sandbox is not None
        case = Case("kill", 1, scenarios.SCENARIO_ASSETS)
        stream = list(events.events(self.queues.run_id, case, self.args.kill_events))
        sent = [e["activity_params"]["event_id"] for e in stream]
        queues = self.queues.worker_env("kill")
        preload_s = broker.preload([queues["ACTIVITY_QUEUE"]], [orjson.dumps(e) for e in stream])
        del stream
        self.say(f"kill: preloaded {len(sent):,} single-event messages ({case.assets} asset_ids) in {preload_s:.1f} s; "
                 f"SIGKILL at {self.args.kill_at:.0%} delivered, API latency {self.args.latency * 1000:.0f} ms")
        result = scenarios.run_kill(
            sandbox=self.sandbox, env=runs.worker_env(os.environ, queues, self.sandbox, API_KEY), queues=queues,
            sent=sent, latency=self.args.latency, share=self.args.kill_at, root=ROOT, logs=self.logs, say=self.say)
        self.results.kill = result
        ledger = result.ledger
        self.say(f"kill: {ledger.duplicates if ledger else '?'} duplicates, {result.events_in_flight:,} events in "
                 f"flight at the kill" + "".join(f"\n      WARNING: {w}" for w in result.warnings))

    def _outage(self) -> None:
        """The API down for minutes while events keep coming; default worker settings."""
        assert self.sandbox is not None
        queues = self.queues.worker_env("outage")
        result = scenarios.run_outage(
            sandbox=self.sandbox, env=runs.worker_env(os.environ, queues, self.sandbox, API_KEY), queues=queues,
            run_id=self.queues.run_id, events_count=self.args.outage_events, seconds=self.args.outage,
            latency=self.args.latency, root=ROOT, logs=self.logs, say=self.say)
        self.results.outage = result
        ledger = result.ledger
        self.say(f"outage: {ledger.dead_lettered if ledger else '?'} dead-lettered, {result.requests_down} requests "
                 f"to the down API (bound {result.requests_bound}), drained in {_fmt(result.drain_s)} s, "
                 f"peak RSS {result.rss_peak_mb:.0f} MB" + "".join(f"\n      WARNING: {w}" for w in result.warnings))

    def _accounts(self) -> None:
        """One account's backlog alone, then beside a second account that is down throughout."""
        assert self.sandbox is not None

        def run(label: str, env: dict[str, str], expected: int, faults: list[dict[str, Any]]) -> runs.RunResult:
            return self._worker(label, env, [runs.celery_worker("worker.app")], expected, faults=faults)

        self.results.accounts = accounts.run_accounts(
            queues=self.queues, sandbox=self.sandbox, run_id=self.queues.run_id,
            count=events_for(accounts.CASE, self.args.events), results=RESULTS, run=run, say=self.say)

    def _profile(self, case: Case) -> None:
        """A run of its own on ``case``'s backlog, py-spy sampling the worker throughout."""
        count = events_for(case, self.args.events)
        env = self.queues.worker_env(f"profile-{case.key}")
        broker.preload([env["ACTIVITY_QUEUE"]], events.bodies(self.queues.run_id, case, count))
        raw = RESULTS / f"profile-{case.key}.txt"
        raw.unlink(missing_ok=True)
        profiler = Profiler(raw)
        self.say(f"profile: {case.title}, a run of its own, with py-spy on the worker")
        self._worker(f"profile-{case.key}", env, [runs.celery_worker("worker.app")], count, profiler=profiler)
        if not raw.exists():
            self.results.notes.append(f"py-spy wrote no profile: {profiler.log.decode(errors='replace')[-500:]}")
            return
        self.results.profiles[case.title] = render(raw) + f"\n\nRaw stacks: {raw.relative_to(ROOT)}"

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


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


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

"""The two scenarios that are about what goes wrong, not about speed: the API down for minutes,
and the worker killed mid-run. Each runs the real worker, with its default settings, against
the sandbox, and keeps a ledger: every event carries an id, and ids sent must equal ids
delivered plus ids dead-lettered, duplicates counted apart.

**Outage** (:func:`run_outage`): the sandbox answers 503 to every upload for ``seconds`` while
a producer publishes ``events`` events, spread evenly over the outage; then the API answers
again. What must hold: nothing dead-lettered (the circuit breaker holds the events in RabbitMQ
instead of spending every batch's retries), every event delivered after the recovery, few
requests to the down API (the circuit's probe schedule bounds them), the worker's memory flat
(it stops consuming, so the backlog waits in RabbitMQ, not in the worker).

**SIGKILL** (:func:`run_kill`): a preloaded backlog against a slow API (the sandbox's
latency); once a fixed share is delivered, the worker is SIGKILLed, a new one is started and
finishes. A kill loses nothing (every message is acknowledged only after its outcome), but it
duplicates the events the API already had whose task was not acknowledged yet: the scenario
counts them and sets them beside what was in flight at the kill.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import requests
from kombu import Connection, Queue

from bench import broker, events, runs
from bench.api import SandboxProcess
from bench.procs import Spawned, free_port, peak_rss_mb, rss_mb
from config.settings import Settings
from worker.broker.publisher import Outgoing, Publisher
from worker.upload.circuit import FAILURES_TO_OPEN

#: Distinct asset_ids of both scenarios' events (the middle of the cases' 7 and 1000).
SCENARIO_ASSETS = 100

#: Seconds between two looks at the worker during a scenario (depths, memory, records).
SAMPLE_INTERVAL = 1.0

#: Seconds between two looks at the sandbox while waiting for the kill's moment: the share
#: delivered at the kill is read this precisely.
KILL_POLL_INTERVAL = 0.05

#: Seconds between two progress lines during the outage (it lasts minutes).
PROGRESS_EVERY = 30.0

#: Confirmed groups the outage's producer publishes per second.
PRODUCER_GROUPS_PER_S = 2

#: Seconds without a new delivery after which a recovery is declared stalled, on top of the
#: longest probe interval (the API's return is noticed at the next probe, up to that late).
STALL_MARGIN = 90.0

#: Seconds the queues may take to settle (nothing ready) once every id was delivered.
SETTLE_TIMEOUT = 30.0

#: The worker's log line when the circuit opens, and when it closes (worker.ops.sentry).
CIRCUIT_OPEN = "Circuit OPEN"
CIRCUIT_CLOSED = "circuit CLOSED"

#: Seconds an answer may take, beyond the API's latency, to reach the worker and be
#: acknowledged: a request that arrived within latency + this before the kill was in flight.
ANSWER_SLACK = 0.05

#: An ``event_id`` in JSON written by anyone (spaces around the colon or not).
LOOSE_EVENT_ID_RE = re.compile(rb'"event_id"\s*:\s*"([^"]*)"')

#: A finished upload task in the worker's log: its duration, events and batches.
TASK_DONE_RE = re.compile(r"succeeded in ([0-9.]+)s: \{(?:'account': '[^']*', )?'events': (\d+), 'batches': (\d+)")

#: Seconds before the kill over which the throughput at the kill is measured.
RATE_WINDOW = 2.0

#: Metrics read from the worker just before the kill (gauges, no labels).
KILL_GAUGES: tuple[str, ...] = ("netcore_activity_upload_concurrency_limit", "netcore_activity_uploads_in_flight")


def probes_allowed(base: float, cap: float, duration: float) -> int:
    """Probes the circuit's schedule allows within ``duration`` s after it opened: the first
    after ``base`` s, each next one after an interval twice the last, at most ``cap`` s."""
    count, at, interval = 0, 0.0, base
    while at + interval <= duration:
        at += interval
        count += 1
        interval = min(cap, interval * 2)
    return count


def scrape(port: int, names: Sequence[str], timeout: float = 2.0) -> dict[str, float]:
    """Values of the gauges ``names`` on the worker's ``/metrics`` (those it answers), summed over
    their labels (one series per account)."""
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=timeout).text
    except requests.RequestException:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        name = series.partition("{")[0]
        if name in names:
            found[name] = found.get(name, 0.0) + float(value)
    return found


def dead_letter_ids(bodies: Sequence[bytes]) -> list[str]:
    """The ``event_id`` of each dead letter's event, or found in its raw body (a ``malformed``
    letter keeps the body as text, inside the envelope's JSON: read it out first)."""
    ids: list[str] = []
    for body in bodies:
        text = body
        try:
            envelope = orjson.loads(body)
        except orjson.JSONDecodeError:
            envelope = None
        if isinstance(envelope, dict):
            event = envelope.get("event")
            params = event.get("activity_params") if isinstance(event, dict) else None
            if isinstance(params, dict) and isinstance(params.get("event_id"), str):
                ids.append(params["event_id"])
                continue
            if isinstance(envelope.get("raw"), str):
                text = envelope["raw"].encode()
        ids.extend(match.decode() for match in LOOSE_EVENT_ID_RE.findall(text))
    return ids


@dataclass
class Ledger:
    """Ids sent against ids the API stored and ids dead-lettered."""

    sent: int
    delivered_unique: int
    delivered_copies: int
    dead_lettered: int  #: dead letters in the run's dead-letter queues
    dead_lettered_ids: int  #: distinct sent ids among them
    missing: int  #: sent, neither delivered nor dead-lettered
    unexpected: int  #: delivered ids nobody sent (a bug of the benchmark or of the sandbox)

    @property
    def duplicates(self) -> int:
        """Copies the API stored beyond the first of each event."""
        return self.delivered_copies - self.delivered_unique

    @property
    def balanced(self) -> bool:
        """Every id sent is delivered or dead-lettered, and nothing else arrived."""
        return self.missing == 0 and self.unexpected == 0

    @classmethod
    def of(cls, sent: Sequence[str], delivered: Counter[str], dead_ids: Sequence[str], dead_count: int) -> Ledger:
        sent_set = set(sent)
        dead_set = set(dead_ids) & sent_set
        delivered_set = set(delivered)
        return cls(
            sent=len(sent_set), delivered_unique=len(delivered_set & sent_set),
            delivered_copies=sum(n for i, n in delivered.items() if i in sent_set),
            dead_lettered=dead_count, dead_lettered_ids=len(dead_set),
            missing=len(sent_set - delivered_set - dead_set), unexpected=len(delivered_set - sent_set),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "duplicates": self.duplicates, "balanced": self.balanced}


class PacedProducer:
    """Publishes events in confirmed groups spread evenly over ``seconds``, in a thread of its
    own, as a steady stream of producers would during an outage; keeps every id it sent."""

    def __init__(self, queue: str, stream: Iterator[dict[str, Any]], count: int, seconds: float) -> None:
        self.queue = queue
        self.stream = stream
        self.count = count
        self.seconds = seconds
        self.sent: list[str] = []
        self.started_at = 0.0
        self.finished_at: float | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-producer", daemon=True)

    def start(self) -> PacedProducer:
        self.started_at = time.time()
        self._thread.start()
        return self

    def _run(self) -> None:
        groups = max(1, int(self.seconds * PRODUCER_GROUPS_PER_S))
        publisher = Publisher(broker.BROKER_URL, confirm_timeout=broker.PRELOAD_CONFIRM_TIMEOUT)
        try:
            with Connection(broker.BROKER_URL, connect_timeout=10) as connection:
                Queue(self.queue, durable=True)(connection.default_channel).declare()
            for group in range(groups):
                due = self.started_at + group * self.seconds / groups
                if self._stop.wait(max(0.0, due - time.time())):
                    return
                size = self.count * (group + 1) // groups - self.count * group // groups
                batch = [next(self.stream) for _ in range(size)]
                publisher.publish([Outgoing(self.queue, orjson.dumps(e)) for e in batch])
                self.sent.extend(e["activity_params"]["event_id"] for e in batch)
            self.finished_at = time.time()
        except Exception as exc:  # reported with the results: the ledger then shows what was sent
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            publisher.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@dataclass
class OutageResult:
    """What the outage scenario measured (times in seconds from the outage's start)."""

    seconds: float  #: how long the API answered 503
    events: int  #: events the producer was to publish during it
    asset_ids: int
    api_latency: float  #: the API's latency before, during and after (503s come as late)
    upload_concurrency: int
    probe_base: float
    probe_max: float
    failures_to_open: int = FAILURES_TO_OPEN
    ledger: Ledger | None = None
    published_by: float | None = None  #: when the producer's last group was confirmed
    requests_down: int = 0  #: upload requests the down API answered 503
    requests_before_open: int = 0  #: of those, before the circuit opened (and in flight then)
    probes: int = 0  #: of those, after it opened (the probes)
    probes_allowed: int = 0  #: the most the probe schedule allows in the outage
    requests_bound: int = 0  #: FAILURES_TO_OPEN + UPLOAD_CONCURRENCY + probes_allowed
    request_times: list[float] = field(default_factory=list)  #: of the requests to the down API
    circuit_opened_at: float | None = None
    circuit_closed_at: float | None = None
    circuit_opened: int = 0  #: "Circuit OPEN" lines in the worker's log
    circuit_closed: int = 0
    delivered_during: int = 0  #: events accepted while the API was down (must be 0)
    first_delivery_after: float | None = None  #: seconds from the API's return to its first 200
    drain_s: float | None = None  #: from the API's return until every event was delivered
    drain_after_close_s: float | None = None  #: from the circuit's closing until then
    drain_99_s: float | None = None  #: from the API's return until 99 % of the events were delivered
    #: Upload tasks waiting in each delay queue when the API came back (rung ms -> tasks).
    delayed_at_recovery: dict[str, int] = field(default_factory=dict)
    drain_events_per_s: float | None = None
    source_peak: int = 0  #: most messages ready in the source queue at one look
    upload_peak: int = 0  #: most upload tasks ready at one look
    delayed_peak: int = 0  #: most upload tasks waiting in the delay queues at one look
    rss_peak_mb: float = 0.0  #: the worker's VmHWM
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  #: (s, VmRSS MB) every ~10 s
    left_in_queues: dict[str, int] = field(default_factory=dict)
    log_problems: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ledger"] = self.ledger.to_dict() if self.ledger else None
        return data


@dataclass
class KillResult:
    """What the SIGKILL scenario measured."""

    events: int
    asset_ids: int
    api_latency: float
    kill_share: float  #: share of the events delivered when the kill was due
    ledger: Ledger | None = None
    delivered_at_kill: int = 0  #: events the API had stored at the kill (copies)
    limit_at_kill: float | None = None  #: upload_concurrency_limit, read just before the kill
    uploads_in_flight_metric: float | None = None  #: uploads_in_flight, read just before the kill
    requests_in_flight: int = 0  #: requests the API was holding at the kill (arrived < latency before)
    events_in_flight: int = 0  #: their events
    events_per_s_at_kill: float = 0.0  #: events arriving at the API over the seconds before the kill
    little_estimate: float = 0.0  #: events_per_s_at_kill x latency: events in flight by Little's law
    duplicates_in_flight: int = 0  #: duplicates whose first copy was in a request in flight at the kill
    duplicates_earlier: int = 0  #: ... first copy earlier (a batch delivered before, its task unacked)
    #: ... both copies after the kill: an upload task already published and the source message,
    #: not yet acknowledged, redelivered and batched again by the new worker.
    duplicates_after: int = 0
    earliest_duplicate_s: float | None = None  #: how long before the kill the oldest one arrived
    tasks_seen: int = 0  #: upload tasks finished by either worker (the statistics below)
    batches_per_task: float | None = None  #: their batches (requests), weighted by events
    task_seconds: float | None = None  #: how long they held their message, weighted by events
    hold_estimate: float = 0.0  #: throughput x task_seconds: events in unacknowledged tasks (Little)
    returned_source: int | None = None  #: messages back in the source queue after the kill
    returned_uploads: int | None = None  #: upload tasks back in the upload queue after the kill
    restart_to_done_s: float | None = None  #: from the kill until every event was delivered
    log_problems: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def explanation(self) -> str:
        """Why a kill costs what it costs, with this run's numbers: each kind of duplicate, the
        moment that makes it, and what does not count."""
        dup = self.ledger.duplicates if self.ledger else 0
        per_task = f"{self.batches_per_task:.1f}" if self.batches_per_task is not None else "?"
        hold = f"{self.task_seconds:.2f}" if self.task_seconds is not None else "?"
        returned = _num(self.returned_source)
        if self.duplicates_after:
            source = (f"{self.duplicates_after:,} more were delivered twice after the kill: their upload task was "
                      f"already published, but their source message not yet acknowledged, so it came back (with "
                      f"{returned} others) and the new worker batched it again: the time from handing an event on "
                      f"to acknowledging its source message costs the same way.")
        else:
            source = (f"The {returned} source messages that came back (the prefetch window) had not been handed on "
                      f"yet: delivered once.")
        return (
            f"Why: a SIGKILL duplicates what had already left for the API, or for an upload task, while RabbitMQ "
            f"still counted its message unacknowledged; by Little's law that is throughput x the time between the "
            f"two. {dup:,} here. {self.duplicates_in_flight:,} were in the {self.requests_in_flight} requests in "
            f"flight (the API stores them although nobody reads the answer): throughput x round trip = "
            f"{self.events_per_s_at_kill:,.0f} events/s x {self.api_latency:.2f} s = {self.little_estimate:,.0f}. "
            f"{self.duplicates_earlier:,} were in batches sent earlier by tasks not yet acknowledged: a task "
            f"uploads its bundle's batches ({per_task} here, event-weighted) one after the other and is "
            f"acknowledged once at the end, so it holds its message {hold} s, not one round trip (throughput x "
            f"{hold} s = {self.hold_estimate:,.0f} for both). {source} Neither the prefetch window nor the "
            f"concurrency ceiling is what a kill costs; were every message acknowledged one round trip after "
            f"its events left, a kill would cost about {self.little_estimate:,.0f}."
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ledger"] = self.ledger.to_dict() if self.ledger else None
        data["explanation"] = self.explanation
        return data


def _num(value: float | int | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def _settings(env: Mapping[str, str]) -> Settings:
    return Settings.from_env(env, require_api=False)


def _start_worker(name: str, env: Mapping[str, str], root: Path, logs: Path) -> Spawned:
    worker = Spawned(name, runs.celery_worker("worker.app"), env, logs / f"{name}.log", root)
    worker.start(runs.READY, CIRCUIT_OPEN, CIRCUIT_CLOSED)
    worker.wait_for(runs.READY, runs.READY_TIMEOUT)
    return worker


def _seen(worker: Spawned, text: str) -> float | None:
    try:
        return worker.wait_for(text, 0)
    except RuntimeError:
        return None


def _wait_for_ids(sandbox: SandboxProcess, sent: Sequence[str], stall: float, workers: Sequence[Spawned],
                  warnings: list[str], label: str) -> None:
    """Poll until every id of ``sent`` was delivered, a stall of ``stall`` s, or a dead worker.

    The ids are read (every stored event: costly) only once as many events as were sent are
    stored, then every few seconds: duplicates make the count run ahead of the distinct ids.
    """
    wanted = set(sent)
    last_count, last_change = -1, time.monotonic()
    while True:
        count = sandbox.poll()
        if count >= len(wanted) and wanted <= set(sandbox.event_ids()):
            return
        now = time.monotonic()
        if count != last_count:
            last_count, last_change = count, now
        elif now - last_change > stall:
            warnings.append(f"STALLED ({label}): no upload for {stall:.0f} s at {count:,} events stored")
            return
        if not all(w.alive() for w in workers):
            warnings.append(f"the worker exited ({label})")
            return
        time.sleep(0.5 if count < len(wanted) else 5.0)


def _settle(watch: broker.QueueWatch) -> dict[str, int]:
    """Wait until no queue watched holds a ready message (or the timeout); return what is left."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        left = {name: n for name, n in watch.sample().items() if n}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _dead_letters(queues: Mapping[str, str]) -> tuple[list[str], int]:
    """(ids, count) of what the run's dead-letter queues hold (they are emptied: the run's own)."""
    dead_queue = queues["ACTIVITY_DEAD_LETTER_QUEUE"]
    bodies = broker.read_all(dead_queue) + broker.read_all(f"{dead_queue}.unhandled")
    return dead_letter_ids(bodies), len(bodies)


def run_outage(*, sandbox: SandboxProcess, env: Mapping[str, str], queues: Mapping[str, str], run_id: str,
               events_count: int, seconds: float, latency: float, root: Path, logs: Path,
               say: Callable[[str], None]) -> OutageResult:
    """See the module docstring. ``env``: the worker's environment (default settings)."""
    settings = _settings(env)
    base = max(settings.retry_backoff, 0.1)  # as worker.runtime builds the circuit
    allowed = probes_allowed(base, settings.probe_interval_max, seconds)
    result = OutageResult(seconds, events_count, SCENARIO_ASSETS, latency, settings.upload_concurrency, base,
                          settings.probe_interval_max, probes_allowed=allowed,
                          requests_bound=FAILURES_TO_OPEN + settings.upload_concurrency + allowed)
    normal = [{"latency": latency}] if latency > 0 else []
    sandbox.reset(normal)
    source, upload = queues["ACTIVITY_QUEUE"], queues["ACTIVITY_UPLOAD_QUEUE"]
    delays = broker.delay_queues(env)
    worker = _start_worker("outage-worker", env, root, logs)
    watch = broker.QueueWatch([source, upload, *delays])
    producer: PacedProducer | None = None
    try:
        sandbox.add_faults([{"status": 503}])  # after the latency rule: a 503 comes as late as a 200
        started = time.time()
        stream = events.events(run_id, events.Case("outage", 1, SCENARIO_ASSETS), events_count)
        producer = PacedProducer(source, stream, events_count, seconds).start()
        say(f"outage: the API answers 503 for {seconds:.0f} s; {events_count:,} events published meanwhile")
        end, next_line, next_rss = started + seconds, started + PROGRESS_EVERY, started
        while (now := time.time()) < end:
            _sample(watch, source, upload, result)
            if now >= next_rss:
                result.rss_samples.append((round(now - started, 1), rss_mb(worker.pid) or 0.0))
                next_rss = now + 10.0
            if now >= next_line:
                down = sum(1 for r in sandbox.records_since(0) if r.get("status") == 503)
                say(f"outage: {now - started:.0f} of {seconds:.0f} s, {len(producer.sent):,} published, "
                    f"{result.source_peak:,} ready at most in the source queue, {down} requests to the down API, "
                    f"worker RSS {rss_mb(worker.pid) or 0.0:.0f} MB")
                next_line = now + PROGRESS_EVERY
            if not worker.alive():
                result.warnings.append("the worker exited during the outage")
                break
            sandbox.poll()
            time.sleep(min(SAMPLE_INTERVAL, max(0.0, end - time.time())))
        producer.join(60)
        waiting = watch.sample()
        sandbox.set_faults(normal)
        back = time.time()
        result.delayed_at_recovery = {name.rsplit(".", 1)[-1]: n for name, n in waiting.items()
                                      if name in delays and n}
        if producer.error:
            result.warnings.append(f"the producer failed: {producer.error}")
        if producer.finished_at is None:
            result.warnings.append(f"the producer had not finished when the API came back "
                                   f"({len(producer.sent):,} of {events_count:,} sent)")
            producer.stop()
        else:
            result.published_by = producer.finished_at - started
        say(f"outage: the API answers again; {len(producer.sent):,} events to deliver")
        _wait_for_ids(sandbox, producer.sent, settings.probe_interval_max + STALL_MARGIN, [worker],
                      result.warnings, "after the outage")
        result.left_in_queues = _settle(watch)
        result.rss_peak_mb = peak_rss_mb(worker.pid) or 0.0
        _outage_tally(result, sandbox, worker, producer.sent, queues, started, back)
    finally:
        if producer is not None:
            producer.stop()
        watch.close()
        worker.kill()
    result.log_problems = runs.log_problems_of([worker])
    return result


def _sample(watch: broker.QueueWatch, source: str, upload: str, result: OutageResult) -> None:
    depths = watch.sample()
    result.source_peak = max(result.source_peak, depths.get(source) or 0)
    result.upload_peak = max(result.upload_peak, depths.get(upload) or 0)
    delayed = sum(n or 0 for name, n in depths.items() if name not in (source, upload))
    result.delayed_peak = max(result.delayed_peak, delayed)


def _outage_tally(result: OutageResult, sandbox: SandboxProcess, worker: Spawned, sent: Sequence[str],
                  queues: Mapping[str, str], started: float, back: float) -> None:
    records = sandbox.progress().records
    down = [r for r in records if r.get("status") == 503]
    result.requests_down = len(down)
    result.request_times = [round(float(r["at"]) - started, 3) for r in down]
    opened, closed = _seen(worker, CIRCUIT_OPEN), _seen(worker, CIRCUIT_CLOSED)
    result.circuit_opened_at = None if opened is None else opened - started
    result.circuit_closed_at = None if closed is None else closed - started
    output = worker.output()
    result.circuit_opened, result.circuit_closed = output.count(CIRCUIT_OPEN), output.count(CIRCUIT_CLOSED)
    if opened is not None:
        # requests that reached the API before the log line (those in flight then included)
        # are the ones that opened it; later ones are probes
        result.requests_before_open = sum(1 for r in down if float(r["at"]) <= opened)
        result.probes = sum(1 for r in down if float(r["at"]) > opened)
    ok = [r for r in records if r.get("status") == 200]
    result.delivered_during = sum(int(r["events"]) for r in ok if float(r["at"]) < back)
    after = [float(r["at"]) for r in ok if float(r["at"]) >= back]
    result.first_delivery_after = min(after) - back if after else None
    deliveries = sandbox.deliveries()
    wanted = set(sent)
    if deliveries is not None:
        first: dict[str, float] = {}
        for at, ids in deliveries:
            for event_id in ids:
                first.setdefault(event_id, at)
        if wanted and wanted <= set(first):
            times = sorted(first[i] for i in wanted)
            drained_at = times[-1]
            result.drain_99_s = times[max(0, int(0.99 * len(times)) - 1)] - back
            result.drain_s = drained_at - back
            result.drain_events_per_s = len(wanted) / result.drain_s if result.drain_s > 0 else None
            if closed is not None and closed > back:
                result.drain_after_close_s = drained_at - closed
    dead_ids, dead_count = _dead_letters(queues)
    result.ledger = Ledger.of(sent, sandbox.event_ids(), dead_ids, dead_count)
    _judge_outage(result)


def _judge_outage(result: OutageResult) -> None:
    ledger = result.ledger
    if ledger is None:
        return
    if ledger.dead_lettered:
        result.warnings.append(f"{ledger.dead_lettered:,} events dead-lettered during an outage")
    if ledger.missing:
        result.warnings.append(f"LOST EVENTS: {ledger.missing:,} of {ledger.sent:,} neither delivered nor "
                               "dead-lettered")
    if result.requests_down > result.requests_bound:
        result.warnings.append(f"{result.requests_down} requests to the down API, more than the probe schedule's "
                               f"bound of {result.requests_bound}")
    if result.delivered_during:
        result.warnings.append(f"{result.delivered_during:,} events accepted while the API was down (the fault "
                               "did not hold)")
    if result.left_in_queues:
        result.warnings.append(f"messages left in the queues: {result.left_in_queues}")


def run_kill(*, sandbox: SandboxProcess, env: Mapping[str, str], queues: Mapping[str, str],
             sent: Sequence[str], latency: float, share: float, root: Path, logs: Path,
             say: Callable[[str], None]) -> KillResult:
    """See the module docstring; the backlog of ``sent`` ids is already in the source queue."""
    expected = len(sent)
    result = KillResult(expected, SCENARIO_ASSETS, latency, share)
    sandbox.reset([{"latency": latency}] if latency > 0 else [])
    port = free_port()
    source, upload = queues["ACTIVITY_QUEUE"], queues["ACTIVITY_UPLOAD_QUEUE"]
    watch = broker.QueueWatch([source, upload])
    first = _start_worker("kill-worker-1", {**env, "METRICS_PORT": str(port)}, root, logs)
    second: Spawned | None = None
    try:
        target = int(share * expected)
        last_count, last_change = -1, time.monotonic()
        while (count := sandbox.poll()) < target:
            now = time.monotonic()
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change > runs.STALL_SECONDS or not first.alive():
                result.warnings.append(f"the first worker stalled or died at {count:,} events, before the kill")
                break
            time.sleep(KILL_POLL_INTERVAL)
        gauges = scrape(port, KILL_GAUGES)
        before = watch.sample()
        killed_at = time.time()
        first.kill(signal.SIGKILL)
        result.delivered_at_kill = sandbox.poll()
        result.limit_at_kill = gauges.get(KILL_GAUGES[0])
        result.uploads_in_flight_metric = gauges.get(KILL_GAUGES[1])
        time.sleep(1.0)  # RabbitMQ requeues a dead connection's unacknowledged messages at once
        after = watch.sample()
        result.returned_source = _grew(before.get(source), after.get(source))
        result.returned_uploads = _grew(before.get(upload), after.get(upload))
        say(f"kill: SIGKILL at {result.delivered_at_kill:,} of {expected:,} events delivered "
            f"(limit {result.limit_at_kill}, {result.uploads_in_flight_metric} uploads in flight); "
            f"starting a new worker")
        second = _start_worker("kill-worker-2", env, root, logs)
        _wait_for_ids(sandbox, sent, runs.STALL_SECONDS, [second], result.warnings, "after the kill")
        _settle(watch)
        _kill_tally(result, sandbox, sent, queues, killed_at)
        # both workers' tasks: those the first finished before the kill are biased to the short ones
        _task_stats(result, first.output() + second.output())
    finally:
        watch.close()
        first.kill()
        if second is not None:
            second.kill()
    result.log_problems = runs.log_problems_of([w for w in (first, second) if w is not None])
    if result.ledger is not None and result.ledger.missing:
        result.warnings.append(f"LOST EVENTS: {result.ledger.missing:,} of {expected:,} never delivered")
    return result


def _grew(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else max(0, after - before)


def _task_stats(result: KillResult, output: str) -> None:
    """Batches per upload task and the seconds each held its message, from the worker's log
    (weighted by events: a duplicate is an event)."""
    tasks = [(float(m[1]), int(m[2]), int(m[3])) for m in TASK_DONE_RE.finditer(output)]
    events_total = sum(n for _, n, _ in tasks)
    result.tasks_seen = len(tasks)
    if events_total:
        result.batches_per_task = sum(n * b for _, n, b in tasks) / events_total
        result.task_seconds = sum(n * d for d, n, _ in tasks) / events_total
    if result.task_seconds is not None:
        result.hold_estimate = result.events_per_s_at_kill * result.task_seconds


def _kill_tally(result: KillResult, sandbox: SandboxProcess, sent: Sequence[str], queues: Mapping[str, str],
                killed_at: float) -> None:
    deliveries = sandbox.deliveries()
    dead_ids, dead_count = _dead_letters(queues)
    copies: Counter[str] = Counter()
    first: dict[str, float] = {}
    if deliveries is None:
        result.warnings.append("the sandbox's records and stored events do not match: no per-event timing")
        copies = sandbox.event_ids()
    else:
        for at, ids in deliveries:
            for event_id in ids:
                copies[event_id] += 1
                first.setdefault(event_id, at)
        last = max((at for at, _ in deliveries), default=killed_at)
        result.restart_to_done_s = last - killed_at
    result.ledger = Ledger.of(sent, copies, dead_ids, dead_count)
    latency = result.api_latency
    window = latency + ANSWER_SLACK
    records = [r for r in sandbox.progress().records if r.get("status") == 200]
    held = [r for r in records if killed_at - window < float(r["at"]) <= killed_at]
    result.requests_in_flight = len(held)
    result.events_in_flight = sum(int(r["events"]) for r in held)
    recent = sum(int(r["events"]) for r in records if killed_at - RATE_WINDOW < float(r["at"]) <= killed_at)
    result.events_per_s_at_kill = recent / RATE_WINDOW
    result.little_estimate = result.events_per_s_at_kill * latency
    ages: list[float] = []
    for event_id, n in copies.items():
        if n < 2 or event_id not in first:
            continue
        age = killed_at - first[event_id]
        if age < 0:
            result.duplicates_after += n - 1
        elif age <= window:
            result.duplicates_in_flight += n - 1
            ages.append(age)
        else:
            result.duplicates_earlier += n - 1
            ages.append(age)
    result.earliest_duplicate_s = max(ages) if ages else None

"""The benchmark's results: markdown tables for people, ``bench-results/latest.json`` for tools.

Ratios come first: on a shared machine an absolute figure moves from run to run by more than
most changes to the worker would, while the worker and its baselines, measured minutes apart
on the same broker, move together. The targets say plainly which goals are met and by how
much, with the numbers, so nobody has to read them off the tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.accounts import PACED_LIMIT, AccountsResult
from bench.accounts import TARGET as TARGET_ACCOUNTS_RATIO
from bench.broker import DrainResult
from bench.events import Case
from bench.runs import RunResult
from bench.scenarios import KillResult, OutageResult

#: A single-event case must reach this share of the bare drain's events/s.
TARGET_DRAIN_RATIO = 0.8

#: A single-event case's worker CPU per event, at most this many times the bare consumer's.
TARGET_CPU_RATIO = 1.2

#: With ``--baseline``: the 7-asset_id array case's events/s, at least this many times the baseline's
#: (the 1000-asset_id cases are held to 0.5 x the 7-asset_id ones instead).
TARGET_ARRAY_BASELINE_RATIO = 2.0
TARGET_BASELINE_CASES: tuple[str, ...] = ("array50-7",)

#: Every case must be this many times faster than the naive design.
TARGET_NAIVE_RATIO = 20.0

#: Peak resident memory of any worker process, MB.
TARGET_RSS_MB = 300.0

#: Events/s for messages of 50 events.
TARGET_ARRAY_EVENTS_PER_S = 25_000.0

#: 100 asset_ids: the rate against the slow API (``--latency``) over the rate against the instant one.
TARGET_LATENCY_RATIO = 0.8

#: The rate with 1000 asset_ids over the rate with 7, for the same shape of message.
TARGET_MANY_ASSETS_RATIO = 0.5

#: A SIGKILL may duplicate at most this many times the events in requests in flight at the kill
#: (throughput x round trip): more requests in flight must not mean many more duplicates.
TARGET_KILL_DUPLICATES_RATIO = 2.0

#: Case keys compared by that ratio: (7 asset_ids, 1000 asset_ids).
ASSET_PAIRS: tuple[tuple[str, str], ...] = (("single-7", "single-1000"), ("array50-7", "array50-1000"))


@dataclass
class CaseResult:
    """One case: its backlog, its bare drain and the worker's run."""

    case: Case
    messages: int
    event_bytes: float
    preload_s: float
    drain: DrainResult
    worker: RunResult
    baseline: RunResult | None = None  #: the --baseline commit's worker on the same backlog

    @property
    def drain_events_per_s(self) -> float:
        return self.drain.messages_per_s * self.case.per_message

    @property
    def drain_cpu_us(self) -> float:
        """The bare consumer's CPU per event."""
        return self.drain.cpu_us_per_message() / self.case.per_message

    @property
    def cpu_ratio(self) -> float | None:
        """The worker's CPU per event over the bare consumer's."""
        return self.worker.worker_cpu_us / self.drain_cpu_us if self.drain_cpu_us else None

    @property
    def cpu_ratio_with_broker(self) -> float | None:
        """The same, the broker's CPU added to each side."""
        broker, worker_broker = self.drain.broker_cpu_us_per_message(), self.worker.broker_cpu_us
        if broker is None or worker_broker is None or not self.drain_cpu_us:
            return None
        return (self.worker.worker_cpu_us + worker_broker) / (self.drain_cpu_us + broker / self.case.per_message)

    @property
    def ratio_to_baseline(self) -> float | None:
        if self.baseline is None or not self.baseline.events_per_s:
            return None
        return self.worker.events_per_s / self.baseline.events_per_s

    @property
    def ratio_to_drain(self) -> float:
        return self.worker.events_per_s / self.drain_events_per_s if self.drain_events_per_s else 0.0

    def ratio_to_naive(self, naive: RunResult | None) -> float | None:
        if naive is None or not naive.events_per_s:
            return None
        return self.worker.events_per_s / naive.events_per_s


@dataclass
class LatencyResult:
    """One backlog against the instant API, then against the slow one."""

    case: Case
    latency: float  #: seconds per request of the slow run
    instant: RunResult
    slow: RunResult

    @property
    def ratio(self) -> float:
        return self.slow.events_per_s / self.instant.events_per_s if self.instant.events_per_s else 0.0

    @property
    def steady_ratio(self) -> float | None:
        a, b = self.instant.steady_events_per_s, self.slow.steady_events_per_s
        return b / a if a and b else None


@dataclass
class AssetRatio:
    """The same shape of message with 7 and with 1000 asset_ids."""

    shape: str
    few: CaseResult
    many: CaseResult

    @property
    def ratio(self) -> float:
        few = self.few.worker.events_per_s
        return self.many.worker.events_per_s / few if few else 0.0


@dataclass
class Target:
    """One goal, for one case or setup, and whether the run met it."""

    goal: str
    subject: str
    value: float
    limit: float
    met: bool
    text: str


@dataclass
class Results:
    """Everything one benchmark run measured."""

    events: dict[str, int]  #: events per case, by case key
    naive_events: int
    cases: list[CaseResult] = field(default_factory=list)
    naive: RunResult | None = None
    scale_out: list[tuple[str, RunResult]] = field(default_factory=list)
    #: py-spy's profile as markdown, by case title (--profile).
    profiles: dict[str, str] = field(default_factory=dict)
    #: The --baseline commit, when there is one.
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)
    latency: LatencyResult | None = None
    kill: KillResult | None = None
    outage: OutageResult | None = None
    accounts: AccountsResult | None = None

    def asset_ratios(self) -> list[AssetRatio]:
        by_key = {c.case.key: c for c in self.cases}
        return [AssetRatio("single-event messages" if few == "single-7" else "50-event arrays", by_key[few], by_key[many])
                for few, many in ASSET_PAIRS if few in by_key and many in by_key]

    def targets(self) -> list[Target]:
        out: list[Target] = []
        if self.latency is not None:
            lat = self.latency
            out.append(_at_least(f"{lat.latency * 1000:.0f} ms API >= {TARGET_LATENCY_RATIO} x the instant API",
                                 lat.case.title, lat.ratio, TARGET_LATENCY_RATIO,
                                 f"{lat.ratio:.2f} x ({lat.slow.events_per_s:,.0f} vs {lat.instant.events_per_s:,.0f} "
                                 "events/s)"))
            for name, run in (("instant API", lat.instant), (f"{lat.latency * 1000:.0f} ms API", lat.slow)):
                out.append(_exactly_once(f"{lat.case.title}, {name}", run))
        for pair in self.asset_ratios():
            out.append(_at_least(f"1000 asset_ids >= {TARGET_MANY_ASSETS_RATIO} x 7 asset_ids", pair.shape, pair.ratio,
                                 TARGET_MANY_ASSETS_RATIO,
                                 f"{pair.ratio:.2f} x ({pair.many.worker.events_per_s:,.0f} vs "
                                 f"{pair.few.worker.events_per_s:,.0f} events/s)"))
        if self.outage is not None and self.outage.ledger is not None:
            o, ledger = self.outage, self.outage.ledger
            subject = f"outage of {o.seconds:.0f} s, {o.events:,} events"
            out.append(Target("nothing dead-lettered in an outage", subject, ledger.dead_lettered, 0,
                              ledger.dead_lettered == 0, f"{ledger.dead_lettered:,} dead-lettered"))
            out.append(Target("every event delivered after the outage", subject, ledger.delivered_unique, ledger.sent,
                              ledger.balanced and ledger.missing == 0,
                              f"{ledger.delivered_unique:,} of {ledger.sent:,} delivered, {ledger.missing:,} missing, "
                              f"{ledger.duplicates:,} duplicates"))
            out.append(Target("requests to the down API within the probe schedule", subject, o.requests_down,
                              o.requests_bound, o.requests_down <= o.requests_bound,
                              f"{o.requests_down} <= {o.requests_bound}" if o.requests_down <= o.requests_bound
                              else f"{o.requests_down} > {o.requests_bound}"))
            out.append(Target("peak RSS < 300 MB", subject, o.rss_peak_mb, TARGET_RSS_MB, o.rss_peak_mb < TARGET_RSS_MB,
                              f"{o.rss_peak_mb:.0f} MB"))
        if self.accounts is not None:
            a = self.accounts
            subject = f"{a.events:,} events of one account, {a.down_events:,} of a second one"
            out.append(_at_least(f"the healthy account beside a down one >= {TARGET_ACCOUNTS_RATIO} x beside it "
                                 "healthy", subject, a.isolation, TARGET_ACCOUNTS_RATIO,
                                 f"{a.isolation:.2f} x ({a.beside.events_per_s:,.0f} vs {a.both_healthy_rate:,.0f} "
                                 f"events/s; {a.down_requests} requests to the down account)"))
            out.append(_at_least(f"the healthy account beside a down one >= {TARGET_ACCOUNTS_RATIO} x its rate alone",
                                 subject, a.ratio, TARGET_ACCOUNTS_RATIO,
                                 f"{a.ratio:.2f} x ({a.beside.events_per_s:,.0f} vs {a.alone.events_per_s:,.0f} "
                                 "events/s; the worker's CPU the limit, and it reads half as many messages again)"))
            if a.paced_alone is not None and a.paced_beside is not None:
                out.append(_at_least(
                    f"the healthy account beside a down one >= {TARGET_ACCOUNTS_RATIO} x its rate alone, its API "
                    f"taking {PACED_LIMIT} uploads a second", subject, a.paced_ratio, TARGET_ACCOUNTS_RATIO,
                    f"{a.paced_ratio:.2f} x ({a.paced_beside.events_per_s:,.0f} vs "
                    f"{a.paced_alone.events_per_s:,.0f} events/s)"))
                out.append(_exactly_once(f"{subject}, paced, the healthy account beside the down one",
                                         a.paced_beside))
            out.append(_exactly_once(f"{subject}, the healthy account beside the down one", a.beside))
            out.append(_exactly_once(f"{subject}, both healthy", a.both))
        if self.kill is not None and self.kill.ledger is not None:
            k, ledger = self.kill, self.kill.ledger
            subject = f"SIGKILL at {k.kill_share:.0%} of {k.events:,} events"
            out.append(Target("nothing lost after a SIGKILL", subject, ledger.missing, 0, ledger.missing == 0,
                              f"{ledger.delivered_unique:,} of {ledger.sent:,} delivered"))
            bound = TARGET_KILL_DUPLICATES_RATIO * k.events_in_flight
            out.append(Target(f"a SIGKILL duplicates <= {TARGET_KILL_DUPLICATES_RATIO:g} x the events in requests in "
                              "flight", subject, ledger.duplicates, bound, ledger.duplicates <= bound,
                              f"{ledger.duplicates:,} duplicates, {k.events_in_flight:,} events in "
                              f"{k.requests_in_flight} requests in flight"))
        for c in self.cases:
            title, w = c.case.title, c.worker
            if c.case.per_message == 1:
                out.append(_at_least("events/s >= 0.8 x bare drain", title, c.ratio_to_drain,
                                     TARGET_DRAIN_RATIO, f"{c.ratio_to_drain:.2f} x"))
                if c.cpu_ratio is not None:
                    out.append(Target(f"worker CPU per event <= {TARGET_CPU_RATIO} x the bare consumer's", title,
                                      c.cpu_ratio, TARGET_CPU_RATIO, c.cpu_ratio <= TARGET_CPU_RATIO,
                                      f"{c.cpu_ratio:.2f} x ({w.worker_cpu_us:,.0f} against {c.drain_cpu_us:,.0f} "
                                      "us/event)"))
            else:
                out.append(_at_least("events/s >= 25,000 (50-event messages)", title, w.events_per_s,
                                     TARGET_ARRAY_EVENTS_PER_S, f"{w.events_per_s:,.0f} events/s"))
                if c.ratio_to_baseline is not None and c.baseline is not None and c.case.key in TARGET_BASELINE_CASES:
                    out.append(_at_least(f"events/s >= {TARGET_ARRAY_BASELINE_RATIO:g} x the baseline's "
                                         f"({self.baseline})", title, c.ratio_to_baseline, TARGET_ARRAY_BASELINE_RATIO,
                                         f"{c.ratio_to_baseline:.2f} x ({w.events_per_s:,.0f} against "
                                         f"{c.baseline.events_per_s:,.0f} events/s)"))
            naive = c.ratio_to_naive(self.naive)
            if naive is not None:
                out.append(_at_least("events/s >= 20 x naive", title, naive, TARGET_NAIVE_RATIO, f"{naive:.1f} x"))
            rss = max(w.rss_main_mb, w.rss_child_mb)
            out.append(Target("peak RSS < 300 MB", title, rss, TARGET_RSS_MB, rss < TARGET_RSS_MB,
                              f"{rss:.0f} MB"))
            out.append(_exactly_once(title, w))
        return out

    def warnings(self) -> list[str]:
        runs = [(c.case.title, c.worker) for c in self.cases] + [(f"scale-out: {n}", r) for n, r in self.scale_out]
        runs += [(f"{c.case.title}, baseline {self.baseline}", c.baseline) for c in self.cases if c.baseline]
        if self.latency is not None:
            runs += [(f"{self.latency.case.title}, instant API", self.latency.instant),
                     (f"{self.latency.case.title}, slow API", self.latency.slow)]
        if self.naive is not None:
            runs.append(("naive", self.naive))
        if self.accounts is not None:
            runs += [("one account alone", self.accounts.alone), ("two accounts healthy", self.accounts.both)]
        out = [f"{name}: {warning}" for name, run in runs for warning in run.warnings]
        if self.kill is not None:
            out += [f"SIGKILL scenario: {w}" for w in self.kill.warnings]
        if self.outage is not None:
            out += [f"outage scenario: {w}" for w in self.outage.warnings]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "events_per_case": self.events,
            "naive_events": self.naive_events,
            "total_seconds": round(self.total_seconds, 1),
            "environment": self.environment,
            "baseline": self.baseline,
            "cases": {c.case.key: {
                "title": c.case.title, "messages": c.messages, "events_per_message": c.case.per_message,
                "asset_ids": c.case.assets, "event_bytes": round(c.event_bytes, 1),
                "preload_seconds": round(c.preload_s, 2),
                "bare_drain": {"messages": c.drain.messages, "seconds": round(c.drain.seconds, 3),
                               "messages_per_s": round(c.drain.messages_per_s, 1),
                               "events_per_s": round(c.drain_events_per_s, 1),
                               "cpu_us_per_event": round(c.drain_cpu_us, 2),
                               "broker_cpu_us_per_message": _round(c.drain.broker_cpu_us_per_message(), 2)},
                "worker": c.worker.to_dict(),
                "ratio_to_bare_drain": round(c.ratio_to_drain, 3),
                "cpu_ratio_to_bare_drain": _round(c.cpu_ratio, 3),
                "cpu_ratio_to_bare_drain_with_broker": _round(c.cpu_ratio_with_broker, 3),
                "baseline": c.baseline.to_dict() if c.baseline else None,
                "ratio_to_baseline": _round(c.ratio_to_baseline, 3),
                "ratio_to_naive": _round(c.ratio_to_naive(self.naive), 2),
            } for c in self.cases},
            "naive": self.naive.to_dict() if self.naive else None,
            "latency": None if self.latency is None else {
                "case": self.latency.case.key, "latency_seconds": self.latency.latency,
                "instant": self.latency.instant.to_dict(), "slow": self.latency.slow.to_dict(),
                "ratio": round(self.latency.ratio, 3), "steady_ratio": _round(self.latency.steady_ratio, 3)},
            "asset_ratios": [{"shape": r.shape, "few": r.few.case.key, "many": r.many.case.key,
                              "ratio": round(r.ratio, 3)} for r in self.asset_ratios()],
            "kill": self.kill.to_dict() if self.kill else None,
            "outage": self.outage.to_dict() if self.outage else None,
            "accounts": self.accounts.to_dict() if self.accounts else None,
            "scale_out": [{"setup": name, **run.to_dict()} for name, run in self.scale_out],
            "targets": [t.__dict__ for t in self.targets()],
            "warnings": self.warnings(),
            "notes": self.notes,
            "profiles": self.profiles,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def markdown(self) -> str:
        env = self.environment
        settings = ", ".join(f"{k}={v}" for k, v in (env.get("worker_settings") or {}).items()) or "defaults"
        parts = [f"## Benchmark: worker {env.get('worker_code', '?')}, {env.get('cpus', '?')} CPUs, "
                 f"worker settings: {settings}"]
        parts += [self._case_table(c) for c in self.cases]
        if self.asset_ratios():
            parts.append(self._asset_table())
        if self.latency is not None:
            parts.append(self._latency_table(self.latency))
        if self.naive is not None:
            n = self.naive
            parts.append(f"### Naive design (one task and one new-connection POST per event)\n\n"
                         f"{n.expected:,} events: **{n.events_per_s:,.0f} events/s**, worker CPU "
                         f"{n.worker_cpu_us:,.0f} us/event, broker CPU {_num(n.broker_cpu_us)} us/event, "
                         f"{n.uploads:,} uploads, {n.delivered:,} delivered")
        if self.scale_out:
            parts.append(self._scale_table())
        if self.kill is not None:
            parts.append(_kill_block(self.kill))
        if self.outage is not None:
            parts.append(_outage_block(self.outage))
        if self.accounts is not None:
            parts.append(_accounts_block(self.accounts))
        parts.append(self._targets_block())
        warnings = self.warnings()
        if warnings:
            parts.append("### WARNINGS\n\n" + "\n".join(f"- **{w}**" for w in warnings))
        for title, text in self.profiles.items():
            parts.append(f"### Profile of the worker ({title})\n\n{text}")
        if self.notes:
            parts.append("### Notes\n\n" + "\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)

    def _case_table(self, c: CaseResult) -> str:
        w = c.worker
        naive = c.ratio_to_naive(self.naive)
        single = c.case.per_message == 1
        rows = [
            ("events/s, end to end", f"**{w.events_per_s:,.0f}**",
             "" if single else f">= {TARGET_ARRAY_EVENTS_PER_S:,.0f}"),
            ("events/s, steady (10-90 %)", _num(w.steady_events_per_s), ""),
            ("bare drain (the limit)",
             f"{c.drain_events_per_s:,.0f} events/s ({c.drain.messages_per_s:,.0f} msg/s)", ""),
            ("ratio to bare drain", f"**{c.ratio_to_drain:.2f}**",
             f">= {TARGET_DRAIN_RATIO}" if single else ""),
            ("ratio to naive", f"**{naive:.1f} x**" if naive is not None else "-", f">= {TARGET_NAIVE_RATIO:.0f} x"),
            ("worker CPU", _cpu(w), ""),
            ("bare consumer CPU (broker CPU meanwhile)",
             f"{c.drain_cpu_us:,.1f} us/event ({_num(c.drain.broker_cpu_us_per_message())} us/message)", ""),
            ("worker CPU / bare consumer's (each with its broker CPU)",
             f"**{_num(c.cpu_ratio, 2)} x** ({_num(c.cpu_ratio_with_broker, 2)} x)",
             f"<= {TARGET_CPU_RATIO} x" if single else ""),
            ("broker CPU", f"{_num(w.broker_cpu_us)} us/event", ""),
            ("sandbox API CPU", f"{w.sandbox_cpu_us:,.0f} us/event", ""),
            ("peak RSS", _rss(w), f"< {TARGET_RSS_MB:.0f} MB"),
            ("uploads", f"{w.uploads:,}" + (f" (+{w.failed_uploads:,} not 200)" if w.failed_uploads else ""), ""),
            ("mean batch size", f"{w.mean_batch:,.1f} events", ""),
            ("delivered", f"{w.delivered:,} of {w.expected:,}, {_num(w.unique)} distinct, "
                          f"{_num(w.duplicates)} duplicates", "= N"),
            ("first upload after connecting / last 1 % / longest pause", f"{_num(w.first_upload_s, 2)} s / "
             f"{_num(w.tail_s, 2)} s / {w.longest_gap_s:.2f} s", ""),
            ("backlog read by the consumer after / upload tasks waiting, peak",
             f"{_num(w.source_read_s, 1)} s / {_num(w.upload_backlog_peak)}", ""),
        ]
        if c.baseline is not None:
            b = c.baseline
            rows += [
                (f"baseline {self.baseline}: events/s, end to end (steady)",
                 f"{b.events_per_s:,.0f} ({_num(b.steady_events_per_s)})", ""),
                (f"baseline {self.baseline}: worker CPU", _cpu(b), ""),
                ("against the baseline: events/s, CPU per event",
                 f"**{_num(c.ratio_to_baseline, 2)} x**, "
                 f"{_num(w.worker_cpu_us / b.worker_cpu_us if b.worker_cpu_us else None, 2)} x",
                 f">= {TARGET_ARRAY_BASELINE_RATIO:g} x" if c.case.key in TARGET_BASELINE_CASES else ""),
            ]
        head = (f"### {c.case.title}\n\n{w.expected:,} events in {c.messages:,} messages of "
                f"{c.event_bytes:,.0f} bytes/event (preloaded in {c.preload_s:.1f} s)\n\n"
                "| metric | value | target |\n| --- | ---: | --- |")
        return head + "\n" + "\n".join(f"| {a} | {b} | {t} |" for a, b, t in rows)

    def _asset_table(self) -> str:
        lines = ["### 1000 asset_ids against 7 asset_ids (instant API)", "",
                 "| messages | 7 asset_ids | 1000 asset_ids | ratio | target |", "| --- | ---: | ---: | ---: | --- |"]
        for r in self.asset_ratios():
            lines.append(f"| {r.shape} | {r.few.worker.events_per_s:,.0f} events/s ({r.few.worker.expected:,}) | "
                         f"{r.many.worker.events_per_s:,.0f} events/s ({r.many.worker.expected:,}) | "
                         f"**{r.ratio:.2f} x** | >= {TARGET_MANY_ASSETS_RATIO} x |")
        return "\n".join(lines)

    def _latency_table(self, lat: LatencyResult) -> str:
        ms = f"{lat.latency * 1000:.0f} ms"
        a, b = lat.instant, lat.slow
        rows = [
            ("events/s, end to end", f"**{a.events_per_s:,.0f}**", f"**{b.events_per_s:,.0f}**"),
            ("events/s, steady (10-90 %)", _num(a.steady_events_per_s), _num(b.steady_events_per_s)),
            ("uploads (mean batch)", f"{a.uploads:,} ({a.mean_batch:,.1f})", f"{b.uploads:,} ({b.mean_batch:,.1f})"),
            ("worker CPU", _cpu(a), _cpu(b)),
            ("peak RSS", _rss(a), _rss(b)),
            ("delivered", f"{a.delivered:,}, {_num(a.duplicates)} duplicates",
             f"{b.delivered:,}, {_num(b.duplicates)} duplicates"),
            ("first upload after connecting / last 1 % / longest pause",
             f"{_num(a.first_upload_s, 2)} s / {_num(a.tail_s, 2)} s / {a.longest_gap_s:.2f} s",
             f"{_num(b.first_upload_s, 2)} s / {_num(b.tail_s, 2)} s / {b.longest_gap_s:.2f} s"),
            ("upload tasks waiting, peak", _num(a.upload_backlog_peak), _num(b.upload_backlog_peak)),
        ]
        steady = f", steady {lat.steady_ratio:.2f} x" if lat.steady_ratio is not None else ""
        head = (f"### {lat.case.title}: instant API against a {ms} API\n\n{a.expected:,} events, the same backlog "
                f"twice, UPLOAD_CONCURRENCY={b.concurrency}: the {ms} API at **{lat.ratio:.2f} x** the instant "
                f"API's rate{steady} (target >= {TARGET_LATENCY_RATIO} x)\n\n"
                f"| metric | instant API | {ms} API |\n| --- | ---: | ---: |")
        return head + "\n" + "\n".join(f"| {m} | {x} | {y} |" for m, x, y in rows)

    def _scale_table(self) -> str:
        base = self.scale_out[0][1].events_per_s or 1.0
        lines = ["### Scale-out (single-event messages, 7 asset_ids)", "",
                 "| setup | events/s | vs one process | worker CPU us/event | delivered |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        for name, run in self.scale_out:
            lines.append(f"| {name} | {run.events_per_s:,.0f} | {run.events_per_s / base:.2f} x | "
                         f"{run.worker_cpu_us:,.0f} | {run.delivered:,} of {run.expected:,} |")
        return "\n".join(lines)

    def _targets_block(self) -> str:
        targets = self.targets()
        met = sum(t.met for t in targets)
        lines = [f"### Targets: {met} of {len(targets)} met", ""]
        for t in targets:
            lines.append(f"- [{'met' if t.met else 'MISSED'}] {t.goal} - {t.subject}: {t.text}")
        return "\n".join(lines)


def _at_least(goal: str, subject: str, value: float, limit: float, text: str) -> Target:
    return Target(goal, subject, value, limit, value >= limit, text)


def _exactly_once(subject: str, w: RunResult) -> Target:
    exact = w.delivered == w.expected and w.unique in (None, w.expected) and not w.duplicates
    return Target("every event delivered exactly once", subject, w.delivered, w.expected, exact,
                  f"{w.delivered:,} delivered, {w.unique if w.unique is not None else '?'} distinct of {w.expected:,}")


def _cpu(w: RunResult) -> str:
    """Worker CPU per event; split into main and pool only when there are pool processes."""
    pool = w.worker_cpu_us - w.main_cpu_us
    if w.rss_child_mb:
        return f"{w.worker_cpu_us:,.0f} us/event ({w.main_cpu_us:,.0f} main, {pool:,.0f} pool)"
    return f"{w.worker_cpu_us:,.0f} us/event" + (f" ({w.processes} processes)" if w.processes > 1 else "")


def _rss(w: RunResult) -> str:
    if w.rss_child_mb:
        return f"{w.rss_main_mb:,.0f} MB main / {w.rss_child_mb:,.0f} MB largest pool process"
    return f"{w.rss_main_mb:,.0f} MB"


def _kill_block(k: KillResult) -> str:
    ledger = k.ledger
    ms = f"{k.api_latency * 1000:.0f} ms"
    rows: list[tuple[str, str]] = [
        ("backlog", f"{k.events:,} single-event messages, {k.asset_ids} asset_ids, {ms} API"),
        ("SIGKILL when", f"{k.delivered_at_kill:,} events delivered ({k.kill_share:.0%} due)"),
        ("adaptive limit / uploads in flight at the kill (worker's metrics)",
         f"{_num(k.limit_at_kill)} / {_num(k.uploads_in_flight_metric)}"),
        ("requests in flight at the kill (the API held them)", f"{k.requests_in_flight} ({k.events_in_flight:,} events)"),
        ("throughput at the kill x round trip (Little's law)",
         f"{k.events_per_s_at_kill:,.0f} events/s x {k.api_latency:.2f} s = {k.little_estimate:,.0f} events"),
        ("upload tasks (both workers): batches per task / seconds holding the message (event-weighted)",
         f"{k.tasks_seen:,}: {_num(k.batches_per_task, 1)} / {_num(k.task_seconds, 2)} s"),
        ("events in unacknowledged tasks: throughput x seconds a task holds its message",
         f"{k.hold_estimate:,.0f} events"),
        ("returned to RabbitMQ by the kill", f"{_num(k.returned_source)} source messages, "
                                             f"{_num(k.returned_uploads)} upload tasks"),
    ]
    if ledger is not None:
        rows += [
            ("**duplicates** (events stored twice or more)", f"**{ledger.duplicates:,}**"),
            ("... first copy in a request in flight at the kill", f"{k.duplicates_in_flight:,}"),
            ("... first copy earlier (a batch sent before, its task not acknowledged)", f"{k.duplicates_earlier:,}"),
            ("... both copies after the kill (upload task published, source message not yet acknowledged)",
             f"{k.duplicates_after:,}"),
            ("oldest duplicate's first copy, before the kill", f"{_num(k.earliest_duplicate_s, 2)} s"),
            ("ledger", f"{ledger.sent:,} sent = {ledger.delivered_unique:,} delivered + {ledger.dead_lettered_ids:,} "
                       f"dead-lettered; {ledger.missing:,} missing"),
        ]
    rows.append(("from the kill to the last delivery (restart included)", f"{_num(k.restart_to_done_s, 1)} s"))
    table = "| metric | value |\n| --- | ---: |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    return f"### SIGKILL of the worker mid-run\n\n{table}\n\n{k.explanation}"


def _accounts_block(a: AccountsResult) -> str:
    rows = [("alone", f"{a.alone.events_per_s:,.0f}", "1.00 x"),
            (f"with {a.down_events:,} events of a second account, both healthy", f"{a.both_healthy_rate:,.0f}",
             f"{a.both_healthy_rate / a.alone.events_per_s if a.alone.events_per_s else 0:.2f} x"),
            ("with the same, the second account down (503 to its every upload)", f"**{a.beside.events_per_s:,.0f}**",
             f"**{a.ratio:.2f} x** ({a.isolation:.2f} x beside it healthy)")]
    if a.paced_alone is not None and a.paced_beside is not None:
        rows += [(f"its API taking {PACED_LIMIT} uploads a second (429 beyond), alone",
                  f"{a.paced_alone.events_per_s:,.0f}", "1.00 x"),
                 ("the same limit, the second account down", f"**{a.paced_beside.events_per_s:,.0f}**",
                  f"**{a.paced_ratio:.2f} x**")]
    lines = ["### Two accounts, one down for the whole run", "",
             f"{a.events:,} single-event messages of one account (7 asset_ids); its own events/s in each run. "
             f"{a.down_requests} requests to the down account beside it at the instant API"
             + (f", {a.paced_down_requests} in the paced run" if a.paced_beside is not None else "")
             + "; its events wait in its upload queue. "
             "Against the instant API the worker's CPU limits each run; in the last two, the healthy "
             "account's API does, as the real one's rate limit would.", "",
             "| the healthy account | events/s | ratio to alone |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {rate} | {ratio} |" for name, rate, ratio in rows]
    return "\n".join(lines) + "\n"


def _outage_block(o: OutageResult) -> str:
    ledger = o.ledger
    rows: list[tuple[str, str]] = [
        ("the API answered 503 for", f"{o.seconds:.0f} s ({o.api_latency * 1000:.0f} ms per answer, as before and after)"),
        ("events published during it", f"{o.events:,} ({o.asset_ids} asset_ids), the last confirmed at "
                                        f"{_num(o.published_by, 0)} s"),
    ]
    if ledger is not None:
        rows += [
            ("**dead-lettered**", f"**{ledger.dead_lettered:,}**"),
            ("ledger", f"{ledger.sent:,} sent = {ledger.delivered_unique:,} delivered + {ledger.dead_lettered_ids:,} "
                       f"dead-lettered; {ledger.missing:,} missing, {ledger.duplicates:,} duplicates"),
        ]
    rows += [
        ("**requests to the down API**", f"**{o.requests_down}**: {o.requests_before_open} until the circuit opened "
                                         f"(at {_num(o.circuit_opened_at, 1)} s), {o.probes} probes"),
        ("bound: FAILURES_TO_OPEN + UPLOAD_CONCURRENCY + probes",
         f"{o.requests_bound} = {o.failures_to_open} + {o.upload_concurrency} + {o.probes_allowed} (every {o.probe_base:g} s doubling "
         f"to {o.probe_max:g} s, over {o.seconds:.0f} s)"),
        ("circuit OPEN / CLOSED log lines", f"{o.circuit_opened} / {o.circuit_closed}"),
        ("events accepted while down", f"{o.delivered_during:,}"),
        ("**peak RSS of the worker** (VmHWM)", f"**{o.rss_peak_mb:.0f} MB**"),
        ("most ready at one look: source queue / upload tasks / delay queues",
         f"{o.source_peak:,} / {o.upload_peak:,} / {o.delayed_peak:,}"),
        ("upload tasks in delay queues when the API came back",
         ", ".join(f"{n:,} in {rung}" for rung, n in o.delayed_at_recovery.items()) or "none"),
        ("first delivery after the API came back", f"{_num(o.first_delivery_after, 1)} s (the next probe)"),
        ("**backlog drained after recovery in**",
         f"**{_num(o.drain_s, 1)} s** ({_num(o.drain_events_per_s)} events/s); "
         f"{_num(o.drain_after_close_s, 1)} s after the circuit closed; 99 % of it in {_num(o.drain_99_s, 1)} s"),
    ]
    if o.left_in_queues:
        rows.append(("left in queues", str(o.left_in_queues)))
    return "### Outage of the API\n\n| metric | value |\n| --- | ---: |\n" + "\n".join(
        f"| {a} | {b} |" for a, b in rows)


def _num(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)

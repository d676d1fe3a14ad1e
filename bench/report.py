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

from bench.broker import DrainResult
from bench.events import Case
from bench.runs import RunResult

#: A single-event case must reach this share of the bare drain's events/s.
TARGET_DRAIN_RATIO = 0.8

#: Every case must be this many times faster than the naive design.
TARGET_NAIVE_RATIO = 20.0

#: Peak resident memory of any worker process, MB.
TARGET_RSS_MB = 300.0

#: Events/s for messages of 50 events.
TARGET_ARRAY_EVENTS_PER_S = 25_000.0


@dataclass
class CaseResult:
    """One case: its backlog, its bare drain and the worker's run."""

    case: Case
    messages: int
    event_bytes: float
    preload_s: float
    drain: DrainResult
    worker: RunResult

    @property
    def drain_events_per_s(self) -> float:
        return self.drain.messages_per_s * self.case.per_message

    @property
    def ratio_to_drain(self) -> float:
        return self.worker.events_per_s / self.drain_events_per_s if self.drain_events_per_s else 0.0

    def ratio_to_naive(self, naive: RunResult | None) -> float | None:
        if naive is None or not naive.events_per_s:
            return None
        return self.worker.events_per_s / naive.events_per_s


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
    profile: list[dict[str, Any]] = field(default_factory=list)
    profile_text: str = ""
    notes: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)

    def targets(self) -> list[Target]:
        out: list[Target] = []
        for c in self.cases:
            title, w = c.case.title, c.worker
            if c.case.per_message == 1:
                out.append(_at_least("events/s >= 0.8 x bare drain", title, c.ratio_to_drain,
                                     TARGET_DRAIN_RATIO, f"{c.ratio_to_drain:.2f} x"))
            else:
                out.append(_at_least("events/s >= 25,000 (50-event messages)", title, w.events_per_s,
                                     TARGET_ARRAY_EVENTS_PER_S, f"{w.events_per_s:,.0f} events/s"))
            naive = c.ratio_to_naive(self.naive)
            if naive is not None:
                out.append(_at_least("events/s >= 20 x naive", title, naive, TARGET_NAIVE_RATIO, f"{naive:.1f} x"))
            rss = max(w.rss_main_mb, w.rss_child_mb)
            out.append(Target("peak RSS < 300 MB", title, rss, TARGET_RSS_MB, rss < TARGET_RSS_MB,
                              f"{rss:.0f} MB"))
            exact = w.delivered == w.expected and w.unique in (None, w.expected) and not w.duplicates
            out.append(Target("every event delivered exactly once", title, w.delivered, w.expected, exact,
                              f"{w.delivered:,} delivered, {w.unique if w.unique is not None else '?'} distinct "
                              f"of {w.expected:,}"))
        return out

    def warnings(self) -> list[str]:
        runs = [(c.case.title, c.worker) for c in self.cases] + [(f"scale-out: {n}", r) for n, r in self.scale_out]
        if self.naive is not None:
            runs.append(("naive", self.naive))
        return [f"{name}: {warning}" for name, run in runs for warning in run.warnings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "events_per_case": self.events,
            "naive_events": self.naive_events,
            "total_seconds": round(self.total_seconds, 1),
            "environment": self.environment,
            "cases": {c.case.key: {
                "title": c.case.title, "messages": c.messages, "events_per_message": c.case.per_message,
                "asset_ids": c.case.assets, "event_bytes": round(c.event_bytes, 1),
                "preload_seconds": round(c.preload_s, 2),
                "bare_drain": {"messages": c.drain.messages, "seconds": round(c.drain.seconds, 3),
                               "messages_per_s": round(c.drain.messages_per_s, 1),
                               "events_per_s": round(c.drain_events_per_s, 1)},
                "worker": c.worker.to_dict(),
                "ratio_to_bare_drain": round(c.ratio_to_drain, 3),
                "ratio_to_naive": _round(c.ratio_to_naive(self.naive), 2),
            } for c in self.cases},
            "naive": self.naive.to_dict() if self.naive else None,
            "scale_out": [{"setup": name, **run.to_dict()} for name, run in self.scale_out],
            "targets": [t.__dict__ for t in self.targets()],
            "warnings": self.warnings(),
            "notes": self.notes,
            "profile": self.profile,
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
        if self.naive is not None:
            n = self.naive
            parts.append(f"### Naive design (one task and one new-connection POST per event)\n\n"
                         f"{n.expected:,} events: **{n.events_per_s:,.0f} events/s**, worker CPU "
                         f"{n.worker_cpu_us:,.0f} us/event, broker CPU {_num(n.broker_cpu_us)} us/event, "
                         f"{n.uploads:,} uploads, {n.delivered:,} delivered")
        if self.scale_out:
            parts.append(self._scale_table())
        parts.append(self._targets_block())
        warnings = self.warnings()
        if warnings:
            parts.append("### WARNINGS\n\n" + "\n".join(f"- **{w}**" for w in warnings))
        if self.profile_text:
            parts.append("### Profile of the worker's main process (single-event messages, 7 asset_ids)\n\n"
                         + self.profile_text)
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
            ("worker CPU (main + pool)",
             f"{w.worker_cpu_us:,.0f} us/event ({w.main_cpu_us:,.0f} main, "
             f"{w.worker_cpu_us - w.main_cpu_us:,.0f} pool)", ""),
            ("broker CPU", f"{_num(w.broker_cpu_us)} us/event", ""),
            ("sandbox API CPU", f"{w.sandbox_cpu_us:,.0f} us/event", ""),
            ("peak RSS main / largest pool child", f"{w.rss_main_mb:,.0f} / {w.rss_child_mb:,.0f} MB",
             f"< {TARGET_RSS_MB:.0f} MB"),
            ("uploads", f"{w.uploads:,}" + (f" (+{w.failed_uploads:,} not 200)" if w.failed_uploads else ""), ""),
            ("mean batch size", f"{w.mean_batch:,.1f} events", ""),
            ("delivered", f"{w.delivered:,} of {w.expected:,}, {_num(w.unique)} distinct, "
                          f"{_num(w.duplicates)} duplicates", "= N"),
            ("first upload after ready / last 1 % / longest pause", f"{_num(w.first_upload_s, 2)} s / "
             f"{_num(w.tail_s, 2)} s / {w.longest_gap_s:.2f} s", ""),
            ("backlog read by the consumer after / upload tasks waiting, peak",
             f"{_num(w.source_read_s, 1)} s / {_num(w.upload_backlog_peak)}", ""),
        ]
        head = (f"### {c.case.title}\n\n{w.expected:,} events in {c.messages:,} messages of "
                f"{c.event_bytes:,.0f} bytes/event (preloaded in {c.preload_s:.1f} s)\n\n"
                "| metric | value | target |\n| --- | ---: | --- |")
        return head + "\n" + "\n".join(f"| {a} | {b} | {t} |" for a, b, t in rows)

    def _scale_table(self) -> str:
        base = self.scale_out[0][1].events_per_s or 1.0
        lines = ["### Scale-out (single-event messages, 7 asset_ids)", "",
                 "| setup | events/s | vs one process, --concurrency=1 | worker CPU us/event | delivered |",
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


def _num(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)

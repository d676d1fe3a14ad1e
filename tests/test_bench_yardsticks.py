"""The bench's yardsticks: the bare consumer's CPU, another commit's worker, the profile by thread.

No broker: the arithmetic and the parsing, on made-up figures and a made-up py-spy file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.baseline import extract
from bench.broker import DrainResult
from bench.events import CASES
from bench.profile import groups, render
from bench.report import CaseResult, Results
from bench.runs import RunResult
from tests.harness import ROOT

pytestmark = pytest.mark.timeout(60)

SINGLE, ARRAYS = CASES[0], CASES[1]


def run(label: str, events_per_s: float, cpu_us: float) -> RunResult:
    result = RunResult(label, 1, 64, 1000, delivered=1000, unique=1000, duplicates=0)
    result.events_per_s, result.worker_cpu_us, result.main_cpu_us, result.broker_cpu_us = events_per_s, cpu_us, cpu_us, 10.0
    return result


def test_the_workers_cpu_is_held_against_the_bare_consumers_per_event() -> None:
    single = CaseResult(SINGLE, 1000, 600.0, 0.1, DrainResult(1000, 0.05, 0.03, 0.01), run("s", 15_000, 36.0))
    assert single.drain_cpu_us == pytest.approx(30.0)
    assert single.cpu_ratio == pytest.approx(1.2)
    assert single.cpu_ratio_with_broker == pytest.approx((36 + 10) / (30 + 10))
    arrays = CaseResult(ARRAYS, 20, 600.0, 0.1, DrainResult(20, 0.01, 0.002), run("a", 30_000, 20.0),
                        baseline=run("a-base", 12_000, 45.0))
    assert arrays.drain_cpu_us == pytest.approx(2.0)  # 100 us a message, 50 events each
    assert arrays.cpu_ratio_with_broker is None  # the broker's CPU was not measured
    assert arrays.ratio_to_baseline == pytest.approx(2.5)
    results = Results({SINGLE.key: 1000, ARRAYS.key: 1000}, 0, cases=[single, arrays], baseline="abc1234")
    met = {t.goal: t.met for t in results.targets()}
    assert met["worker CPU per event <= 1.2 x the bare consumer's"]
    assert met["events/s >= 2 x the baseline's (abc1234)"]
    assert "baseline abc1234: worker CPU" in results.markdown()


def test_a_baseline_is_the_commits_worker_and_settings_unpacked_once(tmp_path: Path) -> None:
    commit, tree = extract("HEAD", repository=ROOT, into=tmp_path)
    assert tree == tmp_path / commit
    assert (tree / "worker" / "app.py").is_file() and (tree / "config" / "settings.py").is_file()
    assert not (tree / "tests").exists()
    (tree / "worker" / "app.py").write_text("# kept")
    assert extract("HEAD", repository=ROOT, into=tmp_path) == (commit, tree)
    assert (tree / "worker" / "app.py").read_text() == "# kept"  # not unpacked again


LOOP = "<module> (celery/__main__.py:1);asynloop (celery/worker/loops.py:2)"
POOL = ("Thread._bootstrap (threading.py:1);_worker (concurrent/futures/thread.py:83);"
        "Delivery.deliver (delivery.py:9)")


def test_the_profile_is_read_thread_by_thread(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"{LOOP};Ingest.on_message (pipeline.py:5);events_of (decoding.py:7) 30",
        f"{LOOP};Hub.fire_timers (hub.py:3) 10",
        f"{POOL};screen (screening.py:1);_compact_value (parsing.py:2) 40",
        f"{POOL};ApiClient.post (client.py:3) 15",
        "Thread._bootstrap (threading.py:1);Thread.run (threading.py:2);heartbeat (x.py:1) 5",
    ]))
    total, found = groups(raw)
    assert total == 100
    assert [(g.name, g.samples) for g in found] == [("upload threads", 55), ("event loop (main thread)", 40),
                                                    ("other threads", 5)]
    pool, loop, _ = found
    assert "_worker (concurrent/futures/thread.py)" not in [r.function for r in pool.rows]  # on every sample
    assert {(r.function, r.inclusive) for r in pool.rows[:2]} == {("screen (screening.py)", 0.4),
                                                                   ("_compact_value (parsing.py)", 0.4)}
    assert [(r.function, r.self_share) for r in loop.busiest] == [("events_of (decoding.py)", 0.3),
                                                                   ("Hub.fire_timers (hub.py)", 0.1)]
    assert "**event loop (main thread)**: 40.0% of the samples" in render(raw)

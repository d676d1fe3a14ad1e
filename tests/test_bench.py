"""The benchmark's own arithmetic: what it counts must be right before what it measures means anything.

No broker here: the sandbox runs in-process, the rest are pure functions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest
import requests

from bench import runs
from bench.api import API_KEY, SandboxProcess
from bench.broker import worker_queues
from bench.scenarios import TASK_DONE_RE, KillResult, Ledger, _task_stats, dead_letter_ids, probes_allowed
from config.settings import Settings
from worker.broker.topology import Topology
from worker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(30)

UPLOAD = "/v1/activity/upload"


def test_the_worker_runs_without_concurrency_and_the_naive_design_with_it() -> None:
    assert not any(a.startswith("--concurrency") for a in runs.celery_worker("worker.app"))
    assert "--concurrency=2" in runs.celery_worker("bench.naive", 2)
    assert runs.upload_concurrency({}) == 64
    assert runs.upload_concurrency({"UPLOAD_CONCURRENCY": "8"}) == 8


def test_the_queue_clean_up_names_every_queue_a_worker_declares() -> None:
    env = {"ACTIVITY_QUEUE": "b.activities", "ACTIVITY_DEAD_LETTER_QUEUE": "b.dead",
           "ACTIVITY_TASK_QUEUE": "b.celery", "ACTIVITY_UPLOAD_QUEUE": "b.upload"}
    names = worker_queues(env)
    assert {"b.activities", "b.dead", "b.celery", "b.upload", "b.dead.unhandled", "b.activities.quarantine"} <= set(names)
    declared = Topology.of(Settings.from_env({**env, "UPLOAD_RETRY_BACKOFF_MAX": "3600"}, require_api=False))
    assert {queue.name for queue in declared.all_queues()} <= set(names)  # whatever the worker declares
    assert "b.upload.delay.100ms" in names
    assert "b.upload.delay.409600ms" in names  # the rung of the longest default backoff (300 s)


@pytest.mark.parametrize(("duration", "expected"), [(0.5, 0), (1, 1), (3, 2), (20, 4), (63, 6), (300, 9)])
def test_probes_double_from_the_base_to_the_cap(duration: float, expected: int) -> None:
    # probes at 1, 3, 7, 15, 31, 63 s, then every 60 s: 123, 183, 243, (303)
    assert probes_allowed(1.0, 60.0, duration) == expected


def test_the_ledger_balances_ids_sent_against_ids_delivered_and_dead_lettered() -> None:
    ledger = Ledger.of(["a", "b", "c", "d"], Counter({"a": 2, "b": 1, "x": 1}), ["c"], 1)
    assert (ledger.sent, ledger.delivered_unique, ledger.delivered_copies) == (4, 2, 3)
    assert (ledger.duplicates, ledger.dead_lettered_ids, ledger.missing, ledger.unexpected) == (1, 1, 1, 1)
    assert not ledger.balanced


def test_dead_letter_ids_come_from_the_event_or_the_raw_body() -> None:
    envelope = {"reason": "rejected", "event": {"activity_params": {"event_id": "e-1"}}}
    raw = {"reason": "malformed", "event": None, "raw": '{"activity_params": {"event_id": "e-2"}'}
    assert dead_letter_ids([orjson.dumps(envelope), orjson.dumps(raw)]) == ["e-1", "e-2"]


def test_task_durations_are_read_from_the_worker_log_weighted_by_events() -> None:
    log = ("Task activities.upload[1] succeeded in 0.2s: {'account': 'default', 'events': 100, 'batches': 1, "
           "'delivered': 100}\n"
           "Task activities.upload[2] succeeded in 0.6s: {'account': 'brand-b', 'events': 300, 'batches': 4, "
           "'delivered': 300}\n")
    assert len(TASK_DONE_RE.findall(log)) == 2
    result = KillResult(events=400, asset_ids=100, api_latency=0.15, kill_share=0.4, events_per_s_at_kill=1000.0)
    _task_stats(result, log)
    assert result.tasks_seen == 2
    assert result.batches_per_task == pytest.approx((100 * 1 + 300 * 4) / 400)
    assert result.task_seconds == pytest.approx((100 * 0.2 + 300 * 0.6) / 400)
    assert result.hold_estimate == pytest.approx(1000.0 * result.task_seconds)


def test_polling_reads_only_new_records_and_maps_stored_events_to_their_upload(tmp_path: Path) -> None:
    with Sandbox(api_key=API_KEY) as sandbox:
        client = SandboxProcess(tmp_path, tmp_path / "unused.log", {})
        client.url = sandbox.url  # the in-process sandbox instead of a process of its own
        client.reset([{"latency": 0.01}])

        def upload(*ids: str) -> None:
            body = [{"asset_id": "a1", "activity_name": "Purchase", "timestamp": "2026-01-01T00:00:00Z",
                     "identity": "c", "activity_source": "web", "activity_params": {"event_id": i}} for i in ids]
            answer = requests.post(sandbox.url + UPLOAD, data=orjson.dumps(body), timeout=5,
                                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
            assert answer.status_code == 200

        upload("e1", "e2")
        assert client.poll() == 2
        upload("e3")
        client.set_faults([{"status": 503}])
        assert requests.post(sandbox.url + UPLOAD, data=b"[]", timeout=5, headers={
            "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}).status_code == 503
        assert client.poll() == 3
        assert client.records_read == 3
        assert [r["status"] for r in client.records_since(1)] == [200, 503]
        deliveries = client.deliveries()
        assert deliveries is not None
        assert [ids for _, ids in deliveries] == [["e1", "e2"], ["e3"]]
        assert client.event_ids() == Counter({"e1": 1, "e2": 1, "e3": 1})
        client.reset()
        assert client.poll() == 0 and client.records_read == 0

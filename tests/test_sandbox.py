"""The sandbox API, exercised over real HTTP: the vendor's rules, the faults, the control API.

Each test gets its own sandbox on a free port. Nothing here sleeps: waits are event-driven
(``Sandbox.wait_until``) and the only delays are the sandbox's own, cut short by ``stop()``.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from worker.sandbox import FaultError, RequestRecord, Sandbox

pytestmark = pytest.mark.timeout(30)

#: The key the sandbox under test expects.
KEY = "test-key"

#: The Authorization header that key makes.
AUTH = {"Authorization": f"Bearer {KEY}"}

#: The repository root, to run ``python -m worker.sandbox`` from.
ROOT = Path(__file__).resolve().parents[1]


def event(**overrides: Any) -> dict[str, Any]:
    """A valid event; ``overrides`` replace fields, and a value of ``...`` removes the field."""
    base: dict[str, Any] = {
        "activity_name": "Purchase",
        "asset_id": "asset-1",
        "timestamp": "2021-12-29T12:06:28Z",
        "identity": "customer-1",
        "activity_source": "web",
        "activity_params": {"currency": "INR", "items": [{"price": 250.0, "quantity": 1}]},
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not ...}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(api_key=KEY, seed=7) as running:
        yield running


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def upload(sandbox: Sandbox, body: Any, *, headers: dict[str, str] | None = None,
           timeout: float = 5.0, session: Any = requests) -> requests.Response:
    return session.post(f"{sandbox.url}/v1/activity/upload", json=body,
                        headers=AUTH if headers is None else headers, timeout=timeout)


def control(sandbox: Sandbox, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, f"{sandbox.url}/_sandbox/{path}", timeout=5, **kwargs)


# --- the vendor's rules -----------------------------------------------------------------------

def test_a_valid_batch_is_stored_and_recorded(sandbox: Sandbox) -> None:
    events = [event(identity=f"c{index}") for index in range(3)]
    answer = upload(sandbox, events)
    assert (answer.status_code, answer.json()) == (200, {"status": "success"})
    assert answer.raw.version == 11 and answer.headers["Content-Length"] == str(len(answer.content))
    assert sandbox.accepted() == events
    assert sandbox.accepted_count() == 3
    [record] = sandbox.requests()
    assert isinstance(record, RequestRecord)
    assert (record.status, record.events, record.asset_ids, record.fault) == (200, 3, ("asset-1",),
                                                                              None)


def test_a_single_object_counts_as_one_event(sandbox: Sandbox) -> None:
    assert upload(sandbox, event()).status_code == 200
    assert sandbox.accepted() == [event()]


@pytest.mark.parametrize("ok", [
    {"timestamp": "2020-04-28T16:47:37"},  # the vendor's own samples: no zone
    {"timestamp": "2021-12-29T12:06:28.123"},
    {"timestamp": "2021-12-29T06:12:28+05:30"},
    {"timestamp": "2021-12-29T12:06:28.123456Z"},
    {"timestamp": "2024-02-29T00:00:00-08:00"},
    {"identity": 12345},
    {"identity": ..., "annonid": "anon-1"},
    {"activity_source": "app"},
    {"activity_params": {}},
])
def test_documented_variants_are_accepted(sandbox: Sandbox, ok: dict[str, Any]) -> None:
    assert upload(sandbox, [event(**ok)]).status_code == 200


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer wrong"},
    {"Authorization": KEY},
    {"Authorization": f"bearer {KEY}"},
    {},
], ids=["wrong-key", "no-bearer", "lowercase-bearer", "missing"])
def test_a_bad_or_missing_key_is_401(sandbox: Sandbox, headers: dict[str, str]) -> None:
    answer = upload(sandbox, [event()], headers=headers)
    assert answer.status_code == 401
    assert answer.json() == {"status": "fail", "message": "Unauthorized | Invalid API Key"}
    assert sandbox.accepted() == []


def test_auth_is_checked_before_the_body(sandbox: Sandbox) -> None:
    answer = requests.post(f"{sandbox.url}/v1/activity/upload", data=b"not json", timeout=5,
                           headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_405(sandbox: Sandbox, method: str) -> None:
    answer = requests.request(method, f"{sandbox.url}/v1/activity/upload", headers=AUTH, timeout=5)
    assert answer.status_code == 405
    assert answer.json() == {"status": "fail", "message": "Method Not Allowed"}


def test_an_unknown_path_is_404(sandbox: Sandbox) -> None:
    assert requests.post(f"{sandbox.url}/v1/activity", json=[event()], headers=AUTH,
                         timeout=5).status_code == 404


@pytest.mark.parametrize("content_type, status", [
    ("application/json; charset=utf-8", 200), ("text/plain", 400), (None, 400),
])
def test_content_type_must_be_json(sandbox: Sandbox, content_type: str | None,
                                   status: int) -> None:
    headers = dict(AUTH, **({"Content-Type": content_type} if content_type else {}))
    answer = requests.post(f"{sandbox.url}/v1/activity/upload", data=json.dumps([event()]),
                           headers=headers, timeout=5)
    assert answer.status_code == status


@pytest.mark.parametrize("field, label", [
    ("activity_name", "Activity Name"),
    ("asset_id", "Asset Id"),
    ("timestamp", "Timestamp"),
    ("activity_source", "Activity Source"),
    ("activity_params", "Activity Params"),
    ("identity", "Identity"),
])
def test_each_missing_field_rejects_the_whole_batch(sandbox: Sandbox, field: str,
                                                    label: str) -> None:
    answer = upload(sandbox, [event(), event(**{field: ...}), event()])
    assert answer.status_code == 400
    assert answer.json() == {"status": "fail",
                             "message": f"Bad Request | Missing Parameter - {label} (event 1)"}
    assert sandbox.accepted() == []
    assert sandbox.requests()[0].status == 400


@pytest.mark.parametrize("bad", [
    {"timestamp": "2021-02-30T12:00:00Z"},
    {"timestamp": "2021-02-30T12:00:00"},
    {"timestamp": "2021-12-29T12:06"},
    {"timestamp": "2021-12-29"},
    {"timestamp": "2021-12-29 12:06:28Z"},
    {"timestamp": "2021-12-29T24:00:00Z"},
    {"timestamp": 1640779588},
    {"activity_name": ""},
    {"activity_name": 7},
    {"asset_id": ""},
    {"activity_source": "WEB"},
    {"activity_source": "email"},
    {"activity_params": []},
    {"activity_params": "x"},
    {"identity": True},
    {"identity": 1.5},
    {"identity": ..., "annonid": 42},
], ids=repr)
def test_invalid_values_are_400(sandbox: Sandbox, bad: dict[str, Any]) -> None:
    answer = upload(sandbox, [event(**bad)])
    assert answer.status_code == 400
    assert answer.json()["message"].startswith("Bad Request | ")
    assert "(event 0)" in answer.json()["message"]
    assert sandbox.accepted() == []


@pytest.mark.parametrize("body", [b"not json", b"[]", b'"text"', b"[1]"], ids=repr)
def test_bodies_that_are_not_event_arrays_are_400(sandbox: Sandbox, body: bytes) -> None:
    answer = requests.post(f"{sandbox.url}/v1/activity/upload", data=body, timeout=5,
                           headers=dict(AUTH, **{"Content-Type": "application/json"}))
    assert answer.status_code == 400


def test_at_most_1000_events_per_request(sandbox: Sandbox) -> None:
    assert upload(sandbox, [event()] * 1000).status_code == 200
    answer = upload(sandbox, [event()] * 1001)
    assert answer.status_code == 400 and "Too Many Events" in answer.json()["message"]
    assert sandbox.accepted_count() == 1000


def test_mixed_asset_ids_are_400(sandbox: Sandbox) -> None:
    answer = upload(sandbox, [event(), event(asset_id="asset-2")])
    assert answer.status_code == 400 and "mixed asset_id" in answer.json()["message"]
    assert sandbox.requests()[0].asset_ids == ("asset-1", "asset-2")
    assert sandbox.accepted() == []


def test_sandbox_reject_rejects_the_whole_batch(sandbox: Sandbox) -> None:
    answer = upload(sandbox, [event(), event(activity_params={"sandbox_reject": True})])
    assert answer.status_code == 400 and "(event 1)" in answer.json()["message"]
    assert sandbox.accepted() == []


def test_an_empty_array_in_params_is_answered_200_but_dropped(sandbox: Sandbox) -> None:
    lost = event(activity_params={"cart": {"items": [{"tags": []}]}})
    answer = upload(sandbox, [event(), lost])
    assert answer.status_code == 200
    assert sandbox.accepted() == [event()]
    assert sandbox.dropped() == [lost]


# --- faults -----------------------------------------------------------------------------------

def test_count_faults_answer_the_next_requests_then_stop(sandbox: Sandbox) -> None:
    sandbox.add_fault(status=500, count=2)
    statuses = [upload(sandbox, [event()]).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert sandbox.accepted_count() == 1
    assert [record.fault for record in sandbox.requests()] == [{"status": 500, "count": 2}] * 2 + [
        None]
    assert sandbox.requests()[0].events == 1


def test_a_429_carries_retry_after(sandbox: Sandbox) -> None:
    sandbox.add_fault(status=429, retry_after=2, count=1)
    answer = upload(sandbox, [event()])
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "2"
    assert answer.json()["status"] == "fail"


def test_auth_is_checked_before_faults(sandbox: Sandbox) -> None:
    sandbox.add_fault(status=503, count=1)
    assert upload(sandbox, [event()], headers={}).status_code == 401
    assert upload(sandbox, [event()]).status_code == 503


def statuses_with_rate(seed: int) -> list[int]:
    with Sandbox(api_key=KEY, seed=seed) as running, requests.Session() as session:
        running.add_fault(status=503, rate=0.5)
        return [upload(running, [event()], session=session).status_code for _ in range(20)]


def test_rate_faults_are_random_but_repeatable_with_a_seed() -> None:
    first = statuses_with_rate(seed=3)
    assert set(first) == {200, 503}
    assert statuses_with_rate(seed=3) == first


def test_a_drop_closes_the_connection_without_an_answer(sandbox: Sandbox) -> None:
    sandbox.add_fault(drop=True, count=1)
    with pytest.raises(requests.ConnectionError):
        upload(sandbox, [event()])
    assert upload(sandbox, [event()]).status_code == 200
    assert [record.status for record in sandbox.requests()] == [None, 200]


@pytest.mark.parametrize("body, content_type", [
    ("<html><body>Gateway</body></html>", "text/html"),
    ("", "application/json"),
    ('{"status":"fail"}', "application/json"),
], ids=["html", "empty", "status-fail"])
def test_odd_200_answers_store_nothing(sandbox: Sandbox, body: str, content_type: str) -> None:
    sandbox.add_fault(status=200, body=body, content_type=content_type, count=1)
    answer = upload(sandbox, [event()])
    assert (answer.status_code, answer.text) == (200, body)
    assert answer.headers["Content-Type"] == content_type
    assert sandbox.accepted() == []


def test_latency_delays_the_answer(sandbox: Sandbox) -> None:
    sandbox.add_fault(latency=0.2, count=1)
    with pytest.raises(requests.exceptions.ReadTimeout):
        upload(sandbox, [event()], timeout=0.05)


def test_a_latency_rule_lets_later_rules_decide(sandbox: Sandbox) -> None:
    sandbox.add_fault(latency=0.01, count=1)
    sandbox.add_fault(status=500, count=1)
    assert upload(sandbox, [event()]).status_code == 500


@pytest.mark.parametrize("rule", [
    {}, {"status": 99}, {"status": 500, "count": 0}, {"status": 500, "rate": 2},
    {"drop": True, "status": 500}, {"retry_after": 2}, {"status": 500, "colour": "red"},
], ids=repr)
def test_nonsense_fault_rules_are_refused(sandbox: Sandbox, rule: dict[str, Any]) -> None:
    with pytest.raises(FaultError):
        sandbox.add_fault(**rule)
    assert control(sandbox, "POST", "faults", json=rule).status_code == 400


def test_a_stopped_sandbox_refuses_connections() -> None:
    running = Sandbox(api_key=KEY).start()
    with requests.Session() as session:
        assert upload(running, [event()], session=session).status_code == 200
        running.stop()
        with pytest.raises(requests.ConnectionError):
            upload(running, [event()], session=session)


# --- control ----------------------------------------------------------------------------------

def test_control_endpoints(sandbox: Sandbox) -> None:
    lost = event(activity_params={"items": []})
    upload(sandbox, [event(), lost])
    assert control(sandbox, "GET", "accepted").json() == {"events": [event()], "count": 1}
    assert control(sandbox, "GET", "dropped").json() == {"events": [lost], "count": 1}
    [record] = control(sandbox, "GET", "requests").json()
    assert record["status"] == 200 and record["events"] == 2 and record["fault"] is None
    assert record["asset_ids"] == ["asset-1"] and isinstance(record["at"], float)

    rules = [{"status": 503, "count": 1}, {"status": 429, "retry_after": 1}]
    assert control(sandbox, "POST", "faults", json=rules).status_code == 200
    assert control(sandbox, "POST", "faults", json={"latency": 0.5}).status_code == 200
    assert [rule["remaining"] for rule in control(sandbox, "GET", "faults").json()] == [1, None,
                                                                                       None]
    assert control(sandbox, "DELETE", "faults").status_code == 200
    assert sandbox.faults() == []

    assert control(sandbox, "POST", "reset").status_code == 200
    assert control(sandbox, "GET", "accepted").json() == {"events": [], "count": 0}
    assert sandbox.requests() == [] and sandbox.dropped() == []
    assert control(sandbox, "GET", "nothing").status_code == 404
    assert control(sandbox, "DELETE", "accepted").status_code == 405


def test_control_requests_are_not_recorded_and_need_no_key(sandbox: Sandbox) -> None:
    assert control(sandbox, "GET", "health").json() == {"status": "ok"}
    assert sandbox.requests() == []


def test_keep_alive_serves_many_requests_on_one_connection(sandbox: Sandbox,
                                                           http: requests.Session) -> None:
    for _ in range(5):
        assert upload(sandbox, [event()], session=http).status_code == 200
    assert sandbox.accepted_count() == 5


# --- waiting ----------------------------------------------------------------------------------

def test_wait_until_wakes_when_the_condition_becomes_true(sandbox: Sandbox) -> None:
    sender = threading.Thread(target=upload, args=(sandbox, [event()] * 3))
    sender.start()
    assert sandbox.wait_until(lambda s: s.accepted_count() == 3, timeout=5)
    sender.join()
    assert sandbox.wait_until(lambda s: len(s.accepted()) == 3, timeout=0)


def test_wait_until_gives_up_after_the_timeout(sandbox: Sandbox) -> None:
    assert not sandbox.wait_until(lambda s: s.accepted_count() > 0, timeout=0.05)


# --- command line -----------------------------------------------------------------------------

def test_the_command_line_serves_until_sigterm() -> None:
    env = dict(os.environ, SANDBOX_API_KEY="secret-cli-key", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.sandbox", "--port", "0", "--latency", "0.001"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert "SANDBOX" in banner and "NOT the real" in banner
        url = banner.split("listening on ")[1].split()[0]
        answer = requests.post(f"{url}/v1/activity/upload", json=[event()], timeout=5,
                               headers={"Authorization": "Bearer secret-cli-key"})
        assert answer.status_code == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "events=1 asset_id=asset-1" in output
    assert "secret-cli-key" not in banner + output and "customer-1" not in output


def test_the_sandbox_imports_nothing_else_from_the_worker() -> None:
    """It checks the API's rules with its own code, so a worker bug cannot hide in both."""
    for module in (ROOT / "worker" / "sandbox").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [alias.name for alias in getattr(node, "names", [])]
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                outside = [name for name in names if name.split(".")[0] == "worker"
                           and not name.startswith("worker.sandbox")]
                assert outside == [], f"{module.name} imports {outside}"

"""The alerting rules and the dashboard against a real Prometheus, scraping a real worker and a real
RabbitMQ node's exporter.

Prometheus scrapes and evaluates every second and sends its alerts to an Alertmanager stand-in
(``prometheus_server.AlertReceiver``): the test blocks until the alert it expects arrives, then
checks ``/api/v1/alerts``. The rules loaded are copies of ``deploy/prometheus/`` with shorter
``for:`` durations; the promtool unit tests (tests/test_alert_rules.py) prove the real ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from kombu import Connection, Queue

from tests.dashboard import load, queries
from tests.harness import (
    DeadLetters,
    QueueSet,
    WorkerProcess,
    event,
    event_id_of,
    free_port,
    publish_events,
    publish_raw,
)
from tests.integration.prometheus_server import AlertReceiver, PrometheusServer
from tests.promql import metric_names, substitute
from tests.promtool import require
from tests.rabbitmq_node import RabbitNodes
from tests.rule_files import RULES_DIR, read_rules, with_for
from worker.sandbox import Sandbox

#: The scrape job's name the rules expect.
JOB = "netcore-activity"

#: The alert of an API that is down, and its ``for:`` here (15 minutes in the rules).
CIRCUIT_OPEN, SHORT_FOR = "NetcoreActivityCircuitOpen", "3s"

#: How long the test waits for the worker, the sandbox and Prometheus.
DEADLINE = 90.0

#: The dashboard's variables as this test's Prometheus answers them: rates over 15 s of
#: one-second scrapes, the worker's job, every instance.
DASHBOARD_VARIABLES = {"__rate_interval": "15s", "__interval": "1s", "job": JOB, "instance": ".*"}

#: The rules that need RabbitMQ's exporter, and the alerts this test makes fire with them.
RABBITMQ_RULES = RULES_DIR / "rabbitmq-alerts.yml"
DEAD_LETTERS_WAITING, NOT_CONSUMING = "NetcoreActivityDeadLettersWaiting", "NetcoreActivityNotConsuming"


def test_the_circuit_open_alert_fires_while_the_api_is_down_and_resolves_when_it_is_back(
    start_worker: Callable[..., WorkerProcess], queues: QueueSet, sandbox: Sandbox, dead_letters: DeadLetters,
    tmp_path: Path,
) -> None:
    """The sandbox answers 503 to every upload: the worker's circuit opens, and the alert reaches
    the Alertmanager firing, the only one. The sandbox recovers: it arrives resolved. Every
    event is delivered, none dead-lettered. Then every dashboard query answers from this
    Prometheus."""
    binary = require("prometheus")
    rules = tmp_path / "alerts.yml"
    rules.write_text(with_for(RULES_DIR / "alerts.yml", {CIRCUIT_OPEN: SHORT_FOR}))
    metrics_port = free_port()
    sandbox.add_fault(status=503)  # the API is down from the start
    worker = start_worker(METRICS_PORT=metrics_port, UPLOAD_PROBE_INTERVAL_MAX="1")
    with AlertReceiver() as receiver, PrometheusServer(
        binary, tmp_path, scrape={JOB: [f"127.0.0.1:{metrics_port}"]}, rule_files=[rules],
        alertmanager=receiver.address,
    ) as prometheus:
        ids = [f"prom-{n}" for n in range(40)]  # four asset_ids: failures of several batches open the circuit
        publish_events(queues.settings.queue, [[event(i, asset_id=f"asset-{n % 4}") for n, i in enumerate(ids)]])

        firing = receiver.wait_for(CIRCUIT_OPEN, resolved=False, timeout=DEADLINE)
        assert firing, f"no firing {CIRCUIT_OPEN}; Prometheus has {prometheus.active_alerts(CIRCUIT_OPEN)}"
        assert firing.labels == {"alertname": CIRCUIT_OPEN, "severity": "critical", "account": "default"}
        assert 'account "default" have stopped' in firing.annotations["summary"]
        assert [alert["state"] for alert in prometheus.active_alerts(CIRCUIT_OPEN)] == ["firing"]
        assert "Circuit OPEN" in worker.log()

        mark = receiver.mark
        sandbox.clear_faults()  # the API is back
        assert receiver.wait_for(CIRCUIT_OPEN, resolved=True, timeout=DEADLINE, after=mark), (
            f"{CIRCUIT_OPEN} did not resolve; Prometheus has {prometheus.active_alerts(CIRCUIT_OPEN)}")
        assert prometheus.active_alerts(CIRCUIT_OPEN) == []
        assert "circuit CLOSED" in worker.log()

        assert sandbox.wait_until(lambda s: set(ids) <= {event_id_of(e) for e in s.accepted()}, timeout=DEADLINE)
        dead_letters.settle(quiet=1.0)
        assert dead_letters.envelopes == []  # nothing lost: every id delivered, none dead-lettered
        assert {n.name for n in receiver.notifications} == {CIRCUIT_OPEN}  # an outage raises one alert

        unanswered = [name for name, expr in queries(load()).items()
                      if not prometheus.query(substitute(expr, DASHBOARD_VARIABLES))]
        assert unanswered == [], "dashboard queries with no data from a real worker"


def test_the_rabbitmq_rules_read_series_the_plugin_exports_and_fire_on_them(
    rabbit_nodes: RabbitNodes, tmp_path: Path
) -> None:
    """A node of the test's own with the rabbitmq_prometheus plugin, scraped at /metrics/per-object
    as rabbitmq-alerts.yml says: every RabbitMQ selector of the rules finds its series, with the
    labels the rules group by; dead letters waiting and events nobody reads raise their alerts
    (``for:`` 0 here: the day and the ten minutes are the unit tests')."""
    binary = require("prometheus")
    node, exporter_port = rabbit_nodes.node(), free_port()
    (node.directory / "enabled_plugins").write_text("[rabbitmq_prometheus].\n")
    with open(node.directory / "rabbitmq.conf", "a") as config:
        config.write(f"prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {exporter_port}\n")
    node.start()
    selectors = {match.group() for rule in read_rules(RABBITMQ_RULES) for name in metric_names(rule.expr)
                 if name.startswith("rabbitmq_") for match in re.finditer(rf"\b{name}\{{[^}}]*\}}", rule.expr)}
    queue_names = {queue for selector in selectors for queue in re.findall(r'queue="([^"]+)"', selector)}
    assert queue_names == {"activities", "activities.dead"}
    with Connection(node.url) as connection:
        for name in queue_names:
            Queue(name, durable=True)(connection.default_channel).declare()
    publish_raw("activities.dead", [b'{"reason": "invalid"}'] * 3, broker_url=node.url)
    publish_raw("activities", [b'{"asset_id": "a"}'] * 5, broker_url=node.url)  # no worker reads them

    rules = tmp_path / "rabbitmq-alerts.yml"
    rules.write_text(with_for(RABBITMQ_RULES, {rule.name: "0s" for rule in read_rules(RABBITMQ_RULES)}))
    with AlertReceiver() as receiver, PrometheusServer(
        binary, tmp_path, scrape={"rabbitmq": [f"127.0.0.1:{exporter_port}"]},
        metrics_path={"rabbitmq": "/metrics/per-object"}, rule_files=[rules], alertmanager=receiver.address,
    ) as prometheus:
        # the plugin refreshes its numbers every 5 s: the alerts come once it counted the messages
        waiting = receiver.wait_for(DEAD_LETTERS_WAITING, resolved=False, timeout=DEADLINE)
        found = {selector: prometheus.query(selector) for selector in selectors}
        assert [selector for selector, series in found.items() if not series] == [], "the plugin exports none"
        for selector, series in found.items():
            assert all({"vhost", "queue"} <= set(s["metric"]) for s in series), selector
        assert waiting, f"no firing {DEAD_LETTERS_WAITING}"
        assert (waiting.labels["vhost"], waiting.labels["queue"]) == ("/", "activities.dead")
        assert waiting.annotations["summary"].startswith("3 dead letters have waited in activities.dead")
        stuck = receiver.wait_for(NOT_CONSUMING, resolved=False, timeout=DEADLINE)
        assert stuck, f"no firing {NOT_CONSUMING}"
        assert (stuck.labels["vhost"], stuck.labels["queue"]) == ("/", "activities")
        assert stuck.annotations["summary"].startswith("5 messages wait in activities")

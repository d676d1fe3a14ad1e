"""A real Prometheus server for a test, and an Alertmanager stand-in that hears its alerts.

:class:`PrometheusServer` writes a ``prometheus.yml`` (scrapes and rule evaluations every
second), starts Debian's ``prometheus`` on a free port with a data directory of its own, in a
process group of its own, and returns once it logs that it is ready; :meth:`~PrometheusServer.api`
reads its HTTP API (``/api/v1/alerts``, ``/api/v1/query``...).

:class:`AlertReceiver` is where that Prometheus sends its alerts, as it would to an
Alertmanager (``POST /api/v2/alerts``): a firing alert as soon as its ``for:`` has passed, a
resolved one (its ``endsAt`` past) as soon as it resolves. A test blocks on
:meth:`~AlertReceiver.wait_for` until the alert it expects arrives: no polling, no sleeping.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.harness import Output, free_port

#: What Prometheus logs once it serves its API and evaluates its rules.
READY_LINE = "Server is ready to receive web requests."

#: How long Prometheus may take to start (well under a second on a quiet machine).
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Notification:
    """One alert as Prometheus sent it."""

    name: str
    labels: dict[str, str]
    annotations: dict[str, str]
    resolved: bool  #: its ``endsAt`` had passed when it arrived: Prometheus says it is over


class AlertReceiver:
    """An HTTP server on a free port taking what Prometheus posts to an Alertmanager."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reports what matters."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def received(self, alerts: list[dict[str, Any]]) -> None:
        now = datetime.now(timezone.utc)
        with self._changed:
            for alert in alerts:
                labels = dict(alert["labels"])
                self.notifications.append(Notification(
                    labels.get("alertname", ""), labels, dict(alert.get("annotations", {})),
                    resolved=datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00")) <= now))
            self._changed.notify_all()

    def wait_for(self, name: str, *, resolved: bool, timeout: float, after: int = 0) -> Notification | None:
        """Block until an alert ``name`` arrives firing (or resolved), among the notifications from
        index ``after`` on; None once the deadline passed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for notification in self.notifications[after:]:
                    if notification.name == name and notification.resolved == resolved:
                        return notification
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    @property
    def mark(self) -> int:
        with self._changed:
            return len(self.notifications)

    def __enter__(self) -> AlertReceiver:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()


class PrometheusServer:
    """``prometheus`` with a configuration, data directory and port of its own."""

    def __init__(self, binary: str, directory: Path, *, scrape: dict[str, Sequence[str]],
                 rule_files: Sequence[Path] = (), alertmanager: str | None = None,
                 metrics_path: dict[str, str] | None = None) -> None:
        self.binary, self.directory = binary, directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = Output(directory / "prometheus.log")
        self.process: subprocess.Popen[bytes] | None = None
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job, "metrics_path": (metrics_path or {}).get(job, "/metrics"),
                                "static_configs": [{"targets": list(targets)}]} for job, targets in scrape.items()],
        }
        if alertmanager:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        self.config = directory / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML

    def start(self) -> PrometheusServer:
        """Start it; return once it is ready (or fail with its log)."""
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"],
            cwd=self.directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.output.follow(self.process)
        if not self.output.wait_for(lambda data: READY_LINE.encode() in data, START_TIMEOUT):
            self.stop()
            raise AssertionError(f"Prometheus did not start; its log:\n{self.output.text()[-5000:]}")
        return self

    def api(self, path: str) -> Any:
        """GET ``/api/v1/<path>``: its ``data``, once Prometheus said ``success``."""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector: one item per series)."""
        data = self.api("query?" + urllib.parse.urlencode({"query": expr}))
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def active_alerts(self, name: str) -> list[dict[str, Any]]:
        """``/api/v1/alerts``: the pending and firing alerts called ``name``."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == name]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.output.join(10)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


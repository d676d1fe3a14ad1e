"""Sentry, for real: what sentry-sdk actually posts, caught by a local HTTP server.

The unit-level tests set Sentry up with the project's own function inside this process, log
and raise events full of secrets and personal data, flush, and read every byte that left. The
end-to-end test runs a real worker with a wrong API key against the sandbox and reads what the
worker sent. Nothing sleeps: ``sentry_sdk.flush`` returns once the HTTP posts are answered, and
the server wakes up waiters on a condition variable.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sentry_sdk

from config.settings import Settings
from tests.harness import DeadLetters, QueueSet, WorkerProcess, event, publish_events
from worker.deadletter import envelopes as deadletter
from worker.ops.sentry import REDACTED, failure_fingerprint, report_failure, setup_sentry

#: An API key that must never reach Sentry.
API_KEY = "nc-live-7f3a9b2c4d5e6f708192a3b4"
#: The broker's password, and a broker URL carrying it.
BROKER_PASSWORD = "rabbit-Secret-4242"
BROKER_URL = f"amqp://netcore:{BROKER_PASSWORD}@rabbit.internal:5672//"
#: Personal data of a customer, as events carry it.
IDENTITY = "CUST-alpha-bravo"
EMAIL = "priya.sharma@example.org"
MOBILE = "919876543210"
ANNONID = "anon-7c1e2d-zulu"
PHONE = "+91 98765 43210"

#: Strings that must appear nowhere in what sentry-sdk sends.
FORBIDDEN = (API_KEY, BROKER_PASSWORD, "amqp://netcore", IDENTITY, EMAIL, MOBILE, "9876543210", ANNONID,
             PHONE, "98765 43210")

#: A key the sandbox does not accept (its own is the fixtures' API_KEY): every upload gets 401.
WRONG_API_KEY = "wrong-key-5f1e2d3c4b5a69788796"

#: How long a test waits for something the worker or sentry-sdk does.
DEADLINE = 60.0


class EnvelopeServer:
    """A stand-in for Sentry's ingestion endpoint: records each envelope, answers 200."""

    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        self._changed = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":  # only if brotli is installed, and then so is the module
                    import brotli  # type: ignore[import-not-found]

                    body = brotli.decompress(body)
                if self.path.rstrip("/").endswith("/envelope"):
                    owner._record(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> EnvelopeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self._server.server_address[1]}/1"

    def _record(self, body: bytes) -> None:
        with self._changed:
            self.envelopes.append(body)
            self._changed.notify_all()

    def text(self) -> str:
        """Every byte received, as text: what a leak would be searched in."""
        with self._changed:
            return "\n".join(body.decode("utf-8", "replace") for body in self.envelopes)

    def events(self) -> list[dict[str, Any]]:
        """The error events (item type ``event``) received so far, parsed."""
        with self._changed:
            bodies = list(self.envelopes)
        return [payload for body in bodies for kind, payload in parse_envelope(body) if kind == "event"]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        """Block until ``predicate(events)`` holds or the deadline passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if predicate(self.events()):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)


def parse_envelope(body: bytes) -> list[tuple[str, Any]]:
    """(item type, payload) of each item: JSON payloads parsed, others left as bytes."""
    lines = body.split(b"\n")
    items: list[tuple[str, Any]] = []
    position = len(lines[0]) + 1  # the envelope header
    while position < len(body):
        end = body.find(b"\n", position)
        end = len(body) if end < 0 else end
        line = body[position:end]
        position = end + 1
        if not line.strip():
            continue
        header = json.loads(line)
        length = header.get("length")
        if length is None:
            end = body.find(b"\n", position)
            end = len(body) if end < 0 else end
            payload, position = body[position:end], end + 1
        else:
            payload, position = body[position:position + length], position + length + 1
        try:
            items.append((header.get("type", ""), json.loads(payload)))
        except ValueError:
            items.append((header.get("type", ""), payload))
    return items


def message_of(event: dict[str, Any]) -> str:
    """The text a person sees first: the log message or the exception's value."""
    logentry = event.get("logentry") or {}
    parts = [logentry.get("formatted") or logentry.get("message") or "", event.get("message") or ""]
    parts += [value.get("value") or "" for value in (event.get("exception") or {}).get("values", [])]
    return " ".join(part for part in parts if isinstance(part, str))


@pytest.fixture
def envelope_server() -> Iterator[EnvelopeServer]:
    with EnvelopeServer() as server:
        yield server


@pytest.fixture
def sentry(envelope_server: EnvelopeServer) -> Iterator[EnvelopeServer]:
    """Sentry set up in this process by the project's own function, pointed at the server."""
    settings = Settings(api_key=API_KEY, broker_url=BROKER_URL, region="in", sentry_dsn=envelope_server.dsn)
    sentry_sdk.get_isolation_scope().clear()  # no breadcrumbs from earlier tests
    assert setup_sentry(settings)
    yield envelope_server
    sentry_sdk.get_client().close(timeout=5)
    sentry_sdk.get_global_scope().set_client(None)
    sentry_sdk.get_isolation_scope().clear()


def test_sentry_is_not_set_up_without_a_dsn() -> None:
    assert setup_sentry(Settings(api_key=API_KEY)) is False


def test_no_secret_nor_personal_data_reaches_sentry(sentry: EnvelopeServer, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("worker.test_sentry")
    caplog.set_level(logging.INFO, logger=logger.name)  # INFO records become breadcrumbs
    raw_event = {"asset_id": "a-1", "identity": IDENTITY, "activity_params": {"email": EMAIL, "mobile": MOBILE}}
    # Breadcrumbs: an INFO record and a hand-made one with headers.
    logger.info("connecting to %s for %s with key %s", BROKER_URL, EMAIL, API_KEY)
    sentry_sdk.add_breadcrumb(category="http", data={"headers": {"Authorization": f"Bearer {API_KEY}"}})

    # 1. A log record: secrets in the message and its arguments, nested in extras.
    logger.error(
        "case-log: upload failed for %s with key %s via %s; call %s",
        EMAIL, API_KEY, BROKER_URL, PHONE,
        extra={
            "request_dump": {"outer": [{"headers": {"Authorization": f"Bearer {API_KEY}", "X-Trace": "t-1"}}]},
            "event": {"identity": IDENTITY, "activity_params": {"contact": {"Email": EMAIL, "MOBILE": MOBILE,
                                                                              "annonid": ANNONID}}},
            "raw_body": json.dumps([raw_event]),
            "python_repr": repr(raw_event),
        },
    )

    # 2. An exception whose value holds them, with contexts and extras set on the scope.
    try:
        raise RuntimeError(
            f"case-exception: POST failed, Authorization: Bearer {API_KEY}, broker {BROKER_URL}, "
            f"identity={IDENTITY} for {EMAIL}, phone {PHONE}"
        )
    except RuntimeError:
        with sentry_sdk.new_scope() as scope:
            scope.set_context("upload", {"request": {"headers": {"authorization": f"Bearer {API_KEY}"}},
                                         "events": [{"identity": IDENTITY, "phone": PHONE, "annonid": ANNONID}]})
            scope.set_extra("settings", {"broker_url": BROKER_URL, "api_key": API_KEY})
            scope.set_tag("customer", EMAIL)
            sentry_sdk.capture_exception()

    # 3. logger.exception: the traceback path of the logging integration.
    try:
        raise ValueError(f"case-logged-exception: {json.dumps(raw_event)}")
    except ValueError:
        logger.exception("case-logged-exception for %s", IDENTITY)

    # 4. A request interface, as web integrations fill it.
    sentry_sdk.capture_event({
        "message": f"case-request: {EMAIL}",
        "level": "error",
        "request": {"url": f"http://{EMAIL}:{API_KEY}@api.example.net/v1/activity/upload?email={EMAIL}",
                    "method": "POST",
                    "headers": {"Authorization": f"Bearer {API_KEY}", "X-Nested": {"Cookie": "s=1"}},
                    "data": {"events": [raw_event]}},
    })
    sentry_sdk.flush(timeout=10)

    cases = ("case-log", "case-exception", "case-logged-exception", "case-request")
    assert sentry.wait_for(lambda events: all(any(c in message_of(e) for e in events) for c in cases), DEADLINE), (
        f"not every case reached the server: {[message_of(e) for e in sentry.events()]}"
    )
    text = sentry.text()
    leaks = [secret for secret in FORBIDDEN if secret in text]
    assert not leaks, f"leaked to Sentry: {leaks}"
    assert REDACTED in text
    for sent in sentry.events():
        assert sent["tags"]["region"] == "in"
    logged = next(e for e in sentry.events() if "case-log:" in message_of(e))
    assert logged["extra"]["event"]["activity_params"]["contact"]["Email"] == REDACTED
    crumbs = [crumb.get("message") or "" for crumb in logged["breadcrumbs"]["values"]]
    assert any("connecting to amqp://" in crumb for crumb in crumbs), crumbs  # the crumb is there, cleaned


def test_one_issue_per_kind_of_failure(sentry: EnvelopeServer) -> None:
    sentence = "the API refused the API key (401 Unauthorized)"
    report_failure(deadletter.UNAUTHORIZED, 401, "asset-A", 3, sentence)
    report_failure(deadletter.UNAUTHORIZED, 401, "asset-B", 700, sentence)
    report_failure(deadletter.RETRIES_EXHAUSTED, 503, "asset-A", 5, "the API answered 503")
    report_failure(deadletter.INVALID, None, "asset-C", 2, "The event breaks the API's rules (timestamp)")
    logging.getLogger("worker.test_sentry").error("case-sentinel")  # sent after all of the above
    sentry_sdk.flush(timeout=10)

    assert sentry.wait_for(lambda events: any("case-sentinel" in message_of(e) for e in events), DEADLINE)
    failures = [e for e in sentry.events() if "reason" in e.get("tags", {})]
    unauthorized = [e for e in failures if e["tags"]["reason"] == deadletter.UNAUTHORIZED]
    assert len(unauthorized) == 2
    assert unauthorized[0]["fingerprint"] == unauthorized[1]["fingerprint"] == failure_fingerprint("unauthorized", 401)
    assert {e["tags"]["asset_id"] for e in unauthorized} == {"asset-A", "asset-B"}
    for sent in unauthorized:
        assert sent["level"] == "error"
        assert sent["tags"]["status"] == "401"
        assert sent["tags"]["region"] == "in"
        assert "API key is the likely cause" in message_of(sent)
    exhausted = [e for e in failures if e["tags"]["reason"] == deadletter.RETRIES_EXHAUSTED]
    assert len(exhausted) == 1
    assert exhausted[0]["fingerprint"] != unauthorized[0]["fingerprint"]
    # An invalid event is the producer's to fix: logged, not an error, no Sentry event.
    assert not [e for e in sentry.events() if e.get("tags", {}).get("asset_id") == "asset-C"]
    assert "asset-C" not in json.dumps([e for e in sentry.events() if "case-sentinel" not in message_of(e)])


def test_report_failure_log_levels(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="worker.delivery"):
        report_failure(deadletter.UNAUTHORIZED, 401, "asset-A", 3, "the API refused the API key")
        report_failure(deadletter.INVALID, None, "asset-C", 2, "bad timestamp")
    levels = {record.netcore_reason: record.levelno for record in caplog.records}  # type: ignore[attr-defined]
    assert levels == {"unauthorized": logging.ERROR, "invalid": logging.WARNING}


def test_a_wrong_api_key_reaches_sentry_as_one_issue_naming_the_key(
    start_worker: Callable[..., WorkerProcess],
    queues: QueueSet,
    dead_letters: DeadLetters,
    envelope_server: EnvelopeServer,
) -> None:
    start_worker(SENTRY_DSN=envelope_server.dsn, NETCORE_API_KEY=WRONG_API_KEY)
    payloads = [
        [event("s-1", "asset-e2e-1", identity=IDENTITY), event("s-2", "asset-e2e-1", identity=EMAIL)],
        [event("s-3", "asset-e2e-2", annonid=ANNONID,
               activity_params={"event_id": "s-3", "email": EMAIL, "mobile": MOBILE})],
    ]
    publish_events(queues.settings.queue, payloads)
    assert dead_letters.wait_for(3, DEADLINE), dead_letters.by_reason()
    assert dead_letters.by_reason() == {deadletter.UNAUTHORIZED: 3}

    def two_failures(events: list[dict[str, Any]]) -> bool:
        return len([e for e in events if e.get("tags", {}).get("reason") == deadletter.UNAUTHORIZED]) >= 2

    # The worker reports before it publishes the dead letters: by now the reports are on their way.
    assert envelope_server.wait_for(two_failures, 30), (
        f"no unauthorized failure reached Sentry (does delivery call report_failure?): "
        f"{[message_of(e) for e in envelope_server.events()]}"
    )
    failures = [e for e in envelope_server.events() if e.get("tags", {}).get("reason") == deadletter.UNAUTHORIZED]
    assert {e["tags"]["asset_id"] for e in failures} == {"asset-e2e-1", "asset-e2e-2"}
    assert {json.dumps(e["fingerprint"]) for e in failures} == {json.dumps(failure_fingerprint("unauthorized", 401))}
    for sent in failures:
        assert sent["level"] == "error"
        assert "API key is the likely cause" in message_of(sent), message_of(sent)
        assert sent["tags"]["region"] == "us"
    text = envelope_server.text()
    leaks = [s for s in (WRONG_API_KEY, IDENTITY, EMAIL, MOBILE, ANNONID, "customer-42@example.com") if s in text]
    assert not leaks, f"leaked to Sentry: {leaks}"

"""The sandbox's request handler: one keep-alive connection, answered the way the API does.

An upload request goes through, in this order (each step can end it):

1. method (405) -> 2. ``Authorization`` (401) -> 3. fault rules (delay, odd answer, drop)
-> 4. ``Content-Type`` (400) -> 5. body and events (400) -> 6. store, 200.

Authentication comes before faults so a wrong key is always a plain 401, whatever faults are
set. The body is parsed once, right after authentication and outside the store's lock: the
faults need its asset ids (a rule may target one), and steps 4 to 6 and the request record
reuse the same events; a body that cannot be parsed fails only at step 5. Every upload
request is recorded *before* it is answered, so once a client has its answer the record is
there to inspect. Paths under ``/_sandbox/`` go to :mod:`worker.sandbox.control`.

It speaks HTTP/1.1 with keep-alive and always sends ``Content-Length``, so a worker reusing a
connection pool can push tens of thousands of events per second through it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol

from worker.sandbox.control import CONTROL_PREFIX, handle_control
from worker.sandbox.control import to_json as dumps
from worker.sandbox.rules import BadRequest, asset_ids, judge, parse_body
from worker.sandbox.store import RequestRecord, Store


class Served(Protocol):
    """What a request needs of the sandbox serving it (:class:`worker.sandbox.server.Sandbox`)."""

    store: Store
    stopping: threading.Event
    log_requests: bool

    def account_of(self, authorization: str | None) -> str | None: ...

    def track_connection(self, connection: socket.socket, *, open_: bool) -> None: ...


class Serving(Protocol):
    """The HTTP server a handler belongs to: it carries the sandbox."""

    sandbox: Served

log = logging.getLogger(__name__)

#: The one API endpoint the sandbox implements.
UPLOAD_PATH = "/v1/activity/upload"

#: Bodies larger than this are refused (413) unread: 1000 large events fit easily.
MAX_BODY_BYTES = 64 * 1024 * 1024

#: The answer to a request the API accepted.
SUCCESS = b'{"status":"success"}'

#: Answers of the steps before the body is looked at, as the vendor words them.
UNAUTHORIZED = {"status": "fail", "message": "Unauthorized | Invalid API Key"}
METHOD_NOT_ALLOWED = {"status": "fail", "message": "Method Not Allowed"}
NOT_FOUND = {"status": "fail", "message": "Not Found"}


class Handler(BaseHTTPRequestHandler):
    """One connection; ``handle()`` loops over its keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server_version = "NetcoreSandbox/1.0"
    disable_nagle_algorithm = True  #: small answers must not wait for delayed ACKs
    wbufsize = 64 * 1024  #: headers and body leave in one write (flushed after each request)
    server: Serving  # type: ignore[assignment]  # the socketserver's, which carries the sandbox
    arrived: float = 0.0  #: unix time the current request's headers were read
    account: str | None = None  #: the account whose key the current request carries
    trickle: float = 0.0  #: seconds between the bytes of the current answer (a trickle fault)

    def setup(self) -> None:
        super().setup()
        self.server.sandbox.track_connection(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sandbox.track_connection(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's own stderr lines; requests are logged by :meth:`_log`."""

    def do_POST(self) -> None:
        self._route()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_POST

    def _route(self) -> None:
        self.arrived = time.time()
        self.account, self.trickle = None, 0.0
        body = self._read_body()
        if body is None:
            return
        path = self.path.split("?", 1)[0]
        if path == UPLOAD_PATH:
            self._upload(body)
        elif path.startswith(CONTROL_PREFIX):
            store = self.server.sandbox.store
            status, payload = handle_control(store, self.command, self.path, body)
            self._send(status, dumps(payload))
        else:
            self._send(404, dumps(NOT_FOUND))

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering a body the sandbox will not read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(411, dumps({"status": "fail", "message": "Length Required"}))
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413 if length > 0 else 400, dumps({"status": "fail", "message":
                                                          "Bad Content-Length"}))
            return None
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # the client went away mid-body
            self.close_connection = True
            return None
        return body

    def _upload(self, body: bytes) -> None:
        sandbox = self.server.sandbox
        self.account = sandbox.account_of(self.headers.get("Authorization"))
        if self.command != "POST":
            self._refuse(405, METHOD_NOT_ALLOWED, {"Allow": "POST"})
        elif self.account is None:
            self._refuse(401, UNAUTHORIZED)
        else:
            events, problem = _read_events(body)
            assets = tuple(asset_ids(events))
            decision = sandbox.store.decide_fault(assets, self.account)
            self.trickle = decision.trickle
            if decision.latency:
                sandbox.store.arrived(+1)  # a test can wait for "an upload is in progress"
                try:
                    sandbox.stopping.wait(decision.latency)  # stop() cuts a long delay short
                finally:
                    sandbox.store.arrived(-1)
            if decision.answer is None:
                self._accept(body, events, assets, problem, decision.applied)
            elif decision.answer.drop:
                self._drop(events, assets, decision.applied)
            else:
                self._fault(events, assets, decision.applied, *decision.answer.response())

    def _accept(self, body: bytes, events: list[Any], assets: tuple[str, ...],
                problem: BadRequest | None, fault: dict[str, Any] | None) -> None:
        """Steps 4 to 6: the rules of the API itself."""
        try:
            if self.headers.get_content_type() != "application/json":
                raise BadRequest("Bad Request | Content-Type must be application/json")
            if problem is not None:
                raise problem
            verdict = judge(events, body)
        except BadRequest as error:
            payload = {"status": "fail", "message": str(error)}
            return self._finish(400, dumps(payload), events, assets, fault, str(error))
        record = RequestRecord(200, len(events), assets, fault, at=self.arrived, account=self.account)
        dropped = [events[index] for index in verdict.dropped]
        self.server.sandbox.store.record(
            record, body=body, stored=verdict.stored, total=len(events), dropped=dropped
        )
        self._log(record)
        self._send(200, SUCCESS)

    def _fault(self, events: list[Any], assets: tuple[str, ...], fault: dict[str, Any] | None,
               status: int, headers: dict[str, str], answer: bytes) -> None:
        content_type = headers.pop("Content-Type")
        self._finish(status, answer, events, assets, fault, "fault", headers, content_type)

    def _drop(self, events: list[Any], assets: tuple[str, ...],
              fault: dict[str, Any] | None) -> None:
        """Close the connection without a word, like a crashed proxy."""
        record = RequestRecord(None, len(events), assets, fault, at=self.arrived, message="drop",
                               account=self.account)
        self.server.sandbox.store.record(record)
        self._log(record)
        self.close_connection = True

    def _refuse(self, status: int, payload: dict[str, str], headers: dict[str, str] | None = None
                ) -> None:
        """Steps 1 and 2: answered without looking at the body."""
        self._finish(status, dumps(payload), [], (), None, payload["message"], headers)

    def _finish(self, status: int, answer: bytes, events: list[Any], assets: tuple[str, ...],
                fault: dict[str, Any] | None, message: str, headers: dict[str, str] | None = None,
                content_type: str = "application/json") -> None:
        """Record a request that stored nothing, then answer it."""
        record = RequestRecord(status, len(events), assets, fault, at=self.arrived,
                               message=message, account=self.account)
        self.server.sandbox.store.record(record)
        self._log(record)
        self._send(status, answer, headers, content_type)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if not self.trickle:
            self.wfile.write(body)
            return
        self.wfile.flush()  # the headers now, then the body one byte at a time
        stopping = self.server.sandbox.stopping
        for index in range(len(body)):
            if stopping.wait(self.trickle):
                self.close_connection = True
                return
            self.wfile.write(body[index:index + 1])
            self.wfile.flush()

    def _log(self, record: RequestRecord) -> None:
        """One line per upload: status, event count, asset ids. Never identities or the key."""
        if self.server.sandbox.log_requests:
            log.info("%s %s -> %s events=%d asset_id=%s%s", self.command, UPLOAD_PATH,
                     record.status if record.status is not None else "dropped", record.events,
                     ",".join(record.asset_ids) or "-",
                     f" fault={record.fault}" if record.fault else "")


def _read_events(body: bytes) -> tuple[list[Any], BadRequest | None]:
    """The body's events, or no events and why: the problem is answered only if no fault
    answers first (a fault does not care what the body holds)."""
    try:
        return parse_body(body), None
    except BadRequest as problem:
        return [], problem

"""The sandbox's server: :class:`Sandbox` runs a threaded HTTP server in the background for
tests, demos and benchmarks, and is the in-process way to read what it received and to set
faults. How a request is answered is in :mod:`worker.sandbox.handler`.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from http.server import ThreadingHTTPServer
from typing import Any

from worker.sandbox.handler import Handler
from worker.sandbox.store import RequestRecord, Store

log = logging.getLogger(__name__)

#: The name of the account of the sandbox's own key (``api_key``).
DEFAULT_ACCOUNT = "default"

#: How often the accept loop looks for a stop request: bounds how long stop() takes.
SHUTDOWN_POLL_SECONDS = 0.05


class _Server(ThreadingHTTPServer):
    """One thread per connection, so requests held by a latency fault wait side by side, never
    one after another: 64 uploads delayed 0.15 s are all answered after about 0.15 s."""

    daemon_threads = True  #: a connection left open never keeps the process alive
    allow_reuse_address = True
    #: The listen backlog: connections the kernel completes before the accept loop takes them.
    #: A client opening more at once than this (a worker starting 64 uploads, a benchmark's
    #: burst) would see its extra SYNs dropped and retried a second later; the kernel caps it
    #: at net.core.somaxconn.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host, which can take seconds."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (a read timeout, a stop) is normal here."""
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class Sandbox:
    """A local, Netcore-compatible Activity API with a memory and programmable faults.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with Sandbox(seed=1) as sandbox:
            sandbox.add_fault(status=503, count=2)
            ...  # point the worker at sandbox.url
            assert sandbox.wait_until(lambda s: s.accepted_count() >= 10, timeout=5)
    """

    def __init__(self, *, api_key: str = "sandbox-key", host: str = "127.0.0.1", port: int = 0,
                 seed: int | None = None, log_requests: bool = False,
                 accounts: Mapping[str, str] | None = None) -> None:
        #: Account name -> its API key: each key is an account of its own (``api_key`` is
        #: ``default``'s); records, stored events and fault rules know which account a request is.
        self.accounts: dict[str, str] = {DEFAULT_ACCOUNT: api_key, **(accounts or {})}
        self.log_requests = log_requests
        self.store = Store(seed)
        self._address = (host, port)
        self._server: _Server | None = None
        self._bound: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self.stopping = threading.Event()  #: set by stop(): fault delays end early
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def start(self) -> Sandbox:
        """Listen (port 0 picks a free port) and serve from a daemon thread."""
        self.stopping.clear()
        self._server = _Server(self._address, self)
        host, port = self._server.server_address[:2]
        self._bound = (str(host), int(port))
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        args=(SHUTDOWN_POLL_SECONDS,),
                                        name="netcore-sandbox", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections, as a dead server would."""
        if self._server is None:
            return
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._connections_lock:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server = None

    @property
    def url(self) -> str:
        """The base URL (the worker appends ``/v1/activity/upload``); kept after stop()."""
        if self._bound is None:
            raise RuntimeError("the sandbox was never started: call start() first")
        host, port = self._bound
        return f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{port}"

    def account_of(self, authorization: str | None) -> str | None:
        """The account whose key an ``Authorization`` header carries (None: no valid key)."""
        for name, key in self.accounts.items():
            if authorization == f"Bearer {key}":
                return name
        return None

    def accepted(self, account: str | None = None) -> list[dict[str, Any]]:
        return self.store.accepted(account)

    def accepted_count(self, account: str | None = None) -> int:
        return self.store.accepted_count(account)

    def in_flight(self) -> int:
        """Upload requests being held by a latency fault right now (an upload in progress)."""
        return self.store.in_flight()

    def requests(self, since: int = 0) -> list[RequestRecord]:
        """One record per upload request, in arrival order, from position ``since`` on."""
        return self.store.requests(since)

    def dropped(self) -> list[dict[str, Any]]:
        return self.store.dropped()

    def add_fault(self, **rule: Any) -> None:
        """Append a fault rule (see :mod:`worker.sandbox.faults`); a bad rule raises ValueError."""
        with self.store.lock:
            self.store.faults.add(rule)

    def faults(self) -> list[dict[str, Any]]:
        with self.store.lock:
            return self.store.faults.rules()

    def clear_faults(self) -> None:
        self.store.clear_faults()

    def reset(self) -> None:
        self.store.reset()

    def wait_until(self, predicate: Callable[[Sandbox], bool], timeout: float) -> bool:
        """Wait, without polling, until ``predicate(self)`` holds; False after ``timeout`` s."""
        return self.store.wait_until(lambda: predicate(self), timeout)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def track_connection(self, connection: socket.socket, *, open_: bool) -> None:
        """Keep the open connections, so stop() can cut them (called by the handler)."""
        with self._connections_lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

"""A deadline for a whole upload request, not for each socket read.

requests' ``timeout`` bounds each wait for the socket: an API (or a proxy) that answers one byte
every few seconds never trips it, and holds an upload thread, its task message and the bundle's
other batches for as long as it likes. Here every connection the upload sessions make is
*watched*: :meth:`Deadlines.watch` gives a request a deadline, the connections it uses register
their sockets with it, and a thread of its own shuts those sockets down when the deadline passes.
The blocked read then fails at once, and the client reports a timeout (a transient failure).
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

#: The request watched on this thread (set by :meth:`Deadlines.watch`).
_current = threading.local()


class Watch:
    """One request's deadline and the sockets it uses."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.done = False
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                _cut(sock)
            elif sock not in self.sockets:
                self.sockets.append(sock)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            for sock in self.sockets:
                _cut(sock)

    def finish(self) -> None:
        with self._lock:
            self.done = True


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


class Deadlines:
    """The watchdog thread of a process's upload requests."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="upload-deadlines", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, seconds: float) -> Iterator[Watch]:
        """The requests made on this thread inside the block are cut off after ``seconds``."""
        watch = Watch(time.monotonic() + seconds)
        with self._changed:
            heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
            self._changed.notify()
        _current.watch = watch
        try:
            yield watch
        finally:
            _current.watch = None
            watch.finish()

    def _run(self) -> None:
        with self._changed:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._changed.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                _, _, watch = heapq.heappop(self._heap)
                watch.expire()


def _register(connection: HTTPConnection) -> None:
    watch: Watch | None = getattr(_current, "watch", None)
    if watch is not None and connection.sock is not None:
        watch.add(connection.sock)


class WatchedHTTPConnection(HTTPConnection):
    """An HTTP connection whose socket joins the current request's :class:`Watch`."""

    def connect(self) -> None:
        super().connect()
        _register(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self)  # a kept-alive connection, already connected
        super().request(*args, **kwargs)


class WatchedHTTPSConnection(WatchedHTTPConnection, HTTPSConnection):
    """The same, over TLS (HTTPSConnection's connect, then the watch)."""


class WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


#: What a pool manager makes pools of, so that every connection is watched.
WATCHED_POOLS = {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}

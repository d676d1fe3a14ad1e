"""The Netcore Activity API client: one pooled HTTP session, one function that classifies.

:func:`classify` is the single place that decides what an answer means; everything else asks
it. Its rules (the contract's "Outcomes"):

- 2xx with ``{"status": "success"}``: delivered.
- 2xx with anything else (an HTML page from a proxy, an empty body, ``{"status": "fail"}``):
  **transient**. We cannot tell whether Netcore stored the events, and losing them silently
  is worse than sending them twice; after the retry budget they are dead-lettered and can be
  replayed.
- 400 (and 413): the request's events are rejected; the caller bisects.
- 401: unauthorized (the API key). 403, 404, 405, 422: refused. All permanent.
- 408, 425, 429, 5xx, timeouts, connection errors: transient, with ``Retry-After`` if given.
- A TLS certificate error: permanent (``refused``); never retried, never downgraded to http.

A request has a deadline as a whole (``UPLOAD_TIMEOUT`` plus the connect timeout), not only per
socket read: an answer that trickles in is cut off (:mod:`worker.upload.deadline`).
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from worker.errors import Refused, Rejected, Transient, Unauthorized
from worker.events import jsonutil
from worker.upload.deadline import WATCHED_POOLS, Deadlines

#: Statuses worth retrying.
TRANSIENT_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))

#: Permanent statuses other than 400/401, each dead-lettered as ``refused``.
REFUSED_STATUSES = frozenset({403, 404, 405, 413, 422})

#: How much of a response body goes into logs and dead letters.
BODY_EXCERPT = 300


class ApiClient:
    """Posts batches to ``url`` with the API key, over one pooled session per process."""

    def __init__(
        self,
        *,
        url: str,
        api_key: str,
        timeout: float,
        connect_timeout: float,
        session: requests.Session | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.url = url
        self.timeout = (min(connect_timeout, timeout), timeout)
        #: The longest a whole request may take: connecting, sending, the answer to its last byte.
        self.deadline = self.timeout[0] + timeout
        self.deadlines = deadlines or process_deadlines()
        self._shared = session
        #: One session (one keep-alive connection) per upload thread: requests' sessions are not
        #: documented as thread-safe, and a connection each is what many requests in flight need.
        self._local = threading.local()
        #: The request every upload sends, prepared once (URL, the session's default headers, the
        #: API key; by the session given, if any, as ``Session.post`` would): each post copies it
        #: and sets the body. Preparing it anew per request (what
        #: ``Session.post`` does) cost a tenth of the worker's CPU with 1000 asset_ids' small batches.
        self._template = (session or _session()).prepare_request(requests.Request(
            "POST", url, headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}))
        #: What requests would read from the environment for this URL on every request (proxies
        #: such as HTTPS_PROXY, a CA bundle such as REQUESTS_CA_BUNDLE), read once: each lookup
        #: (a ~/.netrc search among them) cost more than a request to a nearby API.
        #: (A session given by the caller keeps its own settings.)
        environment = requests.Session().merge_environment_settings(url, {}, None, None, None)
        self._options: dict[str, Any] = {} if session is not None else {
            "proxies": environment["proxies"], "verify": environment["verify"], "cert": environment["cert"]}

    def post(self, events: Sequence[Any]) -> None:
        """Upload ``events`` (one asset_id, 1..1000); raise Transient or Permanent on failure.

        Events given as JSON text are forwarded exactly as received, without re-encoding.
        """
        if all(isinstance(event, str) for event in events):
            body = ("[" + ",".join(events) + "]").encode("utf-8")
        else:
            body = jsonutil.dumps(list(events))
        request = self._template.copy()
        request.prepare_body(body, None)
        with self.deadlines.watch(self.deadline) as watch:
            try:
                response = self.session.send(request, timeout=self.timeout, **self._options)
            except requests.exceptions.SSLError as exc:
                if watch.expired:
                    raise Transient(f"no whole answer from the API within {self.deadline:g} s") from None
                raise Refused(
                    f"TLS failed talking to {self.url}: {type(exc).__name__}. Not retried: check the "
                    "URL and the certificate store",
                ) from None
            except requests.exceptions.Timeout:
                raise Transient(f"no answer from the API within {self.timeout[1]} s") from None
            except requests.exceptions.RequestException as exc:
                if watch.expired:
                    raise Transient(f"no whole answer from the API within {self.deadline:g} s") from None
                raise Transient(f"could not reach the API: {type(exc).__name__}") from None
        classify(response.status_code, response.text, response.headers.get("Retry-After"))

    @property
    def session(self) -> requests.Session:
        """This thread's session (or the one given, in tests)."""
        if self._shared is not None:
            return self._shared
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _session()
        return session

    def close(self) -> None:
        """Close this thread's session (other threads' close when their thread ends)."""
        self.session.close()


def classify(status: int, body: str, retry_after: str | None = None) -> None:
    """Return if the answer means "delivered"; raise Transient or Permanent otherwise."""
    excerpt = body[:BODY_EXCERPT]
    if 200 <= status < 300:
        if _is_success(body):
            return
        raise Transient(
            f"the API answered {status} without {{\"status\": \"success\"}}; delivery unknown",
            status=status,
            body=excerpt,
        )
    if status in TRANSIENT_STATUSES:
        raise Transient(
            f"the API answered {status}", status=status, body=excerpt, retry_after=parse_retry_after(retry_after)
        )
    if status == 400:
        raise Rejected("the API rejected the event (400 Bad Request)", status=status, body=excerpt)
    if status == 401:
        raise Unauthorized(
            "the API refused the API key (401 Unauthorized): check NETCORE_API_KEY and "
            "NETCORE_REGION, then replay the reason 'unauthorized'",
            status=status,
            body=excerpt,
        )
    raise Refused(f"the API refused the request ({status})", status=status, body=excerpt)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdecimal():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _is_success(body: str) -> bool:
    try:
        answer = jsonutil.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and str(answer.get("status", "")).lower() == "success"


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter, whose connections join their request's deadline (worker.upload.deadline)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(WATCHED_POOLS)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = dict(WATCHED_POOLS)
        return manager


_deadlines: Deadlines | None = None
_deadlines_lock = threading.Lock()


def process_deadlines() -> Deadlines:
    """The process's one watchdog of upload deadlines (a thread, started on first use)."""
    global _deadlines
    with _deadlines_lock:
        if _deadlines is None:
            _deadlines = Deadlines()
        return _deadlines


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # the environment's proxies and CA bundle were read once (ApiClient)
    adapter = _WatchedAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session

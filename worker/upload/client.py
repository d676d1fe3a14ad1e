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
    ) -> None:
        self.url = url
        self.timeout = (min(connect_timeout, timeout), timeout)
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
        try:
            response = self.session.send(request, timeout=self.timeout, **self._options)
        except requests.exceptions.SSLError as exc:
            raise Refused(
                f"TLS failed talking to {self.url}: {type(exc).__name__}. Not retried: check the "
                "URL and the certificate store",
            ) from None
        except requests.exceptions.Timeout:
            raise Transient(f"no answer from the API within {self.timeout[1]} s") from None
        except requests.exceptions.RequestException as exc:
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


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # the environment's proxies and CA bundle were read once (ApiClient)
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session

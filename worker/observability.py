"""What operators see of the worker in Sentry and Flower, and what they must never see there.

Three jobs, kept in one place so that a reviewer can check them together:

- **Failures, one kind at a time.** :func:`report_failure` is how delivery says "these events
  were dead-lettered, and why". It logs at ERROR only for what a person must act on (the API
  key, a refused endpoint, an API down for longer than the retry budget), so that Sentry pages
  for those and stays quiet about bad data from producers, which the dead-letter queue already
  holds. The log record carries the reason, the status and the asset_id as extras;
  :func:`make_before_send` turns them into tags and a fingerprint of (reason, status), so that
  a wrong key makes one Sentry issue, not one per batch.
- **Nothing secret or personal leaves.** :class:`Scrubber` walks the whole event (message,
  exception values, breadcrumbs, extra, contexts, request headers, at any depth) and removes
  the API key, ``Authorization``/``Bearer`` values, the broker's password and the userinfo of
  URLs, and personal data (identity, email, mobile, annonid, phone, email addresses and phone
  numbers inside text). sentry-sdk's own scrubber only knows a flat list of key names and does
  not read text, so it is kept but not relied on.
- **Flower never runs open.** ``python -m worker.observability flower ...`` refuses to start
  Flower without ``FLOWER_BASIC_AUTH``: Flower shows every worker and task and can shut
  workers down.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from config.settings import Settings
from worker import deadletter

#: Where failure records are logged: they tell delivery's story, so they carry its name.
failure_logger = logging.getLogger("worker.delivery")

#: What replaces a removed value (sentry-sdk's own word for it, so both scrubbers look alike).
REDACTED = "[Filtered]"

#: Log-record extras read by :func:`make_before_send` (set by :func:`report_failure`).
EXTRA_REASON = "netcore_reason"
#: The HTTP status of the failure, or None (a timeout, a connection error).
EXTRA_STATUS = "netcore_status"
#: The asset_id of the batch that failed.
EXTRA_ASSET_ID = "asset_id"
#: How many events the failure concerns (not part of the fingerprint: counts vary).
EXTRA_COUNT = "netcore_events"

#: First element of every failure fingerprint, so the worker's issues sort together.
FINGERPRINT_PREFIX = "netcore-activity"

#: Reasons that mean "the data is bad": the dead-letter queue holds the events and the
#: producer must fix them; an operator paged at night could do nothing. Logged as warnings:
#: breadcrumbs in Sentry, never events.
DATA_REASONS = frozenset({deadletter.MALFORMED, deadletter.INVALID, deadletter.REJECTED})

#: For each reason, what most likely went wrong: the first thing the person paged reads.
LIKELY_CAUSES: dict[str, str] = {
    deadletter.UNAUTHORIZED: (
        "the API key is the likely cause: Netcore did not accept NETCORE_API_KEY (check the key, "
        "and NETCORE_REGION: a key only works in its own data centre)"
    ),
    deadletter.REFUSED: (
        "the endpoint or the account is the likely cause: check NETCORE_REGION / NETCORE_API_URL "
        "and that the account may use the Activity API"
    ),
    deadletter.RETRIES_EXHAUSTED: (
        "the API or the network has been failing for longer than the retry budget "
        "(UPLOAD_MAX_RETRIES)"
    ),
    deadletter.REJECTED: "the API rejected these events although they pass the documented rules",
    deadletter.INVALID: "the producer sent events that break the API's rules",
    deadletter.MALFORMED: "the producer sent a body that is not JSON events",
}

#: Dict keys whose values are personal data; matched case-insensitively, ignoring ``-``/``_``
#: and anywhere in the key (``customer_email``, ``Mobile-No``).
PERSONAL_KEY_PARTS = ("identity", "email", "mobile", "annonid", "phone")

#: Dict keys whose values are secrets, matched like :data:`PERSONAL_KEY_PARTS`.
SECRET_KEY_PARTS = ("authorization", "basicauth", "apikey", "password", "passwd", "secret", "token", "cookie")

#: Known secrets (the API key, the broker password) shorter than this are not searched for
#: in text: replacing every "abc" would destroy the event and protect nothing.
MIN_SECRET_LENGTH = 4

#: Structures deeper than this are replaced whole rather than walked (and a cycle is cut).
MAX_DEPTH = 64

#: ``scheme://user:password@`` in any URL: the whole userinfo goes (amqp, amqps, https...).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s'\"<>]*@")

#: ``Bearer <token>`` anywhere in text.
_BEARER = re.compile(r"(?i)\bbearer\s+[^\s'\",;]+")

#: ``key: value`` / ``key=value`` / ``"key": "value"`` in text (JSON, reprs, query strings,
#: header dumps) for personal and secret keys; quoted values may hold escaped quotes.
_KEY_VALUE = re.compile(
    r"""(?ix)
    (?P<key>
        (?<![\w-])(?:\\?["'])?
        [\w-]*?(?:identity|e-?mail|mobile|annonid|phone|authorization|basic[-_]?auth
                 |api[-_]?key|password|passwd|secret|token|cookie)[\w-]*
        (?:\\?["'])?\s*[:=]\s*
    )
    (?P<value>
        "(?:[^"\\]|\\.)*"
      | '(?:[^'\\]|\\.)*'
      | \\"(?:(?!\\").)*\\"
      | \\'(?:(?!\\').)*\\'
      | (?:(?:bearer|basic)\s+)?[^\s,;&)}\[\]"']+
    )
    """
)

#: Email addresses in text.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

#: Phone numbers in text: 9 digits or more, optionally grouped by spaces, dashes or brackets.
#: Not inside words, ids, versions or IP addresses (the look-arounds), not ISO dates (below).
_PHONE = re.compile(r"(?<![\w.\-])\+?\(?\d(?:[ \-()]{0,2}\d){8,}(?![\w\-])")

#: ``2026-11-26 12...``: a date followed by an hour looks like a phone number; keep it.
_DATE_PREFIX = re.compile(r"\d{4}-\d{2}-\d{2}")

#: Values passed through untouched: they cannot hold text.
_PLAIN = (bool, int, float, Decimal, datetime, date, time, timedelta, UUID, type(None))


class Scrubber:
    """Removes secrets and personal data from any JSON-like structure.

    It returns cleaned copies and never changes what it is given: an event's ``extra`` may
    hold the caller's own objects (a batch being delivered).

    ``secrets`` are literal values (the API key, the broker password) removed wherever they
    appear, whatever the key or the text around them. :meth:`value` also learns, from the
    structure itself, the values of personal keys (an identity in the event's JSON) and removes
    them everywhere else in it too: a log line "failed for CUST-42" cannot be recognised as
    personal on its own, but it can when the same event says ``"identity": "CUST-42"``.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = _longest_first(secrets)

    def text(self, value: str, secrets: Sequence[str] | None = None) -> str:
        """One string, cleaned; the order matters (userinfo before emails: ``u:p@host.com``)."""
        for secret in self._secrets if secrets is None else secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        value = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)
        value = _BEARER.sub(f"Bearer {REDACTED}", value)
        value = _KEY_VALUE.sub(_redact_key_value, value)
        value = _EMAIL.sub(REDACTED, value)
        return _PHONE.sub(_redact_phone, value)

    def value(self, value: Any) -> Any:
        """Any value: dicts and lists walked at any depth, text cleaned, other objects by repr."""
        learned: set[str] = set()
        _learn(value, learned, 0, set())
        secrets = _longest_first([*self._secrets, *learned])
        return self._walk(value, secrets, 0, set())

    def _walk(self, value: Any, secrets: Sequence[str], depth: int, seen: set[int]) -> Any:
        if isinstance(value, str):
            return self.text(value, secrets)
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, (bytes, bytearray)):
            return self.text(bytes(value).decode("utf-8", "replace"), secrets)
        if depth >= MAX_DEPTH or id(value) in seen:
            return REDACTED
        if isinstance(value, dict):
            seen.add(id(value))
            cleaned: dict[Any, Any] = {}
            for key, item in value.items():
                name = self.text(key, secrets) if isinstance(key, str) else key
                sensitive = isinstance(key, str) and is_sensitive_key(key)
                cleaned[name] = REDACTED if sensitive else self._walk(item, secrets, depth + 1, seen)
            seen.discard(id(value))
            return cleaned
        if isinstance(value, (list, tuple, set, frozenset)):
            seen.add(id(value))
            items = [self._walk(item, secrets, depth + 1, seen) for item in value]
            seen.discard(id(value))
            return items
        if hasattr(value, "metadata") and hasattr(value, "value"):  # sentry-sdk's AnnotatedValue
            return type(value)(self._walk(value.value, secrets, depth + 1, seen), value.metadata)
        try:  # an object of the caller's: Sentry would send its repr; clean that instead
            return self.text(repr(value), secrets)
        except Exception:
            return REDACTED


def _longest_first(secrets: Iterable[str]) -> list[str]:
    """Distinct secrets worth searching for, longest first (so one containing another goes
    whole)."""
    return sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)


def _learn(value: Any, learned: set[str], depth: int, seen: set[int], *, sensitive: bool = False) -> None:
    """Collect into ``learned`` the values held under personal or secret keys, in
    structures and in text (``"identity": "CUST-42"`` inside a JSON string)."""
    if depth >= MAX_DEPTH:
        return
    if isinstance(value, str):
        if sensitive:
            learned.add(value)
        for match in _KEY_VALUE.finditer(value):
            learned.add(_unquote_value(match.group("value")))
        return
    if isinstance(value, (bool, int, float, Decimal)):
        if sensitive:
            learned.add(str(value))
        return
    if id(value) in seen:
        return
    if isinstance(value, dict):
        seen.add(id(value))
        for key, item in value.items():
            _learn(item, learned, depth + 1, seen,
                   sensitive=sensitive or (isinstance(key, str) and is_sensitive_key(key)))
    elif isinstance(value, (list, tuple, set, frozenset)):
        seen.add(id(value))
        for item in value:
            _learn(item, learned, depth + 1, seen, sensitive=sensitive)
    elif hasattr(value, "metadata") and hasattr(value, "value"):
        _learn(value.value, learned, depth + 1, seen, sensitive=sensitive)


def _unquote_value(value: str) -> str:
    """The bare value of a ``key: value`` match: no quotes, no ``Bearer`` scheme."""
    for quote in ('\\"', "\\'", '"', "'"):
        if value.startswith(quote) and value.endswith(quote) and len(value) >= 2 * len(quote):
            return value[len(quote):-len(quote)]
    return re.sub(r"(?i)^(?:bearer|basic)\s+", "", value)


def is_sensitive_key(key: str) -> bool:
    """Whether a dict key names personal data or a secret (``Authorization``, ``Email``...)."""
    folded = re.sub(r"[^a-z0-9]", "", key.lower())
    return any(part in folded for part in PERSONAL_KEY_PARTS + SECRET_KEY_PARTS)


def _redact_key_value(match: re.Match[str]) -> str:
    value = match.group("value")
    for quote in ('\\"', "\\'", '"', "'"):
        if value.startswith(quote):
            return f"{match.group('key')}{quote}{REDACTED}{quote}"
    return f"{match.group('key')}{REDACTED}"


def _redact_phone(match: re.Match[str]) -> str:
    found = match.group(0)
    return found if _DATE_PREFIX.match(found) else REDACTED


def secrets_of(settings: Settings) -> list[str]:
    """The literal secrets of a configuration: the API key and each broker password (as
    written in the URL and percent-decoded)."""
    secrets = [settings.api_key]
    for url in settings.broker_url.split(";"):
        try:
            password = urlsplit(url.strip()).password
        except ValueError:  # an unparsable URL: its userinfo is still removed by pattern
            continue
        if password:
            secrets += [password, unquote(password)]
    return [s for s in secrets if s]


def failure_fingerprint(reason: str, status: int | None) -> list[str]:
    """One Sentry issue per kind of failure: (reason, status), never asset_id or counts."""
    return [FINGERPRINT_PREFIX, reason, "none" if status is None else str(status)]


def make_before_send(settings: Settings) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, Any] | None]:
    """Sentry's ``before_send``: tag and fingerprint the worker's failures, then scrub.

    Tags and fingerprint are set first and scrubbed with the rest, so nothing added here can
    carry a secret either. Data failures (:data:`DATA_REASONS`) are dropped even if someone
    logs them at ERROR: they are in the dead-letter queue, not an operator's problem.
    """
    scrubber = Scrubber(secrets_of(settings))

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        extra = event.get("extra")
        extra = extra if isinstance(extra, dict) else {}
        record = hint.get("log_record") if isinstance(hint, dict) else None
        reason = extra.get(EXTRA_REASON, getattr(record, EXTRA_REASON, None))
        status = extra.get(EXTRA_STATUS, getattr(record, EXTRA_STATUS, None))
        asset_id = extra.get(EXTRA_ASSET_ID, getattr(record, EXTRA_ASSET_ID, None))
        if reason in DATA_REASONS:
            return None
        tags = event.get("tags")
        if not isinstance(tags, dict):
            tags = event["tags"] = {}
        tags["region"] = settings.region
        if isinstance(reason, str) and reason:
            tags["reason"] = reason
            tags["status"] = "none" if status is None else str(status)
            event["fingerprint"] = failure_fingerprint(reason, status if isinstance(status, int) else None)
        if isinstance(asset_id, str) and asset_id:
            tags["asset_id"] = asset_id
        return scrubber.value(event)

    return before_send


def setup_sentry(settings: Settings) -> bool:
    """Report errors to Sentry when ``SENTRY_DSN`` is set; return whether it was set up.

    Celery integration for task failures; logging integration so that ERROR records (the
    worker's own failure reports) become events and lower ones breadcrumbs. No default PII
    and no local variables: event payloads and the API key live in locals.
    """
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    before_send = make_before_send(settings)
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        send_default_pii=False,
        include_local_variables=False,
        integrations=[CeleryIntegration(), LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
        before_send=before_send,
        before_send_transaction=before_send,
    )
    return True


def flush_sentry(timeout: float = 2.0) -> None:
    """Send what Sentry still holds: pool processes leave through ``os._exit``, past atexit."""
    if "sentry_sdk" not in sys.modules:
        return
    import sentry_sdk

    client = sentry_sdk.get_client()
    if client.is_active():
        client.flush(timeout=timeout)


def report_failure(reason: str, status: int | None, asset_id: str, count: int, message: str) -> None:
    """Log that ``count`` events of ``asset_id`` were dead-lettered for ``reason``.

    ERROR (a Sentry event, one issue per (reason, status)) for what an operator must fix;
    WARNING (a breadcrumb, no event) for bad data, which producers fix from the dead letters.
    The message leads with the likely cause, so the page says what to do.
    """
    level = logging.WARNING if reason in DATA_REASONS else logging.ERROR
    cause = LIKELY_CAUSES.get(reason, "see the dead letters' details")
    failure_logger.log(
        level,
        "%d events for asset_id=%s dead-lettered as '%s' (HTTP status %s): %s. Details: %s",
        count, asset_id, reason, "none" if status is None else status, cause, message,
        extra={EXTRA_REASON: reason, EXTRA_STATUS: status, EXTRA_ASSET_ID: asset_id, EXTRA_COUNT: count},
    )


#: Flower's own setting (Flower reads ``FLOWER_*`` variables itself): ``user:password``,
#: several separated by commas.
FLOWER_AUTH_VARIABLE = "FLOWER_BASIC_AUTH"


def check_flower_auth(value: str | None) -> str | None:
    """None if ``value`` is usable Flower basic auth, else the sentence saying why not."""
    if not value or not value.strip():
        return (
            f"{FLOWER_AUTH_VARIABLE} is not set: Flower shows every task and can shut workers "
            f"down, so it does not run without a password. Set {FLOWER_AUTH_VARIABLE}=user:password "
            "(`make run` makes one up for local use)"
        )
    for pair in value.split(","):
        user, _, password = pair.partition(":")
        if not user.strip() or not password:
            return f"{FLOWER_AUTH_VARIABLE} must be user:password (several separated by commas)"
    return None


def run_flower(argv: Sequence[str]) -> int:
    """Replace this process with Flower (``celery -A worker.app flower argv...``), after
    checking it will ask for a password. Flower reads the credentials from the environment
    itself, so they never show in the process list."""
    problem = check_flower_auth(os.environ.get(FLOWER_AUTH_VARIABLE))
    if problem is not None:
        print(f"netcore-activity-worker: refusing to start Flower: {problem}", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "flower", *argv]
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # not reached: execv replaces the process


def main(argv: Sequence[str]) -> int:
    """``python -m worker.observability flower [flower options...]``."""
    if not argv or argv[0] != "flower":
        print("usage: python -m worker.observability flower [flower options...]", file=sys.stderr)
        return 2
    return run_flower(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

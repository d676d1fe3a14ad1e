"""Scrubbing: nothing secret or personal leaves the worker in an error report.

:class:`Scrubber` walks a whole Sentry event (message, exception values, breadcrumbs, extra,
contexts, request headers, at any depth) and removes the API key, ``Authorization``/``Bearer``
values, the broker's password and the userinfo of URLs, and personal data (identity, email,
mobile, annonid, phone, email addresses and phone numbers inside text). sentry-sdk's own
scrubber only knows a flat list of key names and does not read text, so it is kept but not
relied on. Used by :mod:`worker.ops.sentry`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from config.settings import Settings

#: What replaces a removed value (sentry-sdk's own word for it, so both scrubbers look alike).
REDACTED = "[Filtered]"

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

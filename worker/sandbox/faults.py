"""Fault rules: how the sandbox misbehaves on purpose, so the worker's retries can be tested.

A rule is a small dict, for example::

    {"status": 500, "count": 3}                     # the next 3 uploads get a 500
    {"status": 429, "retry_after": 2, "count": 1}   # ... with ``Retry-After: 2``
    {"status": 503, "rate": 0.05}                   # each upload fails with probability 5 %
    {"latency": 1.5, "count": 2}                    # the next 2 uploads answer 1.5 s late
    {"drop": True, "count": 1}                      # close the connection, answer nothing
    {"status": 200, "body": "<html/>", "content_type": "text/html"}  # odd 200, nothing stored
    {"status": 503, "asset_id": "tenant-b"}         # only uploads of tenant-b's events fail
    {"status": 503, "account": "brand-b"}           # only uploads with brand-b's key fail
    {"trickle": 0.5}                                # the answer comes one byte every 0.5 s
    {"status": 429, "retry_after": 1, "per_second": 5}  # a rate limit: 5 uploads a second pass

``count`` omitted means "until cleared". Rules apply only to upload requests that passed
authentication (a wrong key is always a 401, so auth tests never depend on faults).

``account`` (an account's name: the sandbox serves several keys, each its own account) narrows a
rule to requests made with that account's key, as ``asset_id`` does to its events; both may be
given. ``trickle`` answers normally but sends the answer one byte every ``trickle`` seconds, a
server that keeps a socket alive without ever finishing (a read timeout per byte never fires).

``per_second`` makes a rule a rate limit, as the real API's: in each second (counted from the first
request it applies to in that second) the first ``per_second`` requests pass it by, and it fires
on the rest. One rule is one limit: without ``account`` every account shares it; for a limit per
account, add one rule per account (as ``--rate-limit`` does).

``asset_id`` (a non-empty string) narrows a rule to upload requests with at least one event
carrying that ``asset_id``: the API failing for one tenant while the others go through. Other
requests, and bodies with no readable events, pass it by as if it were not there: it neither
fires, nor draws its ``rate``, nor uses its ``count``.

Rules are checked in order. A rule *fires* when it applies to the request (its ``asset_id`` and
``account``), has count left and, if it has a ``rate``, when the seeded random draw says so, or,
if it has a ``per_second``, when its second's requests are used up; a fired rule uses up one of
its count. A request an earlier rule answered never reaches, nor counts against, a later limit. A latency-only rule adds its delay and lets the next rules be
checked; the first fired rule with an outcome (``status`` or ``drop``) decides the answer and
ends the search. Nothing is stored for a request a fault answered.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

#: The keys a rule may hold.
RULE_KEYS = frozenset({"status", "count", "rate", "retry_after", "latency", "drop", "body",
                       "content_type", "asset_id", "account", "trickle", "per_second"})

#: The window of a ``per_second`` rule, seconds.
RATE_WINDOW = 1.0

#: Messages the vendor documents for some statuses; others use the standard HTTP phrase.
VENDOR_MESSAGES: dict[int, str] = {408: "Request Time Out", 500: "Internal Server Error"}


class FaultError(ValueError):
    """A fault rule that makes no sense; ``str()`` says which key is wrong."""


@dataclass
class FaultRule:
    """One rule, checked once when added so a typo fails loudly instead of never firing."""

    spec: dict[str, Any]  #: the rule as given (reported in request records)
    status: int | None = None
    count: int | None = None  #: uses left; None = until cleared
    rate: float | None = None
    retry_after: str | None = None
    latency: float = 0.0
    drop: bool = False
    body: bytes | None = None
    content_type: str = "application/json"
    asset_id: str | None = None  #: only requests with an event of this asset_id; None = all
    account: str | None = None  #: only requests made with this account's key; None = all
    trickle: float = 0.0  #: seconds between the bytes of the answer (0: all at once)
    per_second: int | None = None  #: requests a second that pass the rule by; None = no limit
    _window_start: float | None = None  #: when the current ``per_second`` window began
    _window_passed: int = 0  #: requests let through in it

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> FaultRule:
        """Build and check a rule from its dict form (the HTTP control API and the CLI)."""
        unknown = set(spec) - RULE_KEYS
        if unknown:
            raise FaultError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}")
        rule = cls(spec=dict(spec))
        rule.status = _status(spec.get("status"))
        rule.count = _positive_int("count", spec.get("count"))
        rule.rate = _rate(spec.get("rate"))
        rule.latency = _non_negative("latency", spec.get("latency", 0.0))
        rule.drop = _flag(spec.get("drop", False))
        rule.retry_after = _retry_after(spec.get("retry_after"))
        rule.body = None if spec.get("body") is None else _text("body", spec["body"]).encode()
        rule.content_type = _text("content_type", spec.get("content_type", rule.content_type))
        rule.asset_id = _name("asset_id", spec.get("asset_id"))
        rule.account = _name("account", spec.get("account"))
        rule.trickle = _non_negative("trickle", spec.get("trickle", 0.0))
        rule.per_second = _positive_int("per_second", spec.get("per_second"), " (requests a second)")
        rule._check_coherent()
        return rule

    @property
    def decides(self) -> bool:
        """True when the rule chooses the answer (a status or a drop), not just a delay."""
        return self.status is not None or self.drop

    def applies_to(self, asset_ids: Collection[str], account: str | None = None) -> bool:
        """Whether a request of ``account`` whose events carry ``asset_ids`` is one this rule is about."""
        return ((self.asset_id is None or self.asset_id in asset_ids)
                and (self.account is None or self.account == account))

    def fires(self, rng: random.Random, now: float) -> bool:
        """Whether the rule fires for a request it applies to at ``now`` (its ``rate``, or its
        ``per_second`` limit passed); uses up one of its count if it does."""
        if self.rate is not None and rng.random() >= self.rate:
            return False
        if self.per_second is not None and self._within_limit(now):
            return False
        if self.count is not None:
            self.count -= 1
        return True

    def _within_limit(self, now: float) -> bool:
        """Count one request against the ``per_second`` window: True while it has room."""
        assert self.per_second is not None
        if self._window_start is None or now - self._window_start >= RATE_WINDOW:
            self._window_start, self._window_passed = now, 0
        if self._window_passed < self.per_second:
            self._window_passed += 1
            return True
        return False

    @property
    def spent(self) -> bool:
        return self.count is not None and self.count <= 0

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The status, extra headers and body a fault with a ``status`` answers with."""
        assert self.status is not None
        headers = {"Content-Type": self.content_type}
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return self.status, headers, self._default_body() if self.body is None else self.body

    def _default_body(self) -> bytes:
        """A body shaped like the API's: a 200 pretends success, anything else fails."""
        if self.status is not None and 200 <= self.status < 300:
            return b'{"status":"success"}'
        status = self.status or 500
        message = VENDOR_MESSAGES.get(status) or HTTPStatus(status).phrase
        return json.dumps({"status": "fail", "message": message}).encode()

    def _check_coherent(self) -> None:
        if not (self.decides or self.latency > 0 or self.trickle > 0):
            raise FaultError("a rule needs 'status', 'drop', a positive 'latency' or a positive 'trickle'")
        if self.trickle and self.drop:
            raise FaultError("'drop' answers nothing, so it cannot 'trickle'")
        if self.per_second is not None and self.rate is not None:
            raise FaultError("a rule is either random ('rate') or a limit ('per_second'), not both")
        if self.drop and self.status is not None:
            raise FaultError("'drop' answers nothing, so it cannot have a 'status'")
        answer_keys = {"body", "content_type", "retry_after"} & set(self.spec)
        if answer_keys and self.status is None:
            raise FaultError(f"{sorted(answer_keys)} need a 'status'")


@dataclass(frozen=True)
class Decision:
    """What the faults do to one request: a delay, and maybe the rule that answers it."""

    latency: float = 0.0
    answer: FaultRule | None = None  #: None = handle the request normally
    applied: dict[str, Any] | None = None  #: the rule to report: the answering one, else a delay
    trickle: float = 0.0  #: seconds between the answer's bytes


class FaultPlan:
    """The ordered list of rules and the seeded random source. Not thread-safe: hold a lock."""

    def __init__(self, seed: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._seed = seed
        self._clock = clock
        self._random = random.Random(seed)
        self._rules: list[FaultRule] = []

    def add(self, spec: Mapping[str, Any]) -> FaultRule:
        rule = FaultRule.from_dict(spec)
        self._rules.append(rule)
        return rule

    def clear(self) -> None:
        self._rules.clear()

    def reset(self) -> None:
        """Forget every rule and restart the random source, so a seeded run repeats exactly."""
        self.clear()
        self._random = random.Random(self._seed)

    def rules(self) -> list[dict[str, Any]]:
        """The active rules, each as given plus ``remaining`` uses (null = until cleared)."""
        return [{**rule.spec, "remaining": rule.count} for rule in self._rules]

    def decide(self, asset_ids: Collection[str] = (), account: str | None = None) -> Decision:
        """Check the rules in order for one request of ``account`` whose events carry
        ``asset_ids``, using up the counts of those that fire."""
        latency, trickle, delay_rule = 0.0, 0.0, None
        now = self._clock()
        for rule in list(self._rules):
            if not rule.applies_to(asset_ids, account) or not rule.fires(self._random, now):
                continue
            if rule.spent:
                self._rules.remove(rule)
            latency += rule.latency
            trickle = max(trickle, rule.trickle)
            if rule.decides:
                return Decision(latency, rule, dict(rule.spec), trickle)
            delay_rule = rule
        return Decision(latency, None, None if delay_rule is None else dict(delay_rule.spec), trickle)


def _status(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 200 <= value <= 599:
        raise FaultError(f"'status' must be an HTTP status 200..599, not {value!r}")
    return value


def _positive_int(name: str, value: Any, what: str = "") -> int | None:
    """``value`` if it is a positive integer, None if absent; ``what`` says what it counts."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FaultError(f"{name!r} must be a positive integer{what}, not {value!r}")
    return value


def _rate(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise FaultError(f"'rate' must be a probability 0..1, not {value!r}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FaultError(f"{name!r} must be a number of seconds >= 0, not {value!r}")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise FaultError(f"'drop' must be true or false, not {value!r}")
    return value


def _retry_after(value: Any) -> str | None:
    """``Retry-After`` as sent: seconds (``2``, ``1.5``) or an HTTP date given as a string."""
    if value is None or isinstance(value, str):
        return value
    seconds = _non_negative("retry_after", value)
    return str(int(seconds)) if seconds.is_integer() else str(seconds)


def _name(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise FaultError(f"{key!r} must be a non-empty string, not {value!r}")
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FaultError(f"{name!r} must be a string, not {value!r}")
    return value

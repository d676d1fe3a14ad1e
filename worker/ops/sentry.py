"""What operators see of the worker in Sentry and Flower, and what they must never see there.

Three jobs, kept in one place so that a reviewer can check them together:

- **Failures, one kind at a time.** :func:`report_failure` is how delivery says "these events
  were dead-lettered, and why". It logs at ERROR only for what a person must act on (the API
  key, a refused endpoint, an API down for longer than the retry budget), so that Sentry pages
  for those and stays quiet about bad data from producers, which the dead-letter queue already
  holds. The log record carries the reason, the status and the asset_id as extras;
  :func:`make_before_send` turns them into tags and a fingerprint of (reason, status, account),
  so that a wrong key makes one Sentry issue per account, not one per batch; an account's
  circuit opening is one issue per account too.
- **Nothing secret or personal leaves.** :class:`Scrubber` walks the whole event (message,
  exception values, breadcrumbs, extra, contexts, request headers, at any depth) and removes
  the API key, ``Authorization``/``Bearer`` values, the broker's password and the userinfo of
  URLs, and personal data (identity, email, mobile, annonid, phone, email addresses and phone
  numbers inside text). sentry-sdk's own scrubber only knows a flat list of key names and does
  not read text, so it is kept but not relied on.
  (:mod:`worker.ops.scrubbing`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, cast

from config.accounts import DEFAULT
from config.settings import Settings
from worker.deadletter import envelopes
from worker.ops.scrubbing import REDACTED, Scrubber, secrets_of  # noqa: F401 (REDACTED: re-exported)

#: Where failure records are logged: they tell delivery's story, so they carry its name.
failure_logger = logging.getLogger("worker.delivery")


#: Log-record extras read by :func:`make_before_send` (set by :func:`report_failure`).
EXTRA_REASON = "netcore_reason"
#: The HTTP status of the failure, or None (a timeout, a connection error).
EXTRA_STATUS = "netcore_status"
#: The asset_id of the batch that failed.
EXTRA_ASSET_ID = "asset_id"
#: How many events the failure concerns (not part of the fingerprint: counts vary).
EXTRA_COUNT = "netcore_events"
#: The Netcore account (its name, never its key).
EXTRA_ACCOUNT = "netcore_account"

#: First element of every failure fingerprint, so the worker's issues sort together.
FINGERPRINT_PREFIX = "netcore-activity"

#: Reasons that mean "the data is bad": the dead-letter queue holds the events and the
#: producer must fix them; an operator paged at night could do nothing. Logged as warnings:
#: breadcrumbs in Sentry, never events.
DATA_REASONS = frozenset({envelopes.MALFORMED, envelopes.INVALID, envelopes.REJECTED})

#: For each reason, what most likely went wrong: the first thing the person paged reads.
LIKELY_CAUSES: dict[str, str] = {
    envelopes.UNAUTHORIZED: (
        "the API key is the likely cause: Netcore did not accept NETCORE_API_KEY (check the key, "
        "and NETCORE_REGION: a key only works in its own data centre)"
    ),
    envelopes.REFUSED: (
        "the endpoint or the account is the likely cause: check NETCORE_REGION / NETCORE_API_URL "
        "and that the account may use the Activity API"
    ),
    envelopes.RETRIES_EXHAUSTED: (
        "the API or the network has been failing for longer than the retry budget "
        "(UPLOAD_MAX_RETRIES)"
    ),
    envelopes.REJECTED: "the API rejected these events although they pass the documented rules",
    envelopes.INVALID: "the producer sent events that break the API's rules",
    envelopes.MALFORMED: "the producer sent a body that is not JSON events",
}

def failure_fingerprint(reason: str, status: int | None, account: str | None = None) -> list[str]:
    """One Sentry issue per kind of failure and account: (reason, status, account), never asset_id
    or counts."""
    return [FINGERPRINT_PREFIX, reason, "none" if status is None else str(status), account or "default"]


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
        account = extra.get(EXTRA_ACCOUNT, getattr(record, EXTRA_ACCOUNT, None))
        if reason in DATA_REASONS:
            return None
        tags = event.get("tags")
        if not isinstance(tags, dict):
            tags = event["tags"] = {}
        known = settings.accounts.named(account) if isinstance(account, str) else None
        # the account's region (the default account's is NETCORE_REGION, whatever NETCORE_API_URL says)
        tags["region"] = (known.region or "custom_url") if known is not None and known.name != DEFAULT \
            else settings.region
        if isinstance(account, str) and account:
            tags["account"] = account
        if isinstance(reason, str) and reason:
            tags["reason"] = reason
            tags["status"] = "none" if status is None else str(status)
            event["fingerprint"] = failure_fingerprint(reason, status if isinstance(status, int) else None,
                                                       account if isinstance(account, str) else None)
        if isinstance(asset_id, str) and asset_id:
            tags["asset_id"] = asset_id
        scrubbed: dict[str, Any] | None = scrubber.value(event)
        return scrubbed

    return before_send


def setup_sentry(settings: Settings) -> bool:
    """Report errors to Sentry when ``SENTRY_DSN`` is set; return whether it was set up.

    Celery integration for task failures; logging integration so that ERROR records (the
    worker's own failure reports) become events and lower ones breadcrumbs. No default PII
    (the SDK's default; ``send_default_pii=False`` only restated it and is deprecated, and its
    successor ``data_collection`` would turn off the SDK's own scrubber) and no local variables:
    event payloads and the API key live in locals.
    """
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration
    from sentry_sdk.types import Event, Hint

    before_send = make_before_send(settings)
    hook = cast("Callable[[Event, Hint], Event | None]", before_send)  # an Event is a dict: the hook reads it as one
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        include_local_variables=False,
        integrations=[CeleryIntegration(), LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
        before_send=hook,
        before_send_transaction=hook,
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


def report_failure(reason: str, status: int | None, asset_id: str, count: int, message: str,
                   account: str = "default") -> None:
    """Log that ``count`` events of ``asset_id`` (of ``account``) were dead-lettered for ``reason``.

    ERROR (a Sentry event, one issue per (reason, status, account)) for what an operator must
    fix; WARNING (a breadcrumb, no event) for bad data, which producers fix from the dead letters.
    The message leads with the likely cause, so the page says what to do.
    """
    level = logging.WARNING if reason in DATA_REASONS else logging.ERROR
    cause = LIKELY_CAUSES.get(reason, "see the dead letters' details")
    failure_logger.log(
        level,
        "%d events for account=%s asset_id=%s dead-lettered as '%s' (HTTP status %s): %s. Details: %s",
        count, account, asset_id, reason, "none" if status is None else status, cause, message,
        extra={EXTRA_REASON: reason, EXTRA_STATUS: status, EXTRA_ASSET_ID: asset_id, EXTRA_COUNT: count,
               EXTRA_ACCOUNT: account},
    )


class LogListener:
    """The upload side's story in the logs (and so in Sentry), per account: one line when an
    account's circuit opens, one when it closes, one when an asset_id is held, and each batch
    given up on (see :func:`report_failure`)."""

    def gave_up(self, *, account: str, reason: str, status: int | None, asset_id: str, events: int,
                error: str) -> None:
        report_failure(reason, status, asset_id, events, error, account)

    def circuit_opened(self, *, account: str, failures: int, assets: int, last_error: str, probe_in: float) -> None:
        failure_logger.error(
            "Account %s: its API looks down: %d uploads in a row failed, for %d asset_ids (last: %s). Circuit OPEN: "
            "its uploads are paused and its events wait in its RabbitMQ queues (the other accounts go on); probing "
            "every %.1f s and more (up to UPLOAD_PROBE_INTERVAL_MAX). Nothing is dead-lettered for it.",
            account, failures, assets, last_error, probe_in,
            extra={EXTRA_REASON: "circuit_open", EXTRA_STATUS: None, EXTRA_ACCOUNT: account},
        )

    def circuit_paused(self, *, account: str, seconds: float) -> None:
        failure_logger.warning("Account %s: the API asked to slow down (429): its uploads wait %.1f s", account,
                               seconds)

    def circuit_closed(self, *, account: str, open_for: float, probes: int) -> None:
        failure_logger.warning(
            "Account %s: the API answers again: circuit CLOSED after %.1f s and %d probe(s); its uploads resume, "
            "ramping up from one upload in flight.", account, open_for, probes,
        )

    def probe_done(self, *, account: str, ok: bool, next_in: float | None) -> None:
        if not ok:
            failure_logger.debug("Account %s: probe failed; next probe in %.1f s", account, next_in or 0.0)

    def asset_held(self, *, account: str, asset_id: str, failures: int, last_error: str) -> None:
        failure_logger.warning(
            "Account %s: asset_id=%s failed %d times in a row with no sign the API works (last: %s): its uploads "
            "wait, probed alone; the account's other asset_ids go on.", account, asset_id, failures, last_error)

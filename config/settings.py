"""Every setting of the worker, read from the environment and checked once at start-up.

A bad value raises :class:`~worker.errors.SettingsError` whose message names the setting, so that
``ACTIVITY_BATCH_SIZE=5000`` stops the worker with "ACTIVITY_BATCH_SIZE=5000: must be 1..1000"
instead of failing later, somewhere else. Nothing else in the worker reads ``os.environ``: the
two programs that pass the environment on unread (Flower, started with the worker's app, and
``make run``'s supervisor) take it from :func:`process_environment`. (The sandbox, a program of
its own that shares no code with the worker, reads its own.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from config import accounts as accounts_file
from config.accounts import DEFAULT, REGIONS, UPLOAD_PATH, Account, Accounts
from config.tls import BrokerTLS
from worker.errors import SettingsError

#: The API takes at most this many events in one request.
API_MAX_BATCH = 1000

#: The longest backoff (seconds) a setting may ask for. A retry waits in a RabbitMQ delay
#: queue, not in a worker, so this is about sense, not about RabbitMQ's consumer_timeout.
MAX_BACKOFF = 3600.0

#: The longest retry window a setting may ask for: Netcore stores events older than 24 hours
#: but no longer triggers journeys with them, so holding events longer buys nothing.
MAX_RETRY_WINDOW = 24 * 3600.0

#: The most uploads one worker process may keep in flight (threads of its pool).
MAX_UPLOAD_CONCURRENCY = 256

#: The most deliveries ACTIVITY_DELIVERY_LIMIT may allow: RabbitMQ 4.x quorum queues drop (or
#: dead-letter, where a target is set) a message handed back 20 times, and ``activities`` is
#: declared as producers declare it, without a target: a higher limit, on 4.x, loses messages.
MAX_DELIVERY_LIMIT = 20

T = TypeVar("T", int, float)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The worker's configuration. Build it with :meth:`from_env`; never mutate it."""

    broker_url: str = field(default="amqp://guest:guest@localhost:5672//", repr=False)
    #: TLS to the broker (config.tls) for an ``amqps://`` broker URL; None for ``amqp://``.
    broker_tls: BrokerTLS | None = None
    api_key: str = field(default="", repr=False)
    region: str = "us"
    api_url: str = field(default="", repr=False)
    queue: str = "activities"
    dead_letter_queue: str = "activities.dead"
    #: Celery's default queue: where ``send_task("activities.ingest", ...)`` lands when the
    #: producer's app is configured with nothing but the broker URL.
    task_queue: str = "celery"
    #: The internal queue of upload tasks (one message per batch).
    upload_queue: str = "activities.upload"
    #: ``classic`` or ``quorum`` (replicated, for a RabbitMQ cluster) for ACTIVITY_QUEUE.
    queue_type: str = "classic"
    #: On a quorum queue: a message delivered this many times without being handled (the
    #: worker died each time) is a suspect, handled alone, then ``poison`` (worker.ingest.pipeline).
    #: At most :data:`MAX_DELIVERY_LIMIT`: RabbitMQ 4.x drops a message handed back more often.
    delivery_limit: int = 10
    batch_size: int = API_MAX_BATCH
    batch_wait: float = 2.0
    batch_max_bytes: int = 4 * 1024 * 1024
    #: Unacknowledged messages the broker may hand the consumer (RabbitMQ's maximum is 65535):
    #: with many asset_ids, batches fill only as far as this window lets them.
    prefetch: int = 30_000
    upload_timeout: float = 10.0
    upload_connect_timeout: float = 3.05
    max_retries: int = 8
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    #: Seconds a failing batch may keep waiting for the API before it is dead-lettered as
    #: ``retries_exhausted`` whatever its attempts (an outage longer than this).
    retry_window: float = 6 * 3600.0
    #: The most uploads in flight at once (threads); the worker adapts below it (AIMD). 64: with
    #: 1000 asset_ids' small batches against a 150 ms API, 32 kept 0.59 x the instant API's
    #: rate, 64 0.90 x (``make bench``'s slow-API case run with 1000 asset_ids, 2026-12-05).
    upload_concurrency: int = 64
    #: The longest interval between two probes of an API that is down (the circuit is open).
    probe_interval_max: float = 60.0
    #: Port of the Prometheus endpoint ``/metrics`` (worker.ops.metrics), main process; 0: none.
    metrics_port: int = 9808
    #: Where that endpoint listens: loopback unless an operator opens it on purpose.
    metrics_address: str = "127.0.0.1"
    sentry_dsn: str = field(default="", repr=False)
    #: ``text`` (Celery's usual lines) or ``json`` (one JSON object per line, worker.ops.logs).
    log_format: str = "text"
    #: A timestamp without a zone (``2020-04-28T16:47:37``, as in the API's own samples):
    #: ``forward`` it as it is (the API accepts it; the worker counts it), or ``reject`` the
    #: event as invalid (dead-lettered, for teams that want every instant explicit).
    naive_timestamps: str = "forward"
    #: The accounts of NETCORE_ACCOUNTS_FILE, a TOML file of further Netcore accounts
    #: (config.accounts), read and checked once (by :meth:`from_env`).
    file_accounts: tuple[Account, ...] = field(default=(), repr=False)

    @property
    def api_base_url(self) -> str:
        """The default account's API: ``NETCORE_API_URL`` if set, else the region's."""
        return self.api_url or REGIONS[self.region]

    @property
    def upload_url(self) -> str:
        """Where the default account's batches are POSTed."""
        return self.api_base_url.rstrip("/") + UPLOAD_PATH

    @cached_property
    def accounts(self) -> Accounts:
        """Every account: ``default`` (``NETCORE_API_KEY``) when a key is set, then the file's."""
        default = Account(DEFAULT, self.api_key, self.api_base_url,
                          region="" if self.api_url else self.region) if self.api_key else None
        return Accounts.of(list(self.file_accounts), default)

    @property
    def broker_url_redacted(self) -> str:
        """The broker URL with its password masked, for logs."""
        return redact_url(self.broker_url)

    def broker_ssl(self) -> dict[str, Any] | None:
        """kombu's ``ssl`` options for every connection to the broker (a new dict each call), or
        None for a plain ``amqp://`` broker."""
        return self.broker_tls.ssl_options() if self.broker_tls is not None else None

    def check_api_key(self) -> None:
        """Raise :class:`SettingsError` unless there is an account to upload to (the worker needs
        one; the dead-letter command and producers do not)."""
        if not self.accounts:
            raise SettingsError(
                "NETCORE_API_KEY is not set (and no NETCORE_ACCOUNTS_FILE names an account): the worker has no key "
                "to upload with (for a local try-out, `make run` starts the sandbox API instead)"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, require_api: bool = True) -> Settings:
        """Read and check every setting; raise :class:`SettingsError` naming the first bad one.

        ``require_api`` is off for tools that never call the API (the dead-letter command).
        """
        env = os.environ if env is None else env
        get = _Reader(env)
        region = get.text("NETCORE_REGION", "us").lower()
        if region not in REGIONS:
            raise SettingsError(f"NETCORE_REGION={region}: must be one of {', '.join(REGIONS)}")
        api_url = get.text("NETCORE_API_URL", "")
        if api_url and urlsplit(api_url).scheme not in ("http", "https"):
            raise SettingsError(f"NETCORE_API_URL={api_url}: must be an http:// or https:// URL")
        api_key = get.text("NETCORE_API_KEY", "")
        accounts_path = get.text("NETCORE_ACCOUNTS_FILE", "")
        file_accounts = tuple(accounts_file.load(accounts_path, env)) if accounts_path else ()
        backoff = get.number("UPLOAD_RETRY_BACKOFF", float, 1.0, low=0.0, high=MAX_BACKOFF)
        broker_url = get.text("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//")
        settings = cls(
            broker_url=broker_url,
            broker_tls=_broker_tls(broker_url, BrokerTLS.from_env(env)),
            api_key=api_key,
            region=region,
            api_url=api_url,
            queue=get.text("ACTIVITY_QUEUE", cls.queue),
            dead_letter_queue=get.text("ACTIVITY_DEAD_LETTER_QUEUE", cls.dead_letter_queue),
            task_queue=get.text("ACTIVITY_TASK_QUEUE", cls.task_queue),
            upload_queue=get.text("ACTIVITY_UPLOAD_QUEUE", cls.upload_queue),
            queue_type=get.choice("ACTIVITY_QUEUE_TYPE", ("classic", "quorum")),
            delivery_limit=get.number("ACTIVITY_DELIVERY_LIMIT", int, 10, low=1, high=MAX_DELIVERY_LIMIT),
            batch_size=get.number("ACTIVITY_BATCH_SIZE", int, API_MAX_BATCH, low=1, high=API_MAX_BATCH),
            batch_wait=get.number("ACTIVITY_BATCH_WAIT", float, 2.0, low=0.01, high=3600.0),
            batch_max_bytes=get.number(
                "ACTIVITY_BATCH_MAX_BYTES", int, cls.batch_max_bytes, low=1024, high=64 * 1024 * 1024
            ),
            prefetch=get.number("ACTIVITY_PREFETCH", int, cls.prefetch, low=1, high=65_535),
            upload_timeout=get.number("UPLOAD_TIMEOUT", float, 10.0, low=0.01, high=600.0),
            max_retries=get.number("UPLOAD_MAX_RETRIES", int, 8, low=0, high=100),
            retry_backoff=backoff,
            retry_backoff_max=get.number("UPLOAD_RETRY_BACKOFF_MAX", float, 300.0, low=0.0, high=MAX_BACKOFF),
            retry_window=get.number("UPLOAD_RETRY_WINDOW", float, cls.retry_window, low=1.0, high=MAX_RETRY_WINDOW),
            upload_concurrency=get.number("UPLOAD_CONCURRENCY", int, cls.upload_concurrency, low=1,
                                          high=MAX_UPLOAD_CONCURRENCY),
            probe_interval_max=get.number("UPLOAD_PROBE_INTERVAL_MAX", float, cls.probe_interval_max, low=0.1,
                                          high=MAX_BACKOFF),
            metrics_port=get.number("METRICS_PORT", int, cls.metrics_port, low=0, high=65_535),
            metrics_address=get.text("METRICS_ADDRESS", cls.metrics_address),
            sentry_dsn=get.text("SENTRY_DSN", ""),
            log_format=get.choice("LOG_FORMAT", ("text", "json")),
            naive_timestamps=get.choice("ACTIVITY_NAIVE_TIMESTAMPS", ("forward", "reject")),
            file_accounts=file_accounts,
        )
        settings.accounts  # noqa: B018  (an asset_id in two accounts stops start-up here)
        if require_api:
            settings.check_api_key()
        if settings.prefetch < settings.batch_size:
            raise SettingsError(
                f"ACTIVITY_PREFETCH={settings.prefetch}: must be at least ACTIVITY_BATCH_SIZE="
                f"{settings.batch_size}, or batches could never fill"
            )
        if settings.retry_backoff_max < settings.retry_backoff:
            raise SettingsError(
                f"UPLOAD_RETRY_BACKOFF_MAX={settings.retry_backoff_max:g}: must be at least "
                f"UPLOAD_RETRY_BACKOFF={settings.retry_backoff:g}"
            )
        names = {settings.queue, settings.dead_letter_queue, settings.task_queue, settings.upload_queue}
        if len(names) != 4:
            raise SettingsError(
                "ACTIVITY_QUEUE, ACTIVITY_DEAD_LETTER_QUEUE, ACTIVITY_TASK_QUEUE and "
                "ACTIVITY_UPLOAD_QUEUE must be four different queues"
            )
        return settings


def _broker_tls(broker_url: str, tls: BrokerTLS) -> BrokerTLS | None:
    """``tls`` for a broker URL (list) of ``amqps://`` nodes, None for plain ones; SettingsError for
    a list that mixes them, or TLS settings given for a plain broker (they would be ignored)."""
    schemes = {urlsplit(part.strip()).scheme for part in broker_url.split(";") if part.strip()}
    if schemes == {"amqps"}:
        return tls
    if "amqps" in schemes:
        raise SettingsError(f"CELERY_BROKER_URL={redact_url(broker_url)}: mixes amqps:// and other nodes: "
                            "every node of the list takes TLS, or none does")
    if tls.configured:
        name, path = next(iter(tls.configured.items()))
        raise SettingsError(f"{name}={path}: TLS settings need an amqps:// CELERY_BROKER_URL (it is "
                            f"{'/'.join(sorted(schemes))}://)")
    return None


class _Reader:
    """Reads typed values from an environment mapping, naming the variable in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str) -> str:
        value = self.env.get(name, "").strip()
        return value or default

    def choice(self, name: str, options: tuple[str, ...]) -> str:
        value = self.text(name, options[0]).lower()
        if value not in options:
            raise SettingsError(f"{name}={value}: must be one of {', '.join(options)}")
        return value

    def number(self, name: str, kind: Callable[[str], T], default: T, *, low: T, high: T) -> T:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw}: must be a number in {low}..{high}") from None
        if not low <= value <= high or value != value:  # value != value: NaN
            raise SettingsError(f"{name}={raw}: must be {low}..{high}")
        return value


def redact_url(url: str) -> str:
    """``amqp://user:secret@host//`` -> ``amqp://user:***@host//``, for each URL of a
    ``;``-separated failover list; URLs without a password are unchanged."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]  # as written: IPv6 brackets and port kept
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def process_environment() -> dict[str, str]:
    """A copy of this process's environment, for a program that hands it on to another."""
    return dict(os.environ)


def load_or_exit(*, require_api: bool = True) -> Settings:
    """Read the settings; on a bad one, say which on stderr and exit with status 2.

    Start-up is the place to stop: a traceback would bury the one line that matters.
    """
    try:
        return Settings.from_env(require_api=require_api)
    except SettingsError as exc:
        print(f"netcore-activity-worker: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

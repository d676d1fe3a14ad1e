"""Settings from the environment: defaults, every bad value named, secrets kept out of reprs."""

from __future__ import annotations

import pytest

from config.settings import API_MAX_BATCH, REGIONS, Settings, SettingsError, redact_url

pytestmark = pytest.mark.timeout(30)

KEY = "sk-live-0123456789abcdef-SECRET"
BROKER_PASSWORD = "br0ker-Pa55word"
BASE = {"NETCORE_API_KEY": KEY}


def load(**env: str) -> Settings:
    return Settings.from_env({**BASE, **env})


# --- defaults ---------------------------------------------------------------------------------


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert s.broker_url == "amqp://guest:guest@localhost:5672//"
    assert s.api_key == KEY
    assert s.region == "us"
    assert s.api_url == ""
    assert s.queue == "activities"
    assert s.dead_letter_queue == "activities.dead"
    assert s.batch_size == API_MAX_BATCH == 1000
    assert s.batch_wait == 2.0
    assert s.upload_timeout == 10.0
    assert s.max_retries == 8
    assert s.retry_backoff == 1.0
    assert s.retry_backoff_max == 300.0
    assert s.sentry_dsn == ""
    assert s.naive_timestamps == "forward"
    assert s.upload_url == "https://api2.netcoresmartech.com/v1/activity/upload"
    assert isinstance(s.batch_size, int)
    assert isinstance(s.max_retries, int)
    assert isinstance(s.batch_wait, float)


def test_defaults_match_the_dataclass_defaults() -> None:
    assert Settings.from_env({}, require_api=False) == Settings()


def test_blank_values_mean_default() -> None:
    s = load(ACTIVITY_BATCH_SIZE="  ", NETCORE_REGION="", UPLOAD_TIMEOUT="", ACTIVITY_QUEUE=" ")
    assert s.batch_size == 1000
    assert s.region == "us"
    assert s.upload_timeout == 10.0
    assert s.queue == "activities"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETCORE_API_KEY", KEY)
    monkeypatch.setenv("ACTIVITY_BATCH_SIZE", "250")
    monkeypatch.setenv("NETCORE_REGION", "in")
    s = Settings.from_env()
    assert s.batch_size == 250
    assert s.region == "in"


def test_valid_values_are_read() -> None:
    s = load(
        CELERY_BROKER_URL="amqp://u:p@rabbit:5672/vh",
        ACTIVITY_QUEUE="q.in",
        ACTIVITY_DEAD_LETTER_QUEUE="q.dead",
        ACTIVITY_BATCH_SIZE="1",
        ACTIVITY_BATCH_WAIT="0.25",
        UPLOAD_TIMEOUT="2.5",
        UPLOAD_MAX_RETRIES="0",
        UPLOAD_RETRY_BACKOFF="0",
        UPLOAD_RETRY_BACKOFF_MAX="0",
        UPLOAD_RETRY_WINDOW="10800",
        UPLOAD_CONCURRENCY="64",
        UPLOAD_PROBE_INTERVAL_MAX="30",
        SENTRY_DSN="https://abc@sentry.example/1",
    )
    assert s.broker_url == "amqp://u:p@rabbit:5672/vh"
    assert (s.queue, s.dead_letter_queue) == ("q.in", "q.dead")
    assert s.batch_size == 1
    assert s.batch_wait == 0.25
    assert s.upload_timeout == 2.5
    assert s.max_retries == 0
    assert s.retry_backoff == 0.0
    assert s.retry_backoff_max == 0.0
    assert (s.retry_window, s.upload_concurrency, s.probe_interval_max) == (10800.0, 64, 30.0)
    assert s.sentry_dsn == "https://abc@sentry.example/1"


# --- numbers ---------------------------------------------------------------------------------

#: name -> (values out of range, values at the edges that are accepted)
NUMERIC: dict[str, tuple[list[str], list[str]]] = {
    "ACTIVITY_BATCH_SIZE": (["0", "-1", "1001", "5000"], ["1", "1000"]),
    "ACTIVITY_BATCH_WAIT": (["0", "0.001", "-1", "3601", "nan", "inf", "-inf"], ["0.01", "3600"]),
    "ACTIVITY_BATCH_MAX_BYTES": (["1023", "0", str(64 * 1024 * 1024 + 1)], ["1024", str(64 * 1024 * 1024)]),
    "ACTIVITY_PREFETCH": (["0", "65536", "-5"], ["1", "65535"]),
    "UPLOAD_TIMEOUT": (["0", "-1", "601", "nan", "inf"], ["0.01", "600"]),
    "UPLOAD_MAX_RETRIES": (["-1", "101", "1000"], ["0", "100"]),
    "UPLOAD_RETRY_BACKOFF": (["-0.5", "3601", "nan", "inf"], ["0", "3600"]),
    "UPLOAD_RETRY_BACKOFF_MAX": (["0.5", "-1", "3601", "nan", "inf"], ["1", "3600"]),
    "UPLOAD_RETRY_WINDOW": (["0", "0.5", "86401", "nan", "inf"], ["1", "86400"]),
    "UPLOAD_CONCURRENCY": (["0", "-1", "257"], ["1", "256"]),
    "UPLOAD_PROBE_INTERVAL_MAX": (["0", "0.05", "3601", "nan"], ["0.1", "3600"]),
    # RabbitMQ 4.x drops a quorum queue's message handed back 20 times: the worker must see it first
    "ACTIVITY_DELIVERY_LIMIT": (["0", "21", "1000"], ["1", "20"]),
}

NON_NUMERIC = ["abc", "ten", "1,5", "10s", "0x10", "--1"]
INT_ONLY_BAD = ["1.5", "1e3", "nan"]
INT_SETTINGS = {"ACTIVITY_BATCH_SIZE", "ACTIVITY_BATCH_MAX_BYTES", "ACTIVITY_PREFETCH", "UPLOAD_MAX_RETRIES",
                "UPLOAD_CONCURRENCY", "ACTIVITY_DELIVERY_LIMIT"}


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name, (bad, _) in NUMERIC.items():
        cases += [(name, value) for value in bad + NON_NUMERIC]
        if name in INT_SETTINGS:
            cases += [(name, value) for value in INT_ONLY_BAD]
    return cases


@pytest.mark.parametrize(("name", "value"), _cases())
def test_bad_number_names_the_setting_and_value(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name}={value}: "), message
    assert KEY not in message


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, (_, ok) in NUMERIC.items() for v in ok])
def test_edge_values_are_accepted_and_read_as_given(name: str, value: str) -> None:
    extra = {
        "UPLOAD_RETRY_BACKOFF": {"UPLOAD_RETRY_BACKOFF_MAX": "3600"},
        "ACTIVITY_PREFETCH": {"ACTIVITY_BATCH_SIZE": "1"},
    }.get(name, {})
    settings = load(**{name: value, **extra})
    read = getattr(settings, ATTRIBUTES[name])
    assert read == (int(value) if name in INT_SETTINGS else float(value)) and isinstance(read, int if name in INT_SETTINGS else float)


#: The attribute each numeric setting is read into.
ATTRIBUTES = {
    "ACTIVITY_BATCH_SIZE": "batch_size", "ACTIVITY_BATCH_WAIT": "batch_wait",
    "ACTIVITY_BATCH_MAX_BYTES": "batch_max_bytes", "ACTIVITY_PREFETCH": "prefetch", "UPLOAD_TIMEOUT": "upload_timeout",
    "UPLOAD_MAX_RETRIES": "max_retries", "UPLOAD_RETRY_BACKOFF": "retry_backoff",
    "UPLOAD_RETRY_BACKOFF_MAX": "retry_backoff_max", "UPLOAD_RETRY_WINDOW": "retry_window",
    "UPLOAD_CONCURRENCY": "upload_concurrency", "UPLOAD_PROBE_INTERVAL_MAX": "probe_interval_max",
    "ACTIVITY_DELIVERY_LIMIT": "delivery_limit",
}


def test_a_prefetch_below_the_batch_size_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"^ACTIVITY_PREFETCH=999: must be at least ACTIVITY_BATCH_SIZE=1000"):
        load(ACTIVITY_PREFETCH="999")


def test_a_backoff_above_the_default_cap_is_refused_not_silently_capped() -> None:
    with pytest.raises(SettingsError, match=r"^UPLOAD_RETRY_BACKOFF_MAX=300: must be at least UPLOAD_RETRY_BACKOFF=600$"):
        load(UPLOAD_RETRY_BACKOFF="600")


def test_the_documented_example_message() -> None:
    with pytest.raises(SettingsError, match=r"^ACTIVITY_BATCH_SIZE=5000: must be 1\.\.1000$"):
        load(ACTIVITY_BATCH_SIZE="5000")


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


def test_backoff_max_below_backoff_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"^UPLOAD_RETRY_BACKOFF_MAX=5: "):
        load(UPLOAD_RETRY_BACKOFF="10", UPLOAD_RETRY_BACKOFF_MAX="5")
    s = load(UPLOAD_RETRY_BACKOFF="10", UPLOAD_RETRY_BACKOFF_MAX="10")
    assert s.retry_backoff == s.retry_backoff_max == 10.0


# --- timestamps without a zone ----------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("forward", "forward"), ("reject", "reject"), (" Reject ", "reject")])
def test_naive_timestamps_choice(value: str, expected: str) -> None:
    assert load(ACTIVITY_NAIVE_TIMESTAMPS=value).naive_timestamps == expected


@pytest.mark.parametrize("value", ["strict", "true", "drop", "forward,reject"])
def test_a_bad_naive_timestamps_choice_names_the_setting(value: str) -> None:
    with pytest.raises(SettingsError, match=rf"^ACTIVITY_NAIVE_TIMESTAMPS={value}: must be one of forward, reject$"):
        load(ACTIVITY_NAIVE_TIMESTAMPS=value)


def test_naive_timestamps_choices_are_the_ones_validation_knows() -> None:
    from worker.events.validation import NAIVE_TIMESTAMP_CHOICES, NAIVE_TIMESTAMPS_SETTING

    assert Settings.naive_timestamps == NAIVE_TIMESTAMP_CHOICES[0]
    for choice in NAIVE_TIMESTAMP_CHOICES:
        assert load(**{NAIVE_TIMESTAMPS_SETTING: choice}).naive_timestamps == choice


# --- region, URL, key -------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["mars", "usa", "u s", "eu-west-1", "1"])
def test_bad_region(region: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(NETCORE_REGION=region)
    message = str(info.value)
    assert message.startswith(f"NETCORE_REGION={region}: "), message
    for known in REGIONS:
        assert known in message


@pytest.mark.parametrize(
    ("region", "url"),
    [
        ("us", "https://api2.netcoresmartech.com/v1/activity/upload"),
        ("in", "https://apiin2.netcoresmartech.com/v1/activity/upload"),
        ("eu", "https://apieu2.netcoresmartech.com/v1/activity/upload"),
        ("EU", "https://apieu2.netcoresmartech.com/v1/activity/upload"),
        (" In ", "https://apiin2.netcoresmartech.com/v1/activity/upload"),
    ],
)
def test_upload_url_per_region(region: str, url: str) -> None:
    assert load(NETCORE_REGION=region).upload_url == url


@pytest.mark.parametrize(
    ("api_url", "upload_url"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/activity/upload"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/activity/upload"),
        ("https://proxy.example/netcore", "https://proxy.example/netcore/v1/activity/upload"),
    ],
)
def test_api_url_overrides_region(api_url: str, upload_url: str) -> None:
    assert load(NETCORE_REGION="eu", NETCORE_API_URL=api_url).upload_url == upload_url


@pytest.mark.parametrize("api_url", ["ftp://example.com", "api2.netcoresmartech.com", "localhost:8080"])
def test_api_url_must_be_http(api_url: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(NETCORE_API_URL=api_url)
    assert str(info.value).startswith(f"NETCORE_API_URL={api_url}: ")


@pytest.mark.parametrize("key", [None, "", "   "])
def test_missing_api_key(key: str | None) -> None:
    env = {} if key is None else {"NETCORE_API_KEY": key}
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith("NETCORE_API_KEY")
    settings = Settings.from_env(env, require_api=False)
    assert settings.api_key == ""


def test_queues_must_differ() -> None:
    with pytest.raises(SettingsError, match="ACTIVITY_QUEUE"):
        load(ACTIVITY_DEAD_LETTER_QUEUE="activities")


# --- secrets -------------------------------------------------------------------------------------


def _secret_settings(**extra: str) -> Settings:
    return load(
        CELERY_BROKER_URL=f"amqp://worker:{BROKER_PASSWORD}@rabbit.internal:5672/prod",
        SENTRY_DSN="https://sentrykey123@o1.ingest.sentry.io/42",
        **extra,
    )


def test_repr_hides_api_key_and_broker_password() -> None:
    s = _secret_settings()
    for text in (repr(s), str(s), f"{s!r}", "%s" % (s,)):
        assert KEY not in text
        assert BROKER_PASSWORD not in text
        assert "sentrykey123" not in text
    assert "region='us'" in repr(s)  # the rest is still there to read


def test_broker_url_redacted_property() -> None:
    s = _secret_settings()
    assert s.broker_url_redacted == "amqp://worker:***@rabbit.internal:5672/prod"
    assert BROKER_PASSWORD not in s.broker_url_redacted


def test_errors_never_carry_the_key() -> None:
    for env in ({"NETCORE_REGION": "xx"}, {"UPLOAD_TIMEOUT": "x"}, {"ACTIVITY_QUEUE": "activities.dead"}):
        with pytest.raises(SettingsError) as info:
            _secret_settings(**env)
        assert KEY not in str(info.value)
        assert BROKER_PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("amqp://user:secret@host//", "amqp://user:***@host//"),
        ("amqp://user:secret@host:5672/vhost", "amqp://user:***@host:5672/vhost"),
        ("amqps://user:s%40cr%3Aet@host:5671//", "amqps://user:***@host:5671//"),
        ("amqp://:secret@host//", "amqp://:***@host//"),
        ("amqp://user:@host//", "amqp://user:***@host//"),
        ("amqp://user@host//", "amqp://user@host//"),
        ("amqp://host:5672//", "amqp://host:5672//"),
        ("memory://", "memory://"),
        ("", ""),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_url_keeps_ipv6_brackets() -> None:
    assert redact_url("amqp://user:secret@[::1]:5672//") == "amqp://user:***@[::1]:5672//"


def test_redact_url_masks_every_url_of_a_failover_list() -> None:
    redacted = redact_url("amqp://u:first-secret@h1//;amqp://u:second-secret@h2//")
    assert "first-secret" not in redacted
    assert "second-secret" not in redacted

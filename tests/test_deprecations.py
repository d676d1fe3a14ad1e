"""No deprecated setting in our Celery configuration or our Sentry set-up, and the behaviour they
stood for kept: failures and timeouts never acknowledged, no personal data collected.

Each test turns warnings into errors while the configuration loads, so a deprecated option
fails here instead of scrolling by in the warnings summary.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import sentry_sdk
from celery import Celery

from config.settings import Settings
from worker.ops.sentry import setup_sentry


def test_the_celery_configuration_is_current_and_never_acknowledges_failures() -> None:
    app = Celery("deprecations", set_as_current=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        app.config_from_object("config.celeryconfig")
        acks = (app.conf.task_acks_late, app.conf.task_acks_on_failure, app.conf.task_acks_on_timeout)  # loads it

        @app.task(shared=False)
        def upload() -> None:  # any task of the app inherits the settings
            pass

        task_acks = (upload.acks_late, upload.acks_on_failure, upload.acks_on_timeout)

    assert acks == (True, False, False)
    assert task_acks == (True, False, False)


@pytest.fixture
def sentry_client() -> Iterator[sentry_sdk.Client]:
    """Sentry set up by the project's own function (nothing is sent: no event is captured)."""
    settings = Settings(api_key="key", sentry_dsn="http://public@127.0.0.1:9/1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert setup_sentry(settings)
    client = sentry_sdk.get_client()
    yield client
    client.close(timeout=0)
    sentry_sdk.get_global_scope().set_client(None)


def test_sentry_is_set_up_without_deprecated_options_and_collects_no_personal_data(
    sentry_client: sentry_sdk.Client,
) -> None:
    options = sentry_client.options
    assert sentry_client.should_send_default_pii() is False
    collected = options["data_collection"]
    assert collected["user_info"] is False and collected["queues"] is False
    assert collected["stack_frame_variables"] is False  # event payloads and the API key live in locals
    assert options["event_scrubber"] is not None  # the SDK's own scrubber, besides ours in before_send

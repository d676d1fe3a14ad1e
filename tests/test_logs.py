"""JSON logs: the formatter's lines, what it leaves out, and its wiring to Celery's logging signals."""

from __future__ import annotations

import io
import json
import logging
import sys
from datetime import datetime
from typing import Any

import pytest
from celery.signals import after_setup_logger, after_setup_task_logger

from worker.ops import logs
from worker.ops.logs import JsonFormatter


def record(message: str = "batch asset_id=%s events=%d", args: tuple[Any, ...] = ("a-1", 3), *,
           level: int = logging.INFO, extra: dict[str, Any] | None = None, exc_info: Any = None) -> logging.LogRecord:
    made = logging.getLogger("worker.delivery").makeRecord(
        "worker.delivery", level, __file__, 10, message, args, exc_info, extra=extra,
    )
    made.created = 1_714_564_800.1234  # 2024-05-01T12:00:00.123Z
    return made


def line(made: logging.LogRecord) -> dict[str, Any]:
    text = JsonFormatter().format(made)
    assert "\n" not in text
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


def test_a_line_holds_the_documented_fields_in_order() -> None:
    entry = line(record())
    assert list(entry)[:7] == ["ts", "level", "logger", "process", "process_name", "thread", "message"]
    assert entry["ts"] == "2024-05-01T12:00:00.123Z"
    assert datetime.fromisoformat(entry["ts"]).utcoffset() is not None
    assert (entry["level"], entry["logger"]) == ("INFO", "worker.delivery")
    assert entry["message"] == "batch asset_id=a-1 events=3"
    assert isinstance(entry["process"], int) and entry["process_name"] == "MainProcess"


def test_extra_fields_are_kept_and_cannot_replace_a_field() -> None:
    entry = line(record(extra={"asset_id": "a-1", "netcore_reason": "rejected", "netcore_status": 400,
                               "process_name": "spoofed"}))
    assert (entry["asset_id"], entry["netcore_reason"], entry["netcore_status"]) == ("a-1", "rejected", 400)
    assert entry["process_name"] == "MainProcess"


def test_event_contents_never_come_through_extra_fields() -> None:
    event = {"identity": "customer-42@example.com", "activity_params": {"total": 2}}
    celery_data = {"id": "t-1", "name": "activities.upload", "args": repr([event]), "kwargs": "{}", "eta": None}
    made = record("Task %(name)s[%(id)s] received", (celery_data,),
                  extra={"data": celery_data, "event": event, "events": [event], "body": "{}", "raw": "x",
                         "payload": event, "_private": 1})
    text = JsonFormatter().format(made)
    entry = json.loads(text)
    assert "customer-42" not in text
    assert not {"data", "event", "events", "body", "raw", "payload", "_private", "args", "msg"} & set(entry)
    assert (entry["task_id"], entry["task_name"]) == ("t-1", "activities.upload")
    assert entry["message"] == "Task activities.upload[t-1] received"


def test_a_running_task_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    class Request:
        id = "task-7"

    class Task:
        name = "activities.upload"
        request = Request()

    monkeypatch.setattr(logs, "get_current_task", lambda: Task())
    entry = line(record())
    assert (entry["task_id"], entry["task_name"]) == ("task-7", "activities.upload")


def test_exceptions_are_one_escaped_field_and_odd_values_are_text() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    entry = line(record("multi\nline", (), level=logging.ERROR, exc_info=exc_info,
                        extra={"when": datetime(2024, 5, 1), "what": object}))
    assert entry["level"] == "ERROR" and entry["message"] == "multi\nline"
    assert entry["exc"].startswith("Traceback") and "ValueError: boom" in entry["exc"]
    assert entry["when"] == "2024-05-01 00:00:00" and entry["what"] == "<class 'object'>"


def test_install_formats_every_handler_of_a_logger() -> None:
    logger = logging.getLogger("test-logs-install")
    logger.propagate = False
    stream = io.StringIO()
    logger.handlers = [logging.StreamHandler(stream)]
    try:
        logs.install(logger)
        logger.warning("Dead-lettering %d events", 2, extra={"asset_id": "a-9"})
    finally:
        logger.handlers = []
    entry = json.loads(stream.getvalue())
    assert (entry["message"], entry["asset_id"], entry["level"]) == ("Dead-lettering 2 events", "a-9", "WARNING")


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_celery_logging_signals_make_the_lines_json_when_log_format_is_json(
    log_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from config.settings import Settings
    from worker.app import app  # connects the signals, as the worker does

    monkeypatch.setitem(app.conf, "netcore_settings", Settings.from_env({"LOG_FORMAT": log_format},
                                                                        require_api=False))
    for signal in (after_setup_logger, after_setup_task_logger):
        logger = logging.getLogger(f"test-logs-signal-{log_format}-{signal.name}")
        logger.propagate = False
        stream = io.StringIO()
        logger.handlers = [logging.StreamHandler(stream)]
        logger.handlers[0].setFormatter(logging.Formatter("%(levelname)s %(message)s"))  # Celery's text lines
        try:
            signal.send(sender=None, logger=logger, loglevel=logging.INFO, logfile=None, format="", colorize=False)
            logger.warning("Dead-lettering %d events", 2)
        finally:
            logger.handlers = []
        line = stream.getvalue().strip()
        if log_format == "json":
            assert json.loads(line)["message"] == "Dead-lettering 2 events", line
        else:
            assert line == "WARNING Dead-lettering 2 events"  # untouched

"""JSON logs: one object per line, for log collectors (``LOG_FORMAT=json``).

Each line holds ``ts`` (ISO-8601 UTC, milliseconds), ``level``, ``logger``, ``process`` (the
process id) and ``process_name``, ``thread`` (uploads run on the pool's threads), ``message``, the running task's ``task_id`` and
``task_name`` when there is one, ``exc`` for a traceback, and every ``extra`` field the call
gave (``asset_id``, ``netcore_reason``...).

The formatter adds nothing from the events themselves: Celery passes a task's arguments in an
``extra`` field named ``data`` (``args``, ``kwargs``), which is left out, as is any extra
field named like a carrier of event contents (:data:`OMITTED`). What the message text itself
says is the caller's business; the worker's own messages never hold event contents.

:func:`install` puts the formatter on every handler of a logger; :mod:`worker.ops.startup` calls
it from Celery's ``after_setup_logger`` and ``after_setup_task_logger`` signals.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from celery._state import get_current_task

#: The attributes every ``LogRecord`` has: anything else on a record came from ``extra``.
STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

#: ``extra`` fields never written: Celery's ``data`` carries task arguments; the others are
#: names under which event contents would travel.
OMITTED = frozenset({"data", "event", "events", "body", "raw", "payload", "args", "kwargs", "argsrepr", "kwargsrepr"})

#: The fields of each line, in this order; extra fields follow and never replace one of them.
FIELDS = ("ts", "level", "logger", "process", "process_name", "thread", "message")


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "process_name": record.processName,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        entry.update(_task_fields(record))
        for key, value in vars(record).items():
            if key not in STANDARD and key not in OMITTED and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=_fallback)


def install(logger: logging.Logger) -> None:
    """Format every handler of ``logger`` as JSON lines."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())


def _timestamp(created: float) -> str:
    moment = datetime.fromtimestamp(created, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _task_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The running task's id and name; else those Celery's ``data`` names (never its arguments)."""
    task = get_current_task()
    if task is not None and task.request is not None and task.request.id is not None:
        return {"task_id": task.request.id, "task_name": task.name}
    data = getattr(record, "data", None)
    if isinstance(data, dict) and "id" in data:
        return {"task_id": str(data["id"]), "task_name": str(data.get("name"))}
    return {}


def _fallback(value: Any) -> str:
    """Values JSON has no type for (a datetime, an exception) as their ``str``."""
    return str(value)

"""``activities_status``: a remote-control command the worker answers with the state of its flow.

``python -m worker.ops.health`` asks it when ``activities`` has no consumer: while the API is down
(or uploads pile up) the worker stops consuming on purpose, and a probe must not call that
unhealthy and have the worker restarted in the middle of waiting out an outage.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

#: The command's name (``celery inspect activities_status``).
COMMAND = "activities_status"


@inspect_command(name=COMMAND)
def activities_status(state: Any) -> dict[str, Any]:
    """The circuit's state, whether the consumer takes messages, and why not."""
    runtime = state.consumer.app.runtime()
    return {
        "circuit": runtime.circuit.state.value,
        "consuming": runtime.gate.is_open,
        "paused_because": runtime.gate.reason,
        "uploads_in_flight": runtime.concurrency.in_flight,
        "concurrency_limit": runtime.concurrency.limit,
    }

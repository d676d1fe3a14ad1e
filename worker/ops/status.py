"""``activities_status``: a remote-control command the worker answers with the state of its flow.

``python -m worker.ops.health`` asks it: to tell a consumer paused on purpose (its hand-offs wait
for the broker) from a dead one, and to name the accounts whose uploads are paused (their API is
down or rate-limits them), which is news for the operator but no reason to restart the worker.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

#: The command's name (``celery inspect activities_status``).
COMMAND = "activities_status"


@inspect_command(name=COMMAND)
def activities_status(state: Any) -> dict[str, Any]:
    """Whether the consumer takes messages, and each account's circuit, uploads and pause."""
    runtime = state.consumer.app.runtime()
    blocked = runtime.ingest is not None and runtime.ingest.blocked
    paused = runtime.flow.paused() if runtime.flow is not None else {}
    accounts = {
        lane.name: {
            "circuit": lane.circuit.state.value,
            "uploads_in_flight": lane.concurrency.in_flight,
            "concurrency_limit": lane.concurrency.limit,
            "assets_held": lane.circuit.held_assets,
            "paused_because": paused.get(lane.name, ""),
        }
        for lane in runtime.lanes
    }
    return {
        "consuming": not blocked,
        "paused_because": "the broker does not confirm the consumer's hand-offs" if blocked else "",
        "accounts": accounts,
    }

"""Message headers the worker's parts agree on (names only: importing this costs nothing)."""

from __future__ import annotations

#: On an event replayed from the dead-letter queue: how many times it was replayed. The
#: consumer keeps the count with each event, so that its next dead letter says it.
REPLAYS_HEADER = "x-replays"

#: On each dead letter: its reason, so tools can filter without parsing bodies.
REASON_HEADER = "x-dead-letter-reason"

#: On a suspect moved to the quarantine queue: how often the source queue had delivered it.
SUSPECT_HEADER = "x-suspect-deliveries"

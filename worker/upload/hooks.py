"""Fan-out of the upload side's hooks: delivery and the circuit report to one object, which
passes every call on to each listener (metrics, logs, Sentry), as dramatiq's middleware do."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


class Fanout:
    """Calls ``method(**kwargs)`` on every listener that has it; a listener's error is logged,
    never raised: counting or logging a result must not change what becomes of the events."""

    def __init__(self, listeners: Sequence[Any]) -> None:
        self.listeners = tuple(listeners)

    def __getattr__(self, name: str) -> Callable[..., None]:
        """Built on the first call of ``name``, then kept (the hooks run once per message)."""
        if name.startswith("_"):
            raise AttributeError(name)
        methods = [getattr(listener, name) for listener in self.listeners if hasattr(listener, name)]

        def call(*args: Any, **kwargs: Any) -> None:
            for method in methods:
                try:
                    method(*args, **kwargs)
                except Exception:  # a hook's bug: say so, deliver on
                    logger.exception("A %s hook failed", name)

        setattr(self, name, call)  # found in the instance from now on: __getattr__ is not asked again
        return call

"""When to try an upload again: exponential backoff, full jitter, a cap, Retry-After.

One small policy object, as in dramatiq and analytics-python. "Full jitter" draws each delay
uniformly between zero and the exponential bound, so a fleet of workers that failed together
does not come back together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """``max_retries`` retries after the first attempt, delays capped at ``backoff_max``."""

    max_retries: int
    backoff: float
    backoff_max: float
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` uploads have been made and no retry is left."""
        return attempts > self.max_retries

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the next try, after ``attempts`` failed ones (1, 2, ...).

        A server's ``Retry-After`` is a floor (never retry earlier than asked), itself capped
        at ``backoff_max`` so that a retry is never held longer than the operator allows.
        """
        bound = min(self.backoff_max, self.backoff * 2 ** max(0, attempts - 1))
        delay = self.rng.uniform(0, bound)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

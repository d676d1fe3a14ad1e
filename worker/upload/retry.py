"""When to try an upload again, and when to give up: backoff with full jitter, a cap, Retry-After,
a budget of attempts and a window of time.

One small policy object, as in dramatiq and analytics-python. "Full jitter" draws each delay
uniformly between zero and the exponential bound, so a fleet of workers that failed together
does not come back together. A batch is given up on (``retries_exhausted``) after
``max_retries`` counted failures, or once it has waited ``window`` seconds since its first
failure, whichever comes first; failures the circuit does not count (:mod:`worker.upload.circuit`)
spend no attempt, only time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """``max_retries`` retries after the first attempt, delays capped at ``backoff_max``,
    nothing retried once ``window`` seconds passed since its first failure."""

    max_retries: int
    backoff: float
    backoff_max: float
    window: float = 6 * 3600.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` counted uploads failed and no retry is left."""
        return attempts > self.max_retries

    def expired(self, since: float, now: float) -> bool:
        """True when a batch first failed at ``since`` (unix time) and the window is over."""
        return now - since >= self.window

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the next try, after ``attempts`` failed ones (1, 2, ...).

        A server's ``Retry-After`` is a floor (never retry earlier than asked), itself capped
        at ``backoff_max``.
        """
        bound = min(self.backoff_max, self.backoff * 2 ** max(0, attempts - 1))
        delay = self.rng.uniform(0, bound)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

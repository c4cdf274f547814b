"""The retry budget: retries may add at most `ratio` of the requests, plus a small floor.

A backend that dies under load makes every request on its way fail at once; retrying each on
another backend is what keeps clients whole. A backend pool that is failing everywhere must
not be hit by every request twice, so retries draw from a bucket that each request fills by
`ratio` (as Finagle's and Envoy's retry budgets do), which also refills by
`floor_per_s` each second so a quiet gateway can still retry.
"""

from __future__ import annotations

import time


class RetryBudget:
    def __init__(self, ratio: float = 0.2, floor_per_s: float = 10.0, cap: float = 100.0) -> None:
        self.ratio = ratio
        self.floor_per_s = floor_per_s
        self.cap = cap
        self._tokens = cap
        self._at = time.monotonic()

    def deposit(self) -> None:
        """One request was sent."""
        self._tokens = min(self._tokens + self.ratio, self.cap)

    def withdraw(self) -> bool:
        """Whether one retry may go now (and it is counted)."""
        now = time.monotonic()
        self._tokens = min(self._tokens + (now - self._at) * self.floor_per_s, self.cap)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

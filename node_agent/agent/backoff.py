from __future__ import annotations

import random
from collections.abc import Callable

from node_agent.agent.clock import Clock


class Backoff:
    """When to try the controller next. Temporary failures wait longer each time (from
    the interval up to ``max_s``); a refusal that needs an operator waits ``max_s`` at
    once. Jitter spreads a fleet's reconnection after a controller outage."""

    def __init__(
        self,
        base_s: float,
        max_s: float,
        clock: Clock,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base_s, self.max_s, self.clock, self.rng = base_s, max_s, clock, rng
        self.failures = 0
        self.retry_at = 0.0

    def ready(self) -> bool:
        return self.clock.monotonic() >= self.retry_at

    def success(self) -> None:
        self.failures, self.retry_at = 0, 0.0

    def failure(self, *, permanent: bool = False, at_least_s: float | None = None) -> float:
        self.failures += 1
        delay = self.max_s if permanent else min(self.max_s, self.base_s * 2 ** (self.failures - 1))
        delay *= 0.5 + self.rng() / 2
        if at_least_s is not None:
            delay = max(delay, at_least_s)
        self.retry_at = self.clock.monotonic() + delay
        return delay

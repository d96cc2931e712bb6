"""Where the agent reads the time and waits: one object, so that a test moves time
(the heartbeat schedule, backoff, re-enrolment, the benchmark fetch delays) instead of
sleeping through it (tests/agents/fakes.py: FakeClock)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime


class Clock:
    """The machine's clocks."""

    def monotonic(self) -> float:
        """Seconds, for intervals and deadlines (never jumps with the wall clock)."""
        return time.monotonic()

    def now(self) -> datetime:
        """Wall time, for what the controller reads (a heartbeat's ``sent_at``)."""
        return datetime.now(UTC)

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait ``seconds``, or less when ``stop`` is set meanwhile; True when stopped."""
        return stop.wait(seconds)


SYSTEM_CLOCK = Clock()

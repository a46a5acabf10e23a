"""The loop-lag probe of the event-loop models (gevent, asyncio): how late a timer fires.

One loop runs every connection, so a request that computes (`/work`) holds up every other
client. A periodic timer cannot fire while the loop is held: its lateness is the time every
other client waited, and the sum of large latenesses is the time the loop was blocked. Each
model schedules the timer on its own loop and hands the lateness to `LoopLag.observe`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from services.metrics import histogram_family
from services.session import Histogram

PROBE_INTERVAL = 0.1  # seconds between probes: cheap, yet catches a blocked loop
BLOCKED_THRESHOLD = 0.01  # lateness counted as "the loop was blocked"


class LoopLag:
    """How late the probe's timer woke up: a histogram, and the blocked time and count."""

    def __init__(self) -> None:
        self.lag = Histogram()
        self.blocked_seconds = 0.0
        self.blocks = 0

    def observe(self, lateness: float) -> None:
        """Count one wake-up `lateness` seconds after it was due."""
        self.lag.observe(lateness)
        if lateness > BLOCKED_THRESHOLD:
            self.blocked_seconds += lateness
            self.blocks += 1

    def families(self) -> Iterator[Metric]:
        """The arena_event_loop_* metric families."""
        yield histogram_family(
            "arena_event_loop_lag_seconds",
            "How late a 100 ms timer probe woke up",
            [([], self.lag)],
        )
        yield CounterMetricFamily(
            "arena_event_loop_blocked_seconds",
            "Sum of probe lateness above 10 ms: time the event loop was blocked",
            value=self.blocked_seconds,
        )
        yield CounterMetricFamily(
            "arena_event_loop_blocks", "Probe wake-ups later than 10 ms", value=self.blocks
        )

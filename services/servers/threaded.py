"""Thread per connection: each accepted socket gets an OS thread running the session loop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from services.servers.base import BlockingServer


class ThreadedServer(BlockingServer):
    """The textbook model (socketserver's ThreadingMixIn) with limits, timeouts and metrics."""

    model = "threaded"

    def spawn(self, function: Callable[..., None], *args: object) -> threading.Thread:
        """Start a daemon thread: a connection stuck past the grace period cannot block exit."""
        thread = threading.Thread(target=function, args=args, daemon=True)
        thread.start()
        return thread

    def join(self, task: object, timeout: float) -> None:
        """Wait for a thread."""
        if isinstance(task, threading.Thread):
            task.join(timeout)

    def extra_metrics(self) -> Iterable[Metric]:
        """Live threads: one per connection plus the accept, sweep and metrics threads."""
        yield GaugeMetricFamily(
            "arena_threads", "Live threads in the server process", value=threading.active_count()
        )

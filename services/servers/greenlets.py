"""Greenlet per connection: the threaded session loop on gevent's event loop.

`python -m services gevent` monkey-patches before this module is imported, so the session's
blocking socket calls and `time.sleep` (the `/sleep` command) yield to other greenlets, while
`/work` holds the one loop. A timer probe measures how late the loop wakes up: that lateness is
the time every other client waited.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.event
import gevent.pool
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.blocking import Receive, SendAll, serve_blocking
from services.config import Settings
from services.metrics import histogram_family
from services.servers.base import BlockingServer
from services.session import Histogram, Session

PROBE_INTERVAL = 0.1  # seconds between loop-lag probes: cheap, yet catches a blocked loop
BLOCKED_THRESHOLD = 0.01  # lateness counted as "the loop was blocked"


def wait_first_io(sock: socket.socket) -> tuple[Receive, SendAll]:
    """Receive and send on the raw socket, waiting for readiness before reading.

    gevent's `recv` tries the syscall first and waits after it fails. In request/reply traffic
    the next request has rarely arrived when the reply is out, so that costs a failed syscall
    and an exception per request (about 10 % of echo throughput here). Waiting on the socket's
    own read watcher first, as an event loop does, skips both. (`_sock`, `_wait` and
    `_read_event` are gevent's socket internals, stable since gevent 1.x.)
    """
    gsock: Any = sock  # a gevent socket: the session was accepted after monkey-patching
    try:
        raw, wait, readable = gsock._sock, gsock._wait, gsock._read_event
    except AttributeError:  # a gevent without these internals: its own, slower calls
        return gsock.recv, gsock.sendall

    def receive(size: int) -> bytes:
        while True:
            wait(readable)
            try:
                data: bytes = raw.recv(size)
                return data
            except BlockingIOError:
                continue  # a spurious wake-up: wait again

    def send_all(data: bytes) -> None:
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):  # the kernel buffer is full: let gevent wait for room
            gsock.sendall(memoryview(data)[sent:])

    return receive, send_all


class GeventServer(BlockingServer):
    """Connections as greenlets in a gevent Pool, plus an event-loop lag probe."""

    model = "gevent"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.connections = gevent.pool.Pool(settings.max_connections)
        self.lag = Histogram()
        self.blocked_seconds = 0.0
        self.blocks = 0

    def spawn(self, function: Callable[..., None], *args: object) -> gevent.Greenlet:
        """Run a helper greenlet (accept loop, sweeper, probe) outside the connection pool."""
        return gevent.spawn(function, *args)

    def join(self, task: object, timeout: float) -> None:
        """Wait for a greenlet."""
        if isinstance(task, gevent.Greenlet):
            task.join(timeout)

    def spawn_session(self, session: Session) -> None:
        """Serve a connection in a greenlet of the pool (never full: the limit is checked first)."""
        self.connections.spawn(
            serve_blocking, session, self.stats, self.settings.metrics, wait_first_io(session.sock)
        )

    def serve_in_background(self) -> None:
        """Accept, sweep, and probe the event loop."""
        super().serve_in_background()
        self.spawn(self.run_or_exit, "probe", self.probe_loop)

    def probe_loop(self) -> None:
        """Measure how late a periodic timer fires: the time the loop was blocked."""
        while not self.stopping.is_set():
            expected = time.perf_counter() + PROBE_INTERVAL
            gevent.sleep(PROBE_INTERVAL)
            lateness = max(0.0, time.perf_counter() - expected)
            self.lag.observe(lateness)
            if lateness > BLOCKED_THRESHOLD:
                self.blocked_seconds += lateness
                self.blocks += 1

    def stop(self, grace: float) -> None:
        """Drain like every model, then kill greenlets still stuck in a request."""
        super().stop(grace)
        self.connections.kill(timeout=1.0)

    def catch_signals(self) -> Callable[[], None]:
        """gevent's own signal handlers: a plain one may wait for the loop to wake up."""
        requested = gevent.event.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, requested.set)

        def wait() -> None:
            requested.wait()

        return wait

    def extra_metrics(self) -> Iterable[Metric]:
        """Live connection greenlets and event-loop blocking."""
        yield GaugeMetricFamily(
            "arena_greenlets", "Connection greenlets alive", value=len(self.connections)
        )
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

"""Greenlet per connection: the threaded session loop on gevent's event loop.

`python -m services gevent` monkey-patches before this module is imported, so the session's
blocking socket calls and `time.sleep` (the `/sleep` command) yield to other greenlets, while
`/work` holds the one loop. A timer probe measures how late the loop wakes up: that lateness is
the time every other client waited.

Sessions read and write through gevent's socket internals (`wait_first_io`, a fast path worth
about 10 % of echo throughput). That adapter checks at start-up that the socket module is
patched and that a byte makes the round trip over a socketpair; if not, it falls back loudly (a
warning, `arena_adapter_fallback{adapter="gevent-io"} 1`) to the socket's own recv/sendall.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import gevent
import gevent.event
import gevent.pool
from prometheus_client.core import GaugeMetricFamily, Metric

from services.blocking import Receive, SendAll, serve_blocking
from services.config import Settings
from services.database import (
    DatabaseSettings,
    Driver,
    SyncPool,
    open_pool,
    psycopg2_driver,
    psycopg_driver,
)
from services.servers.base import BlockingServer
from services.servers.looplag import PROBE_INTERVAL, LoopLag
from services.session import Session

# -- adapter: gevent's socket internals ------------------------------------------------------
FAST_IO_ADAPTER = "gevent-io"
# The private attributes of a gevent socket the fast path uses: the OS socket, the wait
# function and the read watcher (gevent's own `recv` uses them too; stable since gevent 1.x).
FAST_IO_INTERNALS = ("_sock", "_wait", "_read_event")
PROBE_TIMEOUT = 2.0  # seconds for the start-up probe's byte to come back (it is local)


def wait_first_io(sock: socket.socket) -> tuple[Receive, SendAll]:
    """Receive and send on the raw socket, waiting for readiness before reading.

    gevent's `recv` tries the syscall first and waits after it fails. In request/reply traffic
    the next request has rarely arrived when the reply is out, so that costs a failed syscall
    and an exception per request (about 10 % of echo throughput here). Waiting on the socket's
    own read watcher first, as an event loop does, skips both. Use it only after
    `fast_io_problem()` found nothing wrong: it raises AttributeError on a socket without the
    internals.
    """
    gsock: Any = sock  # a gevent socket: the session was accepted after monkey-patching
    raw, wait, readable = (getattr(gsock, name) for name in FAST_IO_INTERNALS)

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


def probe_fast_io(left: socket.socket, right: socket.socket) -> str | None:
    """Run the fast path over a connected pair: None if a byte goes each way, else what broke."""
    missing = [name for name in FAST_IO_INTERNALS if not hasattr(left, name)]
    if missing:
        return f"{type(left).__qualname__} has no {', '.join(missing)}"
    try:
        with gevent.Timeout(PROBE_TIMEOUT):
            receive, send_all = wait_first_io(left)
            right.sendall(b"?")
            received = receive(16)
            send_all(b"!")
            echoed = right.recv(16)
    except (Exception, gevent.Timeout) as error:
        return f"the fast path failed its probe: {error!r}"
    if (received, echoed) != (b"?", b"!"):
        return f"the fast path's probe read {received!r} and {echoed!r}, not b'?' and b'!'"
    return None


def fast_io_problem() -> str | None:
    """Why the fast path cannot serve this process's sockets, or None (checked at start-up)."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        return "the socket module is not monkey-patched"
    left, right = socket.socketpair()  # patched: gevent sockets, as accept() returns them
    try:
        return probe_fast_io(left, right)
    finally:
        left.close()
        right.close()


# -- the database: which driver a `/db` waits in (services/database.py) ------------------------
DRIVERS: dict[str, Callable[[], Driver]] = {
    # psycopg 3 waits for the socket through gevent's patched select: the greenlet yields.
    "default": psycopg_driver,
    # psycopg2 waits inside libpq, C code that monkey-patching cannot reach: the hub stalls,
    # every connection with it, while the CPU idles (the seed's warning).
    "blocking": partial(psycopg2_driver, green=False),
    # The same psycopg2 with psycogreen's wait callback: libpq in non-blocking mode, gevent waits.
    "blocking-fixed": partial(psycopg2_driver, green=True),
}


# -- the server -------------------------------------------------------------------------------
class GeventServer(BlockingServer):
    """Connections as greenlets in a gevent Pool, plus an event-loop lag probe."""

    model = "gevent"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.connections = gevent.pool.Pool(settings.max_connections)
        self.loop_lag = LoopLag()
        self.fast_io = False  # decided at start-up by the gevent-io adapter

    def open_database(self, settings: DatabaseSettings) -> SyncPool | None:
        """The pool of the chosen driver: cooperative by default, or the seed's warning."""
        return open_pool(settings, DRIVERS[settings.driver])

    def spawn(self, function: Callable[..., None], *args: object) -> gevent.Greenlet:
        """Run a helper greenlet (accept loop, sweeper, probe) outside the connection pool."""
        return gevent.spawn(function, *args)

    def join(self, task: object, timeout: float) -> None:
        """Wait for a greenlet."""
        if isinstance(task, gevent.Greenlet):
            task.join(timeout)

    def spawn_session(self, session: Session) -> None:
        """Serve a connection in a greenlet of the pool (never full: the limit is checked first)."""
        io = wait_first_io(session.sock) if self.fast_io else None
        self.connections.spawn(
            serve_blocking, session, self.stats, self.settings.metrics, self.database, io
        )

    def serve_in_background(self) -> None:
        """Check the fast socket path, then accept, sweep, and probe the event loop."""
        problem = fast_io_problem()
        if problem is None:
            self.fast_io = True
            self.adapters.works(FAST_IO_ADAPTER)
        else:
            self.adapters.fell_back(
                FAST_IO_ADAPTER, f"{problem}; sessions use the socket's own recv/sendall", self.log
            )
        super().serve_in_background()
        self.spawn(self.run_or_exit, "probe", self.probe_loop)

    def probe_loop(self) -> None:
        """Measure how late a periodic timer fires: the time the loop was blocked."""
        while not self.stopping.is_set():
            expected = time.perf_counter() + PROBE_INTERVAL
            gevent.sleep(PROBE_INTERVAL)
            self.loop_lag.observe(max(0.0, time.perf_counter() - expected))

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
        yield from self.loop_lag.families()

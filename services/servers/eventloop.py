"""asyncio: every connection a `Protocol` on one event loop, the standard one or uvloop.

The seed builds coroutines from `yield`: code that says where it may switch. asyncio is that
idea grown up (`async`/`await` are generators underneath), against gevent's implicit switching
through monkey-patching. Nothing switches unless the code hands control back to the loop: a
timer (`/sleep`) lets every other connection run, a computation (`/work`) holds the one loop
and every client waits, which the loop-lag probe shows as `arena_event_loop_blocked_seconds`
(the same probe and names as gevent's).

Why a `Protocol` and not streams. A streams server reads like the seed's loop (`line = await
reader.readline()`, `writer.write(reply)`, `await writer.drain()`), which teaches well; but each
connection is then a task, each read a future and a resumed coroutine, and each reply a drain.
A `Protocol` is the loop's own callback interface: `data_received` answers the complete lines
of each read and writes their replies at once, with no task or future per request. Issue 13
measured, on a quiet machine (C closed-loop client, 100 connections x 64 B echo, server on one
core): a bare uvloop `Protocol` 142k req/s against asyncio streams 87k. Here, with the
benchmark (`python -m loadtest.bench --scenarios echo64 --models asyncio,asyncio-stock --reps 3
--duration 2`: same load, one run of 3 x 2 s on the shared 2-core machine in a quiet moment, so
read the ratios, not the rates), metrics on: on the standard loop this server answered 26.0k
req/s at 37 us of CPU per request, the minimal streams server 18.9k at 52 us (1.38x), although
this one frames, limits, counts and times every request and the textbook does none of it; on
uvloop this server 32.8k at 30 us, the bare `Protocol` echo server 31.6k at 30 us (1.04x), and
metrics cost 2 %. So the arena serves with a `Protocol`; the streams server stays in the
benchmark as the textbook (loadtest/bench/textbook.py) to show the difference.

What a connection does, as the other models: lines are framed by `LineFramer` and answered by
`protocol.answer` in order; a valid `/sleep` waits on `loop.call_later` while the lines behind
it wait in `pending` (the connection stops reading once some do, as the pool's reactor does);
`/work` runs inline. A client that does not read its replies: above `MAX_UNSENT_OUTPUT` bytes
in the transport's buffer the transport calls `pause_writing`, and the connection stops
answering and reading until `resume_writing`; the rest queues in the kernel. Idle connections
are closed by a sweep, which also checks the listener (`Server.check_listener`).

The loop runs in a thread of its own (`Server.start` must return; the main thread waits for
signals and `/metrics` has its OS thread, as for every model). Accepting is ours, not
`loop.create_server`'s, so that the connection limit, `accept()` errors and their back-off
behave and are counted exactly as in the other models; each accepted socket is handed to the
loop with `connect_accepted_socket`. A failing accept, sweep or probe callback is fatal (exit
code 1, `Server.run_or_exit`); an exception while serving one connection closes only it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from prometheus_client.core import GaugeMetricFamily, Metric

from services import protocol
from services.config import Settings
from services.database import AsyncPool, DatabaseSettings, DatabaseStats, SyncPool
from services.servers.base import Server
from services.servers.batching import MAX_UNSENT_OUTPUT
from services.servers.looplag import PROBE_INTERVAL, LoopLag
from services.session import Session, reject

WRITE_CHUNK = 65536  # replies gathered before a write: one write per read, bounded in size
STOP_TIMEOUT = 5.0  # seconds to wait for the loop to end after the connections closed
SLEEP_PREFIX = b"/sleep "
DB_PREFIX = b"/db "
WAITS = (SLEEP_PREFIX, DB_PREFIX)  # requests that wait without holding the loop
# The default executor's threads (asyncio's rule): what bounds the `blocking-fixed` driver.
DEFAULT_EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)
answer, perf_counter = protocol.answer, time.perf_counter  # looked up once: the hot path


class Connection(Session, asyncio.Protocol):
    """One connection as the loop serves it: a session driven by the transport's callbacks."""

    __slots__ = (
        "active",
        "clock",
        "eof",
        "pending",
        "reading",
        "server",
        "sleep",
        "throttled",
        "timed",
        "transport",
    )

    def __init__(self, sock: socket.socket, line_limit: int) -> None:
        super().__init__(sock, line_limit)
        self.server: AsyncioServer | None = None  # set by the server that adopts it
        self.timed = True  # time each request (metrics on); set by the server too
        self.clock: Callable[[], float] | None = perf_counter  # None when not timed
        # Request bytes arrived since the last sweep, which then sets `last_active`: a flag per
        # read is cheaper than a clock call, and the sweep's time is late, never early.
        self.active = False
        self.transport: asyncio.Transport | None = None
        self.pending: deque[bytes] = deque()  # complete lines not answered yet
        # The /sleep (a timer) or /db (a task) this connection waits for.
        self.sleep: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self.throttled = False  # the transport's buffer is over its limit: answer nothing
        self.reading = True
        self.eof = False  # the client sends nothing more (or the server drains)

    # -- transport callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Limit the transport's buffer; a connection made while draining ends at once."""
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        assert server is not None
        server.connections.add(self)
        try:
            self.transport.set_write_buffer_limits(high=MAX_UNSENT_OUTPUT)
            if server.stats.draining:
                self.finish("shutdown")
        except Exception:
            self.contain()

    def data_received(self, data: bytes) -> None:
        """Answer the complete lines that arrived (the common case, one line, without framing)."""
        if self.close_reason:
            return
        try:
            self.active = True
            lines = self.take(data)
            if (
                len(lines) == 1
                and not self.overflow
                and not self.pending
                and self.sleep is None
                and not self.throttled
                and not data.startswith(WAITS)
            ):
                # The common case, one request that does not wait: answered now, no queue, and
                # the transport is open (we close it only after setting close_reason).
                reply, closing = self.respond(lines, answer, perf_counter(), self.clock)
                self.transport.write(reply)  # type: ignore[union-attr]
                self.tally.sent += len(reply)
                if closing:
                    self.finish("quit")
                return
            self.pending.extend(lines)
            self.serve_pending()
        except Exception:
            self.contain()

    def eof_received(self) -> bool:
        """Half-closed: answer what was read, then close (True keeps the writing side open)."""
        self.eof = True
        self.serve_contained()
        return True

    def pause_writing(self) -> None:
        """The client is not reading its replies: answer and read nothing more for now."""
        self.throttled = True
        self.update_reading()

    def resume_writing(self) -> None:
        """The client caught up: answer what waited and read again."""
        self.throttled = False
        self.serve_contained()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection and fold its counts into the totals."""
        if isinstance(self.sleep, asyncio.TimerHandle):
            self.sleep.cancel()
        # A `/db` task runs on: cancelling it mid-query would strand its database connection;
        # it ends by itself and finds the connection closed.
        self.sleep = None
        server = self.server
        assert server is not None
        server.connections.discard(self)
        draining = server.stats.draining
        server.stats.close_session(
            self, "reset" if exc is not None else "shutdown" if draining else "client"
        )
        self.close_reason = self.close_reason or "lost"  # after counting: nothing answers now

    # -- serving ----------------------------------------------------------------------------
    def serve_pending(self) -> None:
        """Answer waiting lines in order until a /sleep, a full buffer, or none are left."""
        pending, tally = self.pending, self.tally
        server = self.server
        assert server is not None
        timed = self.timed
        replies: list[bytes] = []
        size = 0
        while pending and self.sleep is None and not self.throttled and not self.close_reason:
            line = pending.popleft()
            started = time.perf_counter() if timed else 0.0
            if line.startswith(SLEEP_PREFIX):
                request = protocol.sleep_request(line)
                if request is not None:
                    seconds, result = request
                    self.sleep = server.loop_call_later(seconds, self.woke, result, started)
                    break
            elif line.startswith(DB_PREFIX) and server.db_wait is not None:
                query = protocol.db_request(line)
                if query is not None:
                    self.sleep = server.loop.create_task(self.await_db(query, started))
                    break
            # With the `blocking` driver, `server.database` runs a `/db` here: the loop stalls.
            result = protocol.answer(line, server.database)
            tally.record(result, time.perf_counter() - started if timed else 0.0)
            replies.append(result.reply)
            size += len(result.reply)
            if result.close:
                pending.clear()
                self.write(b"".join(replies))
                self.finish("quit")
                return
            if size >= WRITE_CHUNK:  # write now: the transport may ask us to pause
                self.write(b"".join(replies))
                replies, size = [], 0
        if replies:
            self.write(b"".join(replies))
        if not pending and self.sleep is None and not self.close_reason:
            if self.overflow:
                self.write(self.refuse_overlong())
                self.finish("line-too-long")
                return
            if self.eof and not self.throttled:
                self.finish("shutdown" if server.stats.draining else "client")
                return
        self.update_reading()

    def woke(self, result: protocol.Answer, started: float) -> None:
        """A /sleep is over: reply, then answer the lines that waited behind it."""
        self.sleep = None
        server = self.server
        if self.close_reason or server is None:
            return
        try:
            self.tally.record(result, time.perf_counter() - started if self.timed else 0.0)
            self.active = True
            self.write(result.reply)
            self.serve_pending()
        except Exception:
            self.contain()

    async def await_db(self, query: tuple[int, protocol.Answer], started: float) -> None:
        """Wait for a `/db` query on the loop (other connections run meanwhile), then reply."""
        server = self.server
        assert server is not None and server.db_wait is not None
        milliseconds, result = query
        try:
            error = await server.db_wait(milliseconds)
        except Exception:
            self.sleep = None
            self.contain()
            return
        self.woke(result if error is None else protocol.backend_failed(error), started)

    def write(self, data: bytes) -> None:
        """Hand replies to the transport (it sends what the socket takes and buffers the rest)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            self.tally.sent += len(data)

    def update_reading(self) -> None:
        """Read unless finished, throttled, or lines already wait behind a /sleep."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        wanted = not (
            self.eof
            or self.overflow
            or self.close_reason
            or self.throttled
            or (self.pending and self.sleep is not None)
        )
        if wanted != self.reading:
            self.reading = wanted
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def finish(self, reason: str) -> None:
        """Close once the buffered replies are out (`connection_lost` then counts it)."""
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.close()

    def is_idle(self, deadline: float) -> bool:
        """Nothing read, waiting or unsent since before `deadline` (a monotonic time)."""
        transport = self.transport
        return (
            self.sleep is None
            and not self.pending
            and self.last_active < deadline
            and transport is not None
            and transport.get_write_buffer_size() == 0
        )

    def serve_contained(self) -> None:
        """Answer the pending lines; an exception closes only this connection."""
        try:
            self.serve_pending()
        except Exception:
            self.contain()

    def contain(self) -> None:
        """An unexpected exception while serving this connection: log, count, close only it."""
        server = self.server
        assert server is not None
        server.stats.count_internal_error("session")
        server.log.error("session failed; closing its connection", exc_info=True)
        self.pending.clear()
        self.close_reason = self.close_reason or "error"
        if self.transport is not None:
            self.transport.abort()
        else:
            server.stats.close_session(self, "error")


class AsyncioServer(Server):
    """Connections as `Protocol`s on one asyncio event loop (uvloop or the standard one)."""

    model = "asyncio"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.loop_name = settings.loop
        self.loop: asyncio.AbstractEventLoop = self.new_loop()
        self.timed = settings.metrics
        self.connections: set[Connection] = set()  # the loop's thread only (len() elsewhere)
        self.thread: threading.Thread | None = None
        self.accepting = False
        self.live_tasks = 0  # counted by the probe, in the loop's thread
        self.loop_lag = LoopLag()
        self.loop_call_later = self.loop.call_later
        self.async_database: AsyncPool | None = None
        # How a `/db` waits without holding the loop (None: inline through `self.database`).
        self.db_wait: Callable[[int], Awaitable[str | None]] | None = None
        self.wire_database(DatabaseSettings.from_settings(settings))

    # -- the database: which driver a `/db` waits in (services/database.py) ---------------------
    def open_database(self, settings: DatabaseSettings) -> SyncPool | None:
        """The synchronous pool of the blocking drivers (None for the default driver)."""
        if settings.driver == "default":
            return None
        return super().open_database(settings)

    def wire_database(self, settings: DatabaseSettings) -> None:
        """Choose how `/db` waits: awaited on the loop, in a thread, or inline (the warning)."""
        if not settings.url:
            return
        if settings.driver == "default":
            # psycopg's AsyncConnection: the query is awaited, the loop serves everyone else.
            self.async_database = AsyncPool(settings)
            self.db_wait = self.async_database.query
        elif settings.driver == "blocking-fixed":
            # The synchronous call handed to the loop's default executor: its threads bound it.
            pool = self.database
            assert pool is not None
            self.db_wait = lambda milliseconds: self.loop.run_in_executor(
                None, pool.query, milliseconds
            )
        # "blocking": db_wait stays None, so protocol.answer runs the query on the loop.

    def database_stats(self) -> DatabaseStats | None:
        """The pool's counts, whichever driver."""
        if self.async_database is not None:
            return self.async_database.stats
        return super().database_stats()

    def new_loop(self) -> asyncio.AbstractEventLoop:
        """A new event loop of the configured kind (config checked that uvloop is installed)."""
        if self.loop_name == "uvloop":
            import uvloop

            return uvloop.new_event_loop()
        return asyncio.new_event_loop()

    def info(self) -> dict[str, str]:
        """Labels of arena_server_info, with the event loop."""
        return {**super().info(), "loop": self.loop_name}

    def ready_fields(self) -> dict[str, str]:
        """The event loop, for the ready line (and the blocking-fixed driver's threads)."""
        fields = {"loop": self.loop_name, **super().ready_fields()}
        if self.settings.db_driver == "blocking-fixed":
            fields["db_threads"] = str(DEFAULT_EXECUTOR_THREADS)
        return fields

    # -- lifecycle ----------------------------------------------------------------------------
    def serve_in_background(self) -> None:
        """Run the loop in its own thread: accept, sweep and probe from there."""
        assert self.listener is not None
        self.listener.setblocking(False)
        self.loop.set_exception_handler(self.loop_exception)
        self.loop.call_soon(self.start_serving)
        self.thread = threading.Thread(
            target=self.run_or_exit, args=("loop", self.loop.run_forever), name="loop", daemon=True
        )
        self.thread.start()

    def start_serving(self) -> None:
        """In the loop: listen, and schedule the first sweep and probe."""
        self.listen()
        idle_timeout = self.settings.idle_timeout
        self.schedule_sweep(min(1.0, idle_timeout / 4))
        self.schedule_probe()

    def fatal(self, name: str, step: Callable[..., None], *args: Any) -> Callable[[], None]:
        """A loop callback that ends the process if `step` raises (`Server.run_or_exit`)."""
        return lambda: self.run_or_exit(name, lambda: step(*args))

    def listen(self) -> None:
        """Accept connections when the listener is readable."""
        assert self.listener is not None
        self.accepting = True
        # Up to a backlog's worth per wakeup, as asyncio's own servers do: adopting a connection
        # costs a task and a few callbacks, so 64 at a time (the pool's reactor) let the last
        # of 1000 clients connecting at once wait 0.7 s on the standard loop.
        self.loop.add_reader(
            self.listener.fileno(),
            self.fatal("accept", self.accept_burst, self.settings.backlog),
        )

    def stop(self, grace: float) -> None:
        """Stop accepting, answer what was read for up to `grace` seconds, close the rest."""
        thread = self.thread
        if thread is None or not thread.is_alive():
            self.stats.draining = True
            if self.listener is not None:
                self.listener.close()
            return
        self.loop.call_soon_threadsafe(self.begin_draining)
        if not self.stats.wait_all_closed(grace):
            self.log.warning(
                "grace of %ss over: closing %d connections", grace, len(self.stats.sessions)
            )
            self.loop.call_soon_threadsafe(self.abort_all)
            self.stats.wait_all_closed(STOP_TIMEOUT)
        if self.async_database is not None:
            closing = asyncio.run_coroutine_threadsafe(self.async_database.close(), self.loop)
            try:
                closing.result(STOP_TIMEOUT)
            except Exception:
                self.log.warning("could not close the database connections", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(STOP_TIMEOUT)

    def begin_draining(self) -> None:
        """In the loop: close the listener; connections answer what they read, then close."""
        self.stats.draining = True
        if self.listener is not None:
            if self.accepting:
                self.loop.remove_reader(self.listener.fileno())
                self.accepting = False
            self.listener.close()
        for connection in list(self.connections):
            connection.eof = True  # read nothing more
            try:
                connection.serve_pending()
            except Exception:
                connection.contain()

    def abort_all(self) -> None:
        """In the loop: the grace period is over, end every connection now."""
        for connection in list(self.connections):
            connection.close_reason = connection.close_reason or "shutdown"
            if connection.transport is not None:
                connection.transport.abort()

    # -- accepting ----------------------------------------------------------------------------
    def pause_accepting(self, seconds: float) -> None:
        """Out of descriptors: stop listening for a while instead of spinning."""
        assert self.listener is not None
        self.loop.remove_reader(self.listener.fileno())
        self.accepting = False
        self.loop.call_later(seconds, self.fatal("accept", self.resume))

    def resume(self) -> None:
        """Listen again after an accept() back-off (unless draining meanwhile)."""
        if not self.stats.draining and not self.accepting:
            self.listen()

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connected socket from now on (over the limit: answered busy, closed)."""
        connection = self.stats.open_session(sock, self.settings.line_limit, Connection)
        if not isinstance(connection, Connection):
            reject(sock, self.settings.max_connections)
            return
        connection.server = self
        connection.timed = self.timed
        connection.clock = perf_counter if self.timed else None
        sock.setblocking(False)
        # As every loop's own server sockets (uvloop does not set it on an adopted socket).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop.create_task(self.connect(connection))

    async def connect(self, connection: Connection) -> None:
        """Give the socket to the loop as a transport with `connection` as its protocol."""
        try:
            await self.loop.connect_accepted_socket(lambda: connection, connection.sock)
        except OSError:  # reset before the transport was made
            self.stats.close_session(connection, "reset")
        except Exception:
            self.stats.count_internal_error("session")
            self.log.error("could not serve an accepted connection; closed it", exc_info=True)
            self.stats.close_session(connection, "error")

    # -- sweep and probe ----------------------------------------------------------------------
    def schedule_sweep(self, interval: float) -> None:
        """Run `sweep` every `interval` seconds."""
        self.loop.call_later(interval, self.fatal("sweep", self.sweep, interval))

    def sweep(self, interval: float) -> None:
        """Close idle connections; check that the listener still listens."""
        if not self.stats.draining:
            self.check_listener()
        now = time.monotonic()
        deadline = now - self.settings.idle_timeout
        for connection in list(self.connections):
            if connection.active:
                connection.active = False
                connection.last_active = now
            elif connection.is_idle(deadline):
                connection.finish("idle")
        self.schedule_sweep(interval)

    def probe(self, expected: float) -> None:
        """Measure how late a periodic timer fires: the time the loop was blocked."""
        self.loop_lag.observe(max(0.0, time.perf_counter() - expected))
        self.live_tasks = len(asyncio.all_tasks(self.loop))
        self.schedule_probe()

    def schedule_probe(self) -> None:
        """Run `probe` in PROBE_INTERVAL seconds (a failing probe is fatal, as gevent's)."""
        expected = time.perf_counter() + PROBE_INTERVAL
        self.loop.call_later(PROBE_INTERVAL, self.fatal("probe", self.probe, expected))

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A callback raised outside our own handlers: log and count it, keep serving."""
        self.stats.count_internal_error("loop")
        error = context.get("exception")
        self.log.error(
            "event loop: %s",
            context.get("message", "unexpected error"),
            exc_info=(type(error), error, error.__traceback__) if error is not None else None,
        )

    # -- metrics ------------------------------------------------------------------------------
    def extra_metrics(self) -> Iterable[Metric]:
        """Live transports and tasks, and event-loop blocking (as gevent's)."""
        # A transport and its Protocol per connection, no task (as gevent's arena_greenlets).
        yield GaugeMetricFamily(
            "arena_asyncio_transports", "Connection transports alive", value=len(self.connections)
        )
        yield GaugeMetricFamily(
            "arena_asyncio_tasks", "asyncio tasks alive on the event loop", value=self.live_tasks
        )
        yield from self.loop_lag.families()

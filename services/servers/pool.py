"""A reactor plus a worker pool: sockets stay in one thread, requests go to the executor.

A pool that ran one task per *connection* would serve only `workers` clients while the rest
hang; this server dispatches per *request*. The reactor (a selector) reads complete lines and,
once per loop, submits what the connections have ready: a connection's lines form one batch
(`protocol.answer_batch`), and `batching.plan_tasks` decides which batches share a task (cheap
ones from many connections, one task per worker; `/sleep` and `/work` alone). Workers receive
request bytes only, never sockets. While a connection's batch is in flight its later lines wait
in the reactor, and the reactor stops reading that connection until the batch is answered; it
also stops reading, and submits nothing more, while its client does not read its replies
(`batching.throttled`). The rest queues in the kernel, so a connection holds at most about two
reads of input and the replies to one batch.

Three pieces, each readable on its own: this module is the reactor (accept, read, submit,
deliver, flush, close, and what to do when a task fails); `batching.py` is the policy (which
lines go together, when a client is throttled); `executors.py` is the executor's lifecycle
(build, warm up, replace a broken one, end).

Failures are contained, not fatal. A worker process that dies breaks its executor for good;
`executors.WorkerPool` replaces it (from its sentinel, or from the first failed future), and the
batches that were in flight run once more on the new workers: every command is idempotent. A
batch that fails twice, or a task that raised, is answered `ERR server-busy` line by line and its
connection stays open; a client never waits forever. An unexpected exception while serving one
connection closes that connection only. Only what cannot be contained is fatal (exit code 1, via
`Server.run_or_exit`): a broken listener, or an executor that cannot be rebuilt.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import BrokenExecutor, CancelledError, Future

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services import protocol
from services.config import Settings
from services.database import DatabaseSettings, SyncPool, answer_batches_in_worker
from services.servers.base import Server
from services.servers.batching import MAX_UNSENT_OUTPUT, plan_tasks, throttled
from services.servers.executors import WorkerPool
from services.session import READ_SIZE, Session, reject

__all__ = ["MAX_UNSENT_OUTPUT", "Connection", "PoolServer"]

Answers = list[list[protocol.Answer]]  # one task's result: each batch's answers
# A finished task as the executor thread hands it to the reactor: (connections, batches,
# future, started, executor generation, attempt).
Completed = tuple[list["Connection"], list[list[bytes]], "Future[Answers]", float, int, int]

ACCEPTS_PER_WAKEUP = 64  # accept a burst of connections, but let established ones be served
ACCEPT, WAKE, WORKER_EXIT = object(), object(), object()  # selector keys that are not connections
# The reply to each line of a batch that failed twice (a worker died under it twice, or it
# raised twice): an error the client can retry on, on a connection that stays open.
BATCH_FAILED_REPLY = b"ERR server-busy a worker failed while answering this request; retry\n"


class Connection(Session):
    """A session as the reactor sees it: buffered lines, the batch in flight, unsent output."""

    __slots__ = (
        "eof",
        "inflight",
        "interest",
        "output",
        "pending",
        "queued",
    )

    def __init__(self, sock: socket.socket, line_limit: int) -> None:
        super().__init__(sock, line_limit)
        self.pending: list[bytes] = []  # complete lines read, not yet submitted
        self.inflight = 0  # lines of the batch being answered (0: none)
        self.output = bytearray()  # replies the socket did not take yet
        self.eof = False  # the client will send nothing more
        self.interest = 0  # selector events registered
        self.queued = False  # in the reactor's list of connections to submit


class PoolServer(Server):
    """One reactor thread for every socket; a concurrent.futures executor for every request."""

    model = "pool"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.workers = settings.workers
        # Process workers come from a forkserver started now, before any socket or thread:
        # replacements fork from it too (why: services/servers/executors.py).
        self.pool = WorkerPool(
            settings.executor,
            settings.workers,
            self.log,
            self.adapters,
            self.worker_database if settings.db_url else None,
        )
        # The task a worker runs: thread workers share the server's `/db` pool; process workers
        # use their own (services.database.answer_batches_in_worker).
        self.answer_task: Callable[[list[list[bytes]]], Answers] = (
            answer_batches_in_worker if settings.executor == "process" else self.answer_in_thread
        )
        self.watched: dict[int, int] = {}  # worker sentinel fd -> its executor's generation
        self.retried_requests = 0
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, Connection] = {}  # fd -> connection, reactor thread only
        self.ready: list[Connection] = []  # connections with lines to submit this round
        self.submissions: dict[int, int] = {}  # id(future) -> lines, in submission order
        self.submissions_total = 0
        self.completed: deque[Completed] = deque()
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_pending = False
        self.stop_requested = threading.Event()
        self.grace_deadline = float("inf")
        self.accept_resume_at = 0.0  # when to listen again after a back-off (0: listening)
        self.reactor: threading.Thread | None = None
        self.timed = settings.metrics

    def info(self) -> dict[str, str]:
        """Labels of arena_server_info: the executor kind and size too."""
        return {
            **super().info(),
            "executor": self.settings.executor,
            "workers": str(self.workers),
        }

    @property
    def worker_database(self) -> DatabaseSettings:
        """A process worker's own `/db` pool: one connection (it runs one task at a time)."""
        return DatabaseSettings.from_settings(self.settings, pool_size=1)

    def answer_in_thread(self, batches: list[list[bytes]]) -> Answers:
        """A thread worker's task: the batches, with the server's shared `/db` pool."""
        return protocol.answer_batches(batches, self.database)

    def open_database(self, settings: DatabaseSettings) -> SyncPool | None:
        """Thread workers share one pool; process workers open their own (none here)."""
        return super().open_database(settings) if self.settings.executor == "thread" else None

    # -- lifecycle -------------------------------------------------------------------------
    def serve_in_background(self) -> None:
        """Start the reactor thread."""
        assert self.listener is not None
        self.listener.setblocking(False)
        self.wake_reader.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, ACCEPT)
        self.selector.register(self.wake_reader, selectors.EVENT_READ, WAKE)
        self.watch_workers()
        self.reactor = threading.Thread(
            target=self.run_or_exit,
            args=("reactor", self.run_reactor),
            name="reactor",
            daemon=True,
        )
        self.reactor.start()

    def stop(self, grace: float) -> None:
        """Ask the reactor to drain, wait up to `grace`, then end the workers."""
        self.grace_deadline = time.monotonic() + grace
        self.stop_requested.set()
        self.wake()
        if self.reactor is not None:
            self.reactor.join(grace + 2.0)
        self.pool.end()  # no worker outlives the server

    def wake(self) -> None:
        """Interrupt the reactor's select() (from any thread)."""
        if not self.wake_pending:
            self.wake_pending = True
            try:
                self.wake_writer.send(b"\0")
            except OSError:
                pass  # the buffer is full, so the reactor is awake anyway

    # -- the reactor -----------------------------------------------------------------------
    def run_reactor(self) -> None:
        """Serve every socket until stopped and drained (or the grace period is over)."""
        idle_timeout = self.settings.idle_timeout
        sweep_every = min(1.0, idle_timeout / 4)
        next_sweep = time.monotonic() + sweep_every
        draining = False
        while True:
            timeout = sweep_every
            if self.accept_resume_at:
                timeout = max(0.0, min(timeout, self.accept_resume_at - time.monotonic()))
            self.dispatch(timeout)
            if self.stop_requested.is_set() and not draining:
                draining = True
                self.begin_draining()
            if self.ready:
                self.submit_ready()
            if draining and (not self.connections or time.monotonic() > self.grace_deadline):
                break
            now = time.monotonic()
            if not draining:
                self.resume_accepting(now)
            if now >= next_sweep:
                next_sweep = now + sweep_every
                self.sweep(now - idle_timeout)
        for connection in list(self.connections.values()):
            self.close(connection, "shutdown")

    def dispatch(self, timeout: float) -> None:
        """Wait up to `timeout` for events and handle each: accept, deliver, heal, read, write."""
        for key, events in self.selector.select(timeout):
            if key.data is ACCEPT:
                self.accept_burst(ACCEPTS_PER_WAKEUP)
            elif key.data is WAKE:
                self.drain_wakeups()
            elif key.data is WORKER_EXIT:
                # Unknown once unwatched: a stale event of a replaced executor's worker.
                generation = self.watched.get(key.fd)
                if generation is not None:
                    self.heal(generation)
            else:
                connection = key.data
                try:
                    if events & selectors.EVENT_WRITE:
                        self.flush(connection)
                    if events & selectors.EVENT_READ and connection.sock.fileno() >= 0:
                        self.read(connection)
                except Exception:
                    self.contain(connection)

    def pause_accepting(self, seconds: float) -> None:
        """Out of descriptors: stop listening; the reactor listens again at `accept_resume_at`."""
        assert self.listener is not None
        self.accept_resume_at = time.monotonic() + seconds
        self.selector.unregister(self.listener)

    def adopt(self, sock: socket.socket) -> Connection | None:
        """Serve a connected socket from now on (None: over the limit, answered busy, closed)."""
        settings = self.settings
        connection = self.stats.open_session(sock, settings.line_limit, Connection)
        if not isinstance(connection, Connection):
            reject(sock, settings.max_connections)
            return None
        sock.setblocking(False)
        self.connections[sock.fileno()] = connection
        self.set_interest(connection, selectors.EVENT_READ)
        return connection

    def resume_accepting(self, now: float) -> None:
        """Listen again once an accept() back-off is over."""
        if self.accept_resume_at and now >= self.accept_resume_at and self.listener is not None:
            self.accept_resume_at = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ, ACCEPT)

    def drain_wakeups(self) -> None:
        """Deliver finished batches to their connections."""
        with contextlib.suppress(BlockingIOError):
            self.wake_reader.recv(4096)
        # Reset before draining, so a batch finishing from now on wakes us again.
        self.wake_pending = False
        completed = self.completed
        while completed:
            self.deliver(*completed.popleft())

    def set_interest(self, connection: Connection, events: int) -> None:
        """Register exactly `events` for the connection (a syscall only when they change)."""
        if events == connection.interest:
            return
        if connection.interest == 0:
            self.selector.register(connection.sock, events, connection)
        elif events == 0:
            self.selector.unregister(connection.sock)
        else:
            self.selector.modify(connection.sock, events, connection)
        connection.interest = events

    def update_interest(self, connection: Connection) -> None:
        """Read unless paused, finished or over the buffering limit; write while output waits."""
        if connection.sock.fileno() < 0:
            return  # closed while being served
        reading = not (
            connection.eof
            or connection.overflow
            or connection.close_reason
            or (connection.pending and connection.inflight)  # lines wait behind a batch
            or throttled(len(connection.output))
        )
        events = (selectors.EVENT_READ if reading else 0) | (
            selectors.EVENT_WRITE if connection.output else 0
        )
        self.set_interest(connection, events)

    def read(self, connection: Connection) -> None:
        """Read what arrived, split lines, and submit them unless a batch is in flight."""
        try:
            data = connection.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self.close(connection, "reset")
            return
        connection.last_active = time.monotonic()
        if not data:
            connection.eof = True  # half-closed: still answer what was read
        else:
            lines = connection.take(data)
            if lines:
                connection.pending.extend(lines)
        if not connection.inflight:
            self.schedule(connection)
        self.update_interest(connection)

    def schedule(self, connection: Connection) -> None:
        """Queue the connection's pending lines for the next submission, or finish it."""
        if connection.pending:
            if throttled(len(connection.output)):
                return  # a client that does not read gets no more work done: flush() resumes
            if not connection.queued:
                connection.queued = True
                self.ready.append(connection)
        elif connection.overflow and not connection.close_reason:
            self.send(connection, connection.refuse_overlong())
            self.finish(connection, "line-too-long")
        elif connection.eof and not connection.output:
            self.close(connection, "shutdown" if self.stats.draining else "client")

    def submit_ready(self) -> None:
        """Take every queued connection's pending lines as its batch; submit them as planned.

        Which batches share a task is `batching.plan_tasks`'s decision (cheap lines together,
        slow ones apart).
        """
        ready, self.ready = self.ready, []
        batches: list[tuple[Connection, list[bytes]]] = []
        for connection in ready:
            connection.queued = False
            if connection.inflight or not connection.pending or connection.sock.fileno() < 0:
                continue
            batch, connection.pending = connection.pending, []
            connection.inflight = len(batch)
            batches.append((connection, batch))
        for task in plan_tasks([batch for _, batch in batches], self.workers):
            self.submit([batches[i][0] for i in task], [batches[i][1] for i in task])

    def submit(
        self,
        connections: list[Connection],
        batches: list[list[bytes]],
        attempt: int = 0,
        first_started: float | None = None,
    ) -> None:
        """Send batches of request lines (one per connection) to the executor as one task."""
        # A retry keeps its first submission's time: the failed attempt was waited for too.
        started = (
            first_started
            if first_started is not None
            else (time.perf_counter() if self.timed else 0.0)
        )
        pool = self.pool
        generation = pool.generation
        try:
            future = pool.executor.submit(self.answer_task, batches)
        except BrokenExecutor:  # broke before its failed futures or sentinel reached us
            self.heal(generation)
            generation = pool.generation
            future = pool.executor.submit(self.answer_task, batches)
        self.submissions[id(future)] = sum(map(len, batches))
        self.submissions_total += 1

        def done(future: Future[Answers]) -> None:  # runs in an executor thread
            self.completed.append((connections, batches, future, started, generation, attempt))
            self.wake()

        future.add_done_callback(done)

    def deliver(
        self,
        connections: list[Connection],
        batches: list[list[bytes]],
        future: Future[Answers],
        started: float,
        generation: int,
        attempt: int,
    ) -> None:
        """Hand each connection the replies of its batch."""
        self.submissions.pop(id(future), None)
        try:
            results = future.result()
        except Exception as error:
            self.task_failed(connections, batches, error, generation, attempt, started)
            return
        elapsed = time.perf_counter() - started if self.timed else 0.0
        for connection, answers in zip(connections, results, strict=True):
            try:
                self.deliver_one(connection, answers, elapsed)
            except Exception:
                self.contain(connection)

    # -- failures --------------------------------------------------------------------------
    def task_failed(
        self,
        connections: list[Connection],
        batches: list[list[bytes]],
        error: Exception,
        generation: int,
        attempt: int,
        started: float,
    ) -> None:
        """Run a failed task's batches once more (every command is idempotent), then give up.

        A broken executor is replaced first and the task goes again as it was. A task that
        raised is a bug: logged, counted, and each connection's batch retried on its own, so
        the one that raises again does not take the others down with it.
        """
        broken = isinstance(error, BrokenExecutor)
        if broken:
            self.heal(generation)
        elif isinstance(error, CancelledError):
            broken = True  # queued on an executor that was replaced: not a bug, run it again
        else:
            self.stats.count_internal_error("worker")
            self.log.error("a task raised (attempt %d of 2)", attempt + 1, exc_info=error)
        live = []
        for connection, batch in zip(connections, batches, strict=True):
            if connection.sock.fileno() >= 0:
                live.append((connection, batch))
            else:
                connection.inflight = 0
        if attempt == 0 and live:
            self.retried_requests += sum(len(batch) for _, batch in live)
            if broken:
                self.submit([c for c, _ in live], [b for _, b in live], attempt + 1, started)
            else:
                for connection, batch in live:
                    self.submit([connection], [batch], attempt + 1, started)
            return
        for connection, batch in live:
            try:
                self.answer_failed(connection, batch)
            except Exception:
                self.contain(connection)

    def answer_failed(self, connection: Connection, batch: list[bytes]) -> None:
        """Answer each line of a twice-failed batch with ERR server-busy; keep the connection."""
        connection.inflight = 0
        for _ in batch:
            connection.tally.count_error("server-busy")
        self.send(connection, BATCH_FAILED_REPLY * len(batch))
        self.schedule(connection)
        self.update_interest(connection)

    def heal(self, generation: int) -> None:
        """Replace the executor if `generation` is still the current one, and watch its workers.

        Raises when no executor can be built: that escapes the reactor and ends the process.
        """
        if generation != self.pool.generation:
            return  # replaced already: this failure belonged to the old executor
        self.unwatch_workers()  # before the old sentinels are closed with their processes
        self.pool.replace(generation)
        self.watch_workers()

    def watch_workers(self) -> None:
        """Register the workers' sentinels: the selector then says when one of them exits."""
        for sentinel in self.pool.sentinels():
            self.selector.register(sentinel, selectors.EVENT_READ, WORKER_EXIT)
            self.watched[sentinel] = self.pool.generation

    def unwatch_workers(self) -> None:
        """Forget the current workers' sentinels."""
        for sentinel in self.watched:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sentinel)
        self.watched = {}

    def contain(self, connection: Connection) -> None:
        """An unexpected exception while serving one connection: log, count, close only it."""
        self.stats.count_internal_error("reactor")
        self.log.error("serving a connection failed; closing that connection", exc_info=True)
        connection.pending.clear()
        connection.inflight = 0
        try:
            self.close(connection, "error")
        except Exception:  # forget it by hand, so the reactor's own state stays consistent
            with contextlib.suppress(Exception):
                self.selector.unregister(connection.sock)
            for fileno, known in list(self.connections.items()):
                if known is connection:
                    del self.connections[fileno]
            self.stats.close_session(connection, "error")

    def deliver_one(
        self, connection: Connection, answers: list[protocol.Answer], elapsed: float
    ) -> None:
        """Count and send one connection's replies, then queue its next lines."""
        connection.inflight = 0
        connection.last_active = time.monotonic()
        if connection.sock.fileno() < 0:
            return  # closed meanwhile (reset by the client, or the grace period ended)
        replies, closing = connection.settle(answers, elapsed)
        self.send(connection, replies)
        if closing:
            connection.pending.clear()
            self.finish(connection, "quit")
        else:
            self.schedule(connection)
        self.update_interest(connection)

    def send(self, connection: Connection, data: bytes) -> None:
        """Send now what the socket takes; keep the rest until it is writable."""
        if not connection.output:
            try:
                sent = connection.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close(connection, "reset")
                return
            connection.tally.sent += sent
            data = data[sent:]
        connection.output += data

    def flush(self, connection: Connection) -> None:
        """Send buffered output; close a finished connection once everything is out."""
        try:
            sent = connection.sock.send(connection.output)
        except BlockingIOError:
            return
        except OSError:
            self.close(connection, "reset")
            return
        connection.tally.sent += sent
        del connection.output[:sent]
        if not connection.output and connection.close_reason:
            self.close(connection, connection.close_reason)
            return
        if not connection.inflight and not throttled(len(connection.output)):
            self.schedule(connection)  # submit what waited, or finish a half-closed connection
        self.update_interest(connection)

    def finish(self, connection: Connection, reason: str) -> None:
        """Close after the output is flushed (now, if nothing is waiting)."""
        connection.close_reason = reason
        if not connection.output:
            self.close(connection, reason)

    def close(self, connection: Connection, reason: str) -> None:
        """Forget the connection and close its socket."""
        fileno = connection.sock.fileno()
        if fileno < 0:
            return
        if connection.interest:
            self.selector.unregister(connection.sock)
            connection.interest = 0
        self.connections.pop(fileno, None)
        self.stats.close_session(connection, reason)

    def begin_draining(self) -> None:
        """Stop accepting; close connections with nothing to answer, let the others finish."""
        self.stats.draining = True
        if self.listener is not None:
            if not self.accept_resume_at:
                self.selector.unregister(self.listener)
            self.listener.close()
        for connection in list(self.connections.values()):
            connection.eof = True  # read nothing more; answer what was read
            if not connection.inflight:
                self.schedule(connection)
            self.update_interest(connection)

    def sweep(self, deadline: float) -> None:
        """Close connections idle since before `deadline` with nothing in progress."""
        self.check_listener()  # a listener closed under epoll would otherwise go unnoticed
        for connection in list(self.connections.values()):
            if (
                not connection.inflight
                and not connection.pending
                and not connection.output
                and connection.last_active < deadline
            ):
                self.close(connection, "idle")

    # -- metrics ---------------------------------------------------------------------------
    def extra_metrics(self) -> Iterable[Metric]:
        """Workers, their load and queue (estimated from the batches in flight), their CPU."""
        sizes = list(self.submissions.values())  # oldest first, as the executor takes them
        yield GaugeMetricFamily("arena_pool_workers", "Executor workers", value=self.workers)
        yield GaugeMetricFamily(
            "arena_pool_busy_workers",
            "Workers running a batch now (estimate)",
            value=min(len(sizes), self.workers),
        )
        yield GaugeMetricFamily(
            "arena_pool_queue_depth",
            "Requests waiting for a free worker (estimate)",
            value=sum(sizes[self.workers :]),
        )
        yield GaugeMetricFamily(
            "arena_pool_inflight_requests",
            "Requests submitted and not yet answered",
            value=sum(sizes),
        )
        yield CounterMetricFamily(
            "arena_pool_submissions",
            "Tasks submitted to the executor",
            value=self.submissions_total,
        )
        yield CounterMetricFamily(
            "arena_pool_worker_cpu_seconds",
            "CPU time of the worker processes",
            value=self.pool.cpu_seconds(),
        )
        yield CounterMetricFamily(
            "arena_pool_worker_restarts",
            "Executors replaced because a worker died",
            value=self.pool.restarts,
        )
        yield CounterMetricFamily(
            "arena_pool_retried_requests",
            "Requests run again after their task failed",
            value=self.retried_requests,
        )

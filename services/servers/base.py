"""The lifecycle every model shares: bind, accept, sweep idle connections, stop gracefully."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import ClassVar

from prometheus_client.core import Metric

from services import protocol
from services.adapters import Adapters
from services.blocking import serve_blocking
from services.config import Settings, redact_url
from services.database import DatabaseSettings, DatabaseStats, SyncPool, open_pool, psycopg_driver
from services.ratelog import RateLimitedLog
from services.session import ServerStats, Session, reject

# accept() errors that mean "out of a resource for now": log, back off, retry (as Trio does).
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# accept() errors that mean the listening socket itself is broken: fatal, as in gevent's
# baseserver. Retrying would leave a live process that never serves again.
BROKEN_LISTENER_ERRNOS = {errno.EBADF, errno.EINVAL, errno.ENOTSOCK}
# Exit code of a server whose serving loop failed: a supervisor (Docker) restarts it.
FATAL_EXIT_CODE = 1
# Longest pause between accept() retries while out of descriptors.
MAX_ACCEPT_BACKOFF = 1.0


class Server(ABC):
    """One server: a listening socket, its connections and their counters."""

    model: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = ServerStats(settings.max_connections)
        self.adapters = Adapters()  # private-API adapters checked at start-up, and fallbacks
        self.listener: socket.socket | None = None
        self.accept_backoff = 0.0  # seconds of the current accept() back-off (0: none)
        self.log = logging.getLogger(f"arena.{self.model}")
        self.rate_limited = RateLimitedLog(self.log)
        # `/db`'s pool for a thread or a greenlet to wait on (None: no --db-url); a model whose
        # requests wait elsewhere (process workers, an event loop) overrides `open_database`.
        database = DatabaseSettings.from_settings(settings)
        self.database: SyncPool | None = self.open_database(database)

    def open_database(self, settings: DatabaseSettings) -> SyncPool | None:
        """The pool `/db` waits on: psycopg 3's synchronous driver, unless the model overrides."""
        return open_pool(settings, psycopg_driver)

    def database_stats(self) -> DatabaseStats | None:
        """What the database pool counted (None: no database)."""
        return self.database.stats if self.database is not None else None

    def close_database(self) -> None:
        """Close the pool's connections after `stop` (a query still running closes its own)."""
        if self.database is not None:
            self.database.close()

    def metric_families(self) -> Iterable[Metric]:
        """The model's own metrics, then the database pool's."""
        yield from self.extra_metrics()
        stats = self.database_stats()
        if stats is not None:
            yield from stats.families()

    def bind(self) -> socket.socket:
        """Open the listening socket with a real backlog (or take the inherited one)."""
        settings = self.settings
        if settings.listen_fd >= 0:  # already bound and listening: every worker accepts on it
            return socket.socket(fileno=settings.listen_fd)
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if settings.reuse_port:  # one of --processes N workers: the kernel spreads connections
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((settings.host, settings.port))
            listener.listen(settings.backlog)
        except OSError:
            listener.close()
            raise
        return listener

    def start(self) -> tuple[str, int]:
        """Bind, start serving in the background, and return the real (host, port)."""
        self.listener = self.bind()
        self.serve_in_background()
        host, port = self.listener.getsockname()[:2]
        return host, port

    @abstractmethod
    def serve_in_background(self) -> None:
        """Start accepting and serving connections without blocking the caller."""

    @abstractmethod
    def stop(self, grace: float) -> None:
        """Stop accepting, answer what was read for up to `grace` seconds, close the rest."""

    def info(self) -> dict[str, str]:
        """Labels of the arena_server_info metric."""
        return {
            "model": self.model,
            "executor": "none",
            "workers": "0",
            "db_driver": self.settings.db_driver,
        }

    def ready_fields(self) -> dict[str, str]:
        """What the ready line names besides the addresses and limits (asyncio: its loop)."""
        settings = self.settings
        return {
            "db": redact_url(settings.db_url) if settings.db_url else "none",
            "db_driver": settings.db_driver,
            "db_pool": str(settings.db_pool),
        }

    def extra_metrics(self) -> Iterable[Metric]:
        """The model's own metrics (threads, pool queue, event loop)."""
        return ()

    def accept_failed(self, error: OSError) -> float:
        """Count and log a failed accept(); returns how long to back off before the next.

        Raises the error again when it means the listener is broken (the loop then fails).
        """
        name = errno.errorcode.get(error.errno or 0, "unknown")
        self.stats.count_accept_error(name)
        if error.errno in BROKEN_LISTENER_ERRNOS:
            raise error
        self.rate_limited.warning(f"accept-{name}", "accept() failed: %s", error)
        return 0.1 if error.errno in CAPACITY_ERRNOS else 0.0

    def accept_burst(self, limit: int) -> None:
        """Accept up to `limit` connections waiting on a non-blocking listener, adopting each.

        For the models that wait for the listener in an event loop (pool, asyncio): a bounded
        burst lets established connections be served between bursts. Out of descriptors, the
        model stops listening for a doubling pause (`pause_accepting`) instead of spinning.
        """
        listener = self.listener
        assert listener is not None
        for _ in range(limit):
            try:
                sock, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                pause = self.accept_failed(error)  # raises when the listener is broken
                if pause:
                    self.accept_backoff = min(MAX_ACCEPT_BACKOFF, self.accept_backoff * 2 or pause)
                    self.pause_accepting(self.accept_backoff)
                return
            self.accept_backoff = 0.0
            self.adopt(sock)

    def pause_accepting(self, seconds: float) -> None:
        """Stop listening for `seconds` (an event-loop model's part of `accept_burst`)."""
        raise NotImplementedError

    def adopt(self, sock: socket.socket) -> object:
        """Serve an accepted socket from now on (an event-loop model's part of `accept_burst`)."""
        raise NotImplementedError

    def check_listener(self) -> None:
        """Raise OSError when the listening socket was closed or replaced under the server.

        A loop waiting in epoll (gevent's accept, the pool's reactor) never calls accept() on
        a closed descriptor: epoll just drops it, and the server would live on serving nobody.
        One getsockopt per sweep notices it; the sweep's `run_or_exit` then ends the process.
        """
        listener = self.listener
        if listener is None:
            return
        try:
            listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            if not self.stats.draining:
                raise  # EBADF (closed) or ENOTSOCK (the number now names another file)
            return
        if not listening and not self.stats.draining:  # the number was reused by a connection
            raise OSError(errno.EINVAL, "the protocol socket no longer listens")

    def run_or_exit(self, name: str, loop: Callable[[], None]) -> None:
        """Run a serving loop (accept, sweep, reactor, probe); if it raises, exit the process.

        A loop that died would leave a live process that no longer serves, which no health
        check repairs: Docker restarts crashed containers, not unhealthy ones. So an
        unexpected exception is logged with its traceback, counted, and fatal (exit code 1).
        """
        try:
            loop()
        except Exception:
            self.stats.count_internal_error(name)
            self.log.critical(
                "the %s loop failed; exiting with code %d so a supervisor restarts the server",
                name,
                FATAL_EXIT_CODE,
                exc_info=True,
            )
            logging.shutdown()
            os._exit(FATAL_EXIT_CODE)

    def catch_signals(self) -> Callable[[], None]:
        """Catch SIGTERM and SIGINT now; returns a function that blocks until one arrives."""
        requested = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: requested.set())

        def wait() -> None:
            while not requested.wait(0.5):  # a timeout keeps the main thread handling signals
                pass

        return wait


class BlockingServer(Server):
    """A server that runs `serve_blocking` per connection; subclasses say how it is spawned."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.stopping = threading.Event()
        self.accept_task: object = None

    def spawn(self, function: Callable[..., None], *args: object) -> object:
        """Run `function(*args)` concurrently; a daemon thread unless the model says otherwise
        (gevent: a greenlet). Returns a handle `join` accepts."""
        thread = threading.Thread(target=function, args=args, daemon=True)
        thread.start()
        return thread

    def join(self, task: object, timeout: float) -> None:
        """Wait for a handle returned by `spawn`."""
        if isinstance(task, threading.Thread):
            task.join(timeout)

    def serve_in_background(self) -> None:
        """Spawn the accept loop and the idle sweeper."""
        self.accept_task = self.spawn(self.run_or_exit, "accept", self.accept_loop)
        self.spawn(self.run_or_exit, "sweep", self.sweep_loop)

    def accept_loop(self) -> None:
        """Accept connections until stopped; a failed accept never ends the loop."""
        assert self.listener is not None
        listener, stats, settings = self.listener, self.stats, self.settings
        backoff = 0.0
        while not self.stopping.is_set():
            try:
                sock, _address = listener.accept()
            except OSError as error:
                if self.stopping.is_set():
                    return
                pause = self.accept_failed(error)
                backoff = min(MAX_ACCEPT_BACKOFF, backoff * 2 or pause)
                time.sleep(backoff if pause else 0)
                continue
            backoff = 0.0
            session = stats.open_session(sock, settings.line_limit)
            if session is None:
                reject(sock, settings.max_connections)
                continue
            try:
                self.spawn_session(session)
            except RuntimeError as error:  # "can't start new thread": out of memory or pids
                self.turn_away(session, error)
                backoff = MAX_ACCEPT_BACKOFF / 10
                time.sleep(backoff)

    def turn_away(self, session: Session, error: Exception) -> None:
        """Answer `server-busy` to a connection that cannot be given a thread, and close it."""
        self.rate_limited.warning("spawn", "cannot serve a new connection: %s", error)
        session.tally.count_error("server-busy")
        try:
            session.sock.send(protocol.server_busy_reply(self.settings.max_connections))
        except OSError:
            pass
        self.stats.close_session(session, "overload")

    def spawn_session(self, session: Session) -> None:
        """Serve one connection concurrently with the others."""
        self.spawn(serve_blocking, session, self.stats, self.settings.metrics, self.database)

    def sweep_loop(self) -> None:
        """Close idle connections; sockets carry no timeout, which keeps every read cheap.

        Each sweep also checks that the listener still listens (`check_listener`).
        """
        idle_timeout = self.settings.idle_timeout
        interval = min(1.0, idle_timeout / 4)
        while not self.stopping.wait(interval):
            self.stats.sweep_idle(idle_timeout)
            self.check_listener()

    def stop(self, grace: float) -> None:
        """Stop accepting, let every connection finish what it read, then close the rest."""
        stats = self.stats
        stats.draining = True
        self.stopping.set()
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
            except OSError:
                pass
            self.join(self.accept_task, 1.0)
            self.listener.close()
        for session in stats.live():
            # Only the read side: a request in progress can still send its reply.
            session.interrupt("shutdown", socket.SHUT_RD)
        if not stats.wait_all_closed(grace):
            remaining = list(stats.live())
            self.log.warning("grace of %ss over: closing %d connections", grace, len(remaining))
            for session in remaining:
                session.interrupt("shutdown")
                stats.close_session(session, "shutdown")

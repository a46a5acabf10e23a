"""The database behind `/db`: a bounded pool of PostgreSQL connections, its drivers, its metrics.

Written once for every model. What differs between models is only which driver waits and how
(`models.Model.db_drivers`, and each server module's `database` wiring):

| model | default driver | what waits for the database |
|---|---|---|
| threaded | psycopg 3, synchronous | the connection's thread |
| pool | psycopg 3, synchronous | an executor worker (threads share a pool, processes own one) |
| gevent | psycopg 3, synchronous | the connection's greenlet (psycopg waits through gevent) |
| asyncio | psycopg 3, `AsyncConnection` | a task on the loop (`AsyncPool`) |

The seed's warning, as a setting (`--db-driver`, gevent and asyncio only): `blocking` is a
driver that the model cannot switch around, so one query stalls every connection of the
process while the CPU idles. For gevent that is psycopg2, whose libpq calls are C that
monkey-patching cannot reach; `blocking-fixed` is the same psycopg2 with psycogreen's gevent wait
callback. For asyncio `blocking` is psycopg's synchronous API called on the loop;
`blocking-fixed` hands that call to the loop's default executor (a few threads: their number
bounds the rate, the pool lesson again).

Why psycopg's `AsyncConnection` for asyncio rather than asyncpg: measured on this machine (ten
concurrent `pg_sleep(0.2)`, one connection each), both waited 0.21 s, so for waiting they are equal;
with one driver family every model's `/db 0` compares the models, not two drivers' protocol
code, and the blocking variants are the same driver's synchronous API.

Why a pool of our own (`SyncPool`, `AsyncPool`) and not psycopg_pool's: psycopg_pool refills a
lost connection in the background with exponential back-off (psycopg_pool 3.3: 1 s, doubling),
so after PostgreSQL restarts `/db` may stay down for seconds beyond its return, and its waits are
not ours to count. Ours connects on demand with a connect timeout (the first request after the
database is back succeeds), retries a request once on a fresh connection when a reused one
turns out dead (every `/db` is idempotent), bounds both the connections and the wait for one,
and counts exactly what the metrics show. A connection never crosses a fork: the process
workers each build their own pool when they start (`services.servers.executors`).

Errors answer the request, never the connection: `backend-unavailable` (cannot connect, the
connection died), `backend-busy` (no connection free within `--db-timeout`), `backend-error`
(the database refused the query).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from services import protocol
from services.config import Settings
from services.session import Histogram

QUERY = "SELECT pg_sleep(%s)"  # a bound parameter: the number never becomes SQL text
ERROR_KINDS = ("unavailable", "busy", "error")


@dataclass(frozen=True)
class DatabaseSettings:
    """What a pool needs to connect: picklable, so process workers receive it whole."""

    url: str
    password: str
    pool_size: int
    timeout: float
    application_name: str
    driver: str

    @classmethod
    def from_settings(cls, settings: Settings, pool_size: int | None = None) -> DatabaseSettings:
        """The database part of a server's settings; `pool_size` overrides --db-pool."""
        return cls(
            settings.db_url,
            settings.db_password,
            pool_size or settings.db_pool,
            settings.db_timeout,
            f"arena-{settings.model}",
            settings.db_driver,
        )

    def connect_arguments(self) -> dict[str, Any]:
        """libpq keywords besides the URL (the password travels here, never in the URL)."""
        arguments: dict[str, Any] = {
            # libpq takes whole seconds, and treats 1 as 2.
            "connect_timeout": max(2, math.ceil(self.timeout)),
            "application_name": self.application_name,
        }
        if self.password:
            arguments["password"] = self.password
        return arguments


class BackendFailure(Exception):
    """A `/db` that cannot be answered; `code` is its protocol error code."""

    def __init__(self, code: str, reason: str = "") -> None:
        super().__init__(reason or code)
        self.code = code


class DatabaseStats:
    """What the pool did: its gauges, two histograms and errors by kind (read at scrape time)."""

    def __init__(self, pool_size: int, driver: str) -> None:
        self.pool_size = pool_size
        self.driver = driver
        self.open = 0  # connections that exist (idle or in use)
        self.in_use = 0
        self.waiting = 0  # requests waiting for a free connection
        self.wait = Histogram()  # seconds waited for a connection, connecting included
        self.query = Histogram()  # seconds of the query itself
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.lock = threading.Lock()  # writers only; a scrape reads plain numbers

    def failed(self, code: str) -> None:
        """Count one failed `/db` by its error code (backend-unavailable -> unavailable)."""
        with self.lock:
            kind = code.removeprefix("backend-")
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def families(self) -> Iterable[Metric]:
        """The database metric families (docs/METRICS.md)."""
        from services.metrics import counter_by, histogram_family

        yield GaugeMetricFamily(
            "arena_db_pool_size", "Database connections this server may hold", self.pool_size
        )
        yield GaugeMetricFamily(
            "arena_db_connections_open", "Database connections open now", value=self.open
        )
        yield GaugeMetricFamily(
            "arena_db_connections_in_use", "Database connections running a query", value=self.in_use
        )
        yield GaugeMetricFamily(
            "arena_db_waiting_requests",
            "/db requests waiting for a free database connection",
            value=self.waiting,
        )
        yield histogram_family(
            "arena_db_pool_wait_seconds",
            "Wait for a database connection (connecting included)",
            [([], self.wait)],
        )
        yield histogram_family(
            "arena_db_query_seconds", "Database query time of /db", [([], self.query)]
        )
        yield counter_by(
            "arena_db_errors", "Failed /db requests by kind", "kind", list(self.errors.items())
        )


# -- drivers: how to connect, run the query, and tell a dead connection --------------------------


@dataclass(frozen=True)
class Driver:
    """One synchronous PostgreSQL driver as the pool uses it."""

    name: str
    connect: Callable[[DatabaseSettings], Any]
    run: Callable[[Any, float], None]
    lost: tuple[type[BaseException], ...]  # the connection is gone: discard it
    refused: tuple[type[BaseException], ...]  # the database refused the query


def psycopg_driver() -> Driver:
    """psycopg 3's synchronous API (cooperative under gevent's monkey-patching)."""
    import psycopg

    def connect(settings: DatabaseSettings) -> Any:
        return psycopg.connect(settings.url, autocommit=True, **settings.connect_arguments())

    def run(connection: Any, seconds: float) -> None:
        connection.execute(QUERY, (seconds,))

    return Driver(
        "psycopg",
        connect,
        run,
        (psycopg.OperationalError, psycopg.InterfaceError),
        (psycopg.Error,),
    )


def psycopg2_driver(green: bool) -> Driver:
    """psycopg2 (libpq in C: blocks a gevent hub) or, `green`, with psycogreen's wait callback."""
    import psycopg2
    import psycopg2.extensions

    if green:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
    else:
        psycopg2.extensions.set_wait_callback(None)

    def connect(settings: DatabaseSettings) -> Any:
        connection = psycopg2.connect(settings.url, **settings.connect_arguments())
        connection.autocommit = True
        return connection

    def run(connection: Any, seconds: float) -> None:
        with connection.cursor() as cursor:
            cursor.execute(QUERY, (seconds,))

    return Driver(
        "psycopg2+psycogreen" if green else "psycopg2",
        connect,
        run,
        (psycopg2.OperationalError, psycopg2.InterfaceError),
        (psycopg2.Error,),
    )


def closed(connection: Any) -> bool:
    """Whether a connection is known dead (psycopg 3: `closed`/`broken`; psycopg2: `closed`)."""
    return bool(getattr(connection, "closed", False) or getattr(connection, "broken", False))


class SyncPool:
    """At most `pool_size` connections; a request waits up to `timeout` for one, else busy.

    Threading primitives: OS locks for threads, green ones under gevent's patching.
    """

    def __init__(self, settings: DatabaseSettings, driver: Driver) -> None:
        self.settings = settings
        self.driver = driver
        self.stats = DatabaseStats(settings.pool_size, driver.name)
        self.slots = threading.BoundedSemaphore(settings.pool_size)
        self.idle: list[Any] = []  # LIFO: the warmest connection first
        self.closing = False

    def query(self, milliseconds: int) -> str | None:
        """Run `/db`'s query; None, or the protocol error code it failed with."""
        try:
            self.run(milliseconds / 1000)
        except BackendFailure as failure:
            self.stats.failed(failure.code)
            return failure.code
        return None

    def run(self, seconds: float) -> None:
        """Take a connection, run the query (once more on a fresh one if a reused one died)."""
        stats = self.stats
        started = time.perf_counter()
        connection = None
        with stats.lock:
            stats.waiting += 1
        try:
            acquired = self.slots.acquire(timeout=self.settings.timeout)
        finally:
            with stats.lock:
                stats.waiting -= 1
        if not acquired:
            stats.wait.observe(time.perf_counter() - started)
            raise BackendFailure("backend-busy")
        try:
            connection, reused = self.take(started)
            with stats.lock:
                stats.in_use += 1
            try:
                try:
                    self.timed_run(connection, seconds)
                except self.driver.lost:
                    self.discard(connection)
                    connection = None
                    if not reused:
                        raise
                    connection, _ = self.take(None)  # a dead idle connection: one fresh try
                    self.timed_run(connection, seconds)
            finally:
                with stats.lock:
                    stats.in_use -= 1
            self.give_back(connection)
        except self.driver.lost as error:
            if connection is not None:
                self.discard(connection)
            raise BackendFailure("backend-unavailable", str(error)) from None
        except self.driver.refused as error:
            self.give_back(connection)
            raise BackendFailure("backend-error", str(error)) from None
        finally:
            self.slots.release()

    def timed_run(self, connection: Any, seconds: float) -> None:
        """The query, timed into the query histogram (failed ones too)."""
        started = time.perf_counter()
        try:
            self.driver.run(connection, seconds)
        finally:
            elapsed = time.perf_counter() - started
            with self.stats.lock:
                self.stats.query.observe(elapsed)

    def take(self, started: float | None) -> tuple[Any, bool]:
        """An idle connection or a new one, and whether it was reused; times the wait."""
        try:
            while self.idle:
                connection = self.idle.pop()
                if not closed(connection):
                    return connection, True
                self.discard(connection)
            try:
                connection = self.driver.connect(self.settings)
            except self.driver.refused as error:
                raise BackendFailure("backend-unavailable", str(error)) from None
            with self.stats.lock:
                self.stats.open += 1
            return connection, False
        finally:
            if started is not None:
                elapsed = time.perf_counter() - started
                with self.stats.lock:
                    self.stats.wait.observe(elapsed)

    def give_back(self, connection: Any) -> None:
        """Keep a connection for the next request (closed instead once the pool is closing)."""
        if connection is None:
            return
        if self.closing or closed(connection):
            self.discard(connection)
        else:
            self.idle.append(connection)

    def discard(self, connection: Any) -> None:
        """Close a connection and forget it."""
        try:
            connection.close()
        except Exception:  # already broken: closing it is all that was left to do
            pass
        with self.stats.lock:
            self.stats.open -= 1

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their query ends."""
        self.closing = True
        while self.idle:
            self.discard(self.idle.pop())


class AsyncPool:
    """The same pool for coroutines: psycopg's `AsyncConnection` on the server's event loop."""

    def __init__(self, settings: DatabaseSettings) -> None:
        import psycopg

        self.psycopg = psycopg
        self.settings = settings
        self.stats = DatabaseStats(settings.pool_size, "psycopg-async")
        self.slots = asyncio.Semaphore(settings.pool_size)
        self.idle: list[Any] = []
        self.closing = False

    async def query(self, milliseconds: int) -> str | None:
        """Run `/db`'s query on the loop; None, or the protocol error code it failed with."""
        try:
            await self.run(milliseconds / 1000)
        except BackendFailure as failure:
            self.stats.failed(failure.code)
            return failure.code
        return None

    async def run(self, seconds: float) -> None:
        """Take a connection, run the query (once more on a fresh one if a reused one died)."""
        stats, lost = self.stats, (self.psycopg.OperationalError, self.psycopg.InterfaceError)
        started = time.perf_counter()
        stats.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), self.settings.timeout)
        except TimeoutError:
            stats.wait.observe(time.perf_counter() - started)
            raise BackendFailure("backend-busy") from None
        finally:
            stats.waiting -= 1
        connection = None
        try:
            connection, reused = await self.take()
            stats.wait.observe(time.perf_counter() - started)
            stats.in_use += 1
            try:
                try:
                    await self.timed_run(connection, seconds)
                except lost:
                    await self.discard(connection)
                    connection = None
                    if not reused:
                        raise
                    connection, _ = await self.take()
                    await self.timed_run(connection, seconds)
            finally:
                stats.in_use -= 1
            await self.give_back(connection)
        except lost as error:
            if connection is not None:
                await self.discard(connection)
            raise BackendFailure("backend-unavailable", str(error)) from None
        except self.psycopg.Error as error:
            await self.give_back(connection)
            raise BackendFailure("backend-error", str(error)) from None
        finally:
            self.slots.release()

    async def timed_run(self, connection: Any, seconds: float) -> None:
        """The query, timed into the query histogram (failed ones too)."""
        started = time.perf_counter()
        try:
            await connection.execute(QUERY, (seconds,))
        finally:
            self.stats.query.observe(time.perf_counter() - started)

    async def take(self) -> tuple[Any, bool]:
        """An idle connection, or a new one; whether it was reused."""
        while self.idle:
            connection = self.idle.pop()
            if not closed(connection):
                return connection, True
            await self.discard(connection)
        try:
            connection = await self.psycopg.AsyncConnection.connect(
                self.settings.url, autocommit=True, **self.settings.connect_arguments()
            )
        except self.psycopg.Error as error:
            raise BackendFailure("backend-unavailable", str(error)) from None
        self.stats.open += 1
        return connection, False

    async def give_back(self, connection: Any) -> None:
        """Keep a connection for the next request (closed instead once the pool is closing)."""
        if connection is None:
            return
        if self.closing or closed(connection):
            await self.discard(connection)
        else:
            self.idle.append(connection)

    async def discard(self, connection: Any) -> None:
        """Close a connection and forget it."""
        try:
            await connection.close()
        except Exception:  # already broken: closing it is all that was left to do
            pass
        self.stats.open -= 1

    async def close(self) -> None:
        """Close the idle connections; those in use are closed when their query ends."""
        self.closing = True
        while self.idle:
            await self.discard(self.idle.pop())


def open_pool(settings: DatabaseSettings, driver: Callable[[], Driver]) -> SyncPool | None:
    """A synchronous pool over `driver()`, or None without a database URL (`/db` then fails)."""
    # Said once, in the server's ready line (`Server.ready_fields`), not logged here: a server
    # that then fails to bind prints one error line only.
    return SyncPool(settings, driver()) if settings.url else None


# -- process workers: each owns its pool ---------------------------------------------------------
# A process worker runs one task at a time, so one connection is all it can use; it connects on
# its first `/db`. Set by `start_worker_database` when the worker starts (executors.prepare_worker).
_worker_pool: SyncPool | None = None


def start_worker_database(settings: DatabaseSettings) -> None:
    """In a new process worker: open its own pool (nothing is inherited from the server)."""
    global _worker_pool
    _worker_pool = open_pool(settings, psycopg_driver)


def answer_batches_in_worker(batches: list[list[bytes]]) -> list[list[protocol.Answer]]:
    """`protocol.answer_batches` with this worker's own database (a process executor's task)."""
    return protocol.answer_batches(batches, _worker_pool)

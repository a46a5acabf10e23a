"""The broken servers of tests/sabotage.py: each one is a real server with one safeguard or one
mechanism taken away, so that a lesson's check has something to catch.

Imported only by `python -m services` when ARENA_EXTRA_MODELS names a sabotaged model.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context

from services import protocol
from services.blocking import serve_blocking
from services.config import Settings
from services.servers.eventloop import AsyncioServer
from services.servers.greenlets import GeventServer
from services.servers.pool import PoolServer
from services.servers.threaded import ThreadedServer
from services.session import Session

CAPPED_SESSIONS = 100
UNSIZED_WORKERS = 8
UNSIZED_DB_POOL = 20
YIELD_EVERY_ROUNDS = 1000
_burn = protocol.burn_cpu  # the real /work, before any sabotage replaces protocol.burn_cpu


class LockedThreadsServer(ThreadedServer):
    """A thread per connection whose requests all take one lock: one request at a time."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        lock, answer = threading.Lock(), protocol.answer

        def locked(line: bytes, database=None) -> protocol.Answer:
            with lock:
                return answer(line, database)

        protocol.answer = locked  # read by every session loop when it starts


def burn_in_worker(rounds: int) -> int:
    """The real /work, in a worker process."""
    return _burn(rounds)


class WorkInProcessesServer(ThreadedServer):
    """A thread per connection whose /work runs in two worker processes: past the GIL."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        workers = ProcessPoolExecutor(2, mp_context=get_context("forkserver"))
        protocol.burn_cpu = lambda rounds: workers.submit(burn_in_worker, rounds).result()


class ThreadsForProcessesServer(PoolServer):
    """The pool with thread workers, whatever --executor says."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(replace(settings, executor="thread"))


class OneCpuAsyncioServer(AsyncioServer):
    """asyncio that pins itself (each of its --processes workers) to the lowest CPU it may use."""

    def __init__(self, settings: Settings) -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        super().__init__(settings)


class UnsizedPoolServer(PoolServer):
    """The pool with UNSIZED_WORKERS workers, whatever --workers says."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(replace(settings, workers=UNSIZED_WORKERS))


class CappedThreadsServer(ThreadedServer):
    """A thread per connection for the first CAPPED_SESSIONS at a time; the others wait."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.slots = threading.BoundedSemaphore(CAPPED_SESSIONS)

    def spawn_session(self, session: Session) -> None:
        """Start the connection's thread only once a slot is free (in its own waiter)."""
        threading.Thread(target=self._when_free, args=(session,), daemon=True).start()

    def _when_free(self, session: Session) -> None:
        with self.slots:
            serve_blocking(
                session, self.stats, self.settings.metrics, self.database, None, self.turns
            )


class YieldingWorkServer(GeventServer):
    """gevent whose /work yields to the hub every YIELD_EVERY_ROUNDS rounds."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        import gevent

        def yielding(rounds: int) -> int:
            total = 0
            for start in range(0, rounds, YIELD_EVERY_ROUNDS):
                total += _burn(min(YIELD_EVERY_ROUNDS, rounds - start))
                gevent.sleep(0)
            return total

        protocol.burn_cpu = yielding


class OneDatabaseConnectionServer(ThreadedServer):
    """A thread per connection with a database pool of one, whatever --db-pool says."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(replace(settings, db_pool=1))


class UnsizedDatabasePoolServer(ThreadedServer):
    """A thread per connection with a database pool of UNSIZED_DB_POOL, whatever --db-pool says."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(replace(settings, db_pool=UNSIZED_DB_POOL))


class CooperativeBlockingServer(GeventServer):
    """gevent whose `--db-driver blocking` is the cooperative driver."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(replace(settings, db_driver="default"))


def serve_from_a_child() -> None:
    """Fork before anything else: the child serves, this process only waits for it (and
    passes on SIGTERM and SIGINT), so SIGSTOP to this process stalls nothing."""
    child = os.fork()
    if child == 0:
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: os.kill(child, number))
    _, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status))

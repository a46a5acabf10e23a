"""The pool's executor lifecycle: build, warm up, record the workers, replace a broken one, end.

The reactor (`pool.py`) only submits batches; when a future fails with a broken executor, or a
worker's sentinel says it exited, it calls `WorkerPool.replace`. Everything about worker
processes lives here, and this is the one module that reads `ProcessPoolExecutor`'s private
state, in one delimited adapter section below: `_processes` (checked at every build; without
it, a warning, `arena_adapter_fallback{adapter="executor-processes"}` at 1, and the pids the
warm-up tasks report instead) and `_executor_manager_thread` (joined when present).

A `ProcessPoolExecutor` whose worker died (SIGKILL, the OOM killer) is broken for good: every
later `submit` raises `BrokenProcessPool`. So a new executor must be built while the reactor, the
metrics thread and the old executor's threads run. Three ways to fork its workers were weighed:

- `fork` from the reactor thread. CPython re-initialises its own locks in the child (the GIL,
  the import lock, logging's at-fork hooks), but the child also inherits every descriptor: each
  client socket, the listener, the epoll instance. A worker holding a copy of a client's socket
  keeps that TCP connection open after the reactor closed it, so a client that sent `/quit`
  never sees EOF; closing them in the child races with the metrics thread's sockets.
- A spawner process forked at start-up that forks workers on request: sound, but the
  descriptor passing and the pickling would be ours to write and test.
- multiprocessing's `forkserver` (chosen): that same spawner, in the standard library. The
  helper is started by fork+exec at start-up, single-threaded, holding no lock and no socket of
  ours; every worker, first or replacement, is forked from it and receives only its pipes. All
  executors are built the same way, before threads exist or long after. Measured on the 2-core
  machine (2 workers, CPython 3.11): the helper starts in 0.1 s (0.4 s until the first two
  workers answer, as it imports its preload first) and holds 18 MB RSS, 3 MB of it its own;
  multiprocessing's resource tracker comes with it (13 MB RSS, 7 MB own). Replacing a broken
  executor (kill the survivors, fork and warm up two workers) took 0.08 s; a new client was
  answered 0.08 s after a worker's SIGKILL on an idle server, 0.4-0.7 s under 100 busy clients.

What the forkserver changes, and how it is handled:
- A process-group SIGTERM (a terminal, `kill -TERM -PGID`) reaches the helper too, and its death
  kills the workers and breaks the executor. It is started with SIGTERM ignored (ignored signals
  stay ignored across exec), so such a SIGTERM only drains the server, as for the other models.
  SIGINT (Ctrl-C) the helper ignores by itself.
- The workers are the helper's children, not the server's: PR_SET_PDEATHSIG fires when the
  helper exits, which it does as soon as the server's end of its "alive" pipe closes (even when
  the server is SIGKILLed). So workers still die with the server.
- Exit statuses reach us through the helper (`Process.exitcode`): -9 for SIGKILL.

Workers ignore SIGINT and SIGTERM (the server drains them); after the grace period `end()` sends
them SIGKILL by their recorded pids and waits until they are gone (`shutdown()` has already set
`_processes` to None by then, so it cannot be the source of pids).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

from services.adapters import Adapters
from services.database import DatabaseSettings, start_worker_database

PR_SET_PDEATHSIG = 1  # prctl(2): signal a worker when its parent (the forkserver) dies
# Imported once in the forkserver, so a new worker starts with them loaded.
FORKSERVER_PRELOAD = ["services.protocol", "services.database", "services.servers.executors"]
WARM_UP_PAUSE = 0.05  # each warm-up task holds its worker this long, so every worker gets one
WARM_UP_ROUNDS = 3
WARM_UP_TIMEOUT = 10.0  # a fresh worker answers in milliseconds; this long means it cannot start
REAP_TIMEOUT = 2.0  # for a SIGKILLed worker to be reaped (it cannot ignore SIGKILL)


def prepare_worker(database: DatabaseSettings | None = None) -> None:
    """Worker processes ignore SIGINT/SIGTERM (the server drains them) and die with their parent.

    With `database`, the worker opens its own `/db` pool: a connection never crosses a fork.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the executor still exits when its call queue breaks
    if database is not None:
        start_worker_database(database)


def report_pid(pause: float) -> int:
    """A warm-up task: hold a worker for `pause` seconds and return its pid."""
    time.sleep(pause)
    return os.getpid()


def describe_exit(exitcode: int | None) -> str:
    """How a process ended, from `Process.exitcode` (negative: the signal that killed it)."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def is_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (read from /proc, so any process works)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def start_forkserver() -> BaseContext:
    """Start the forkserver helper now (with SIGTERM ignored) and return its context."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    # signal.signal works only in the main thread; elsewhere the helper keeps default SIGTERM.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if in_main else None
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return context


@dataclass
class Worker:
    """One worker process: its pid, and its Process object when the executor exposes it."""

    pid: int
    process: BaseProcess | None


# -- adapter: ProcessPoolExecutor's private state ---------------------------------------------
PROCESSES_ADAPTER = "executor-processes"


def executor_processes(executor: object) -> dict[int, BaseProcess] | None:
    """The executor's worker processes by pid (its private `_processes`), or None if not there."""
    processes = getattr(executor, "_processes", None)
    if isinstance(processes, dict) and all(
        isinstance(pid, int) and isinstance(process, BaseProcess)
        for pid, process in processes.items()
    ):
        return processes
    return None


def manager_thread(executor: object) -> threading.Thread | None:
    """The executor's manager thread (private `_executor_manager_thread`), if it has one."""
    manager = getattr(executor, "_executor_manager_thread", None)
    return manager if isinstance(manager, threading.Thread) else None


def recorded_workers(
    executor: object, pids: set[int], adapters: Adapters, log: logging.Logger
) -> list[Worker]:
    """The started workers, with their Process objects when `_processes` holds every one.

    Without them (a Python whose executor keeps its processes elsewhere) the adapter falls back
    loudly: the pids from the warm-up, no sentinels, so a worker's death is noticed only by the
    requests it fails and its exit status is unknown.
    """
    processes = executor_processes(executor)
    if processes is None or not pids <= set(processes):
        adapters.fell_back(
            PROCESSES_ADAPTER,
            "ProcessPoolExecutor._processes is missing or unexpected in this Python: worker "
            "deaths are noticed only by failed requests and their exit status is unknown",
            log,
        )
        return [Worker(pid, None) for pid in sorted(pids)]
    adapters.works(PROCESSES_ADAPTER)
    return [Worker(pid, processes[pid]) for pid in sorted(processes)]


# -- the pool ---------------------------------------------------------------------------------


class WorkerPool:
    """An executor of `size` workers (processes or threads) that is replaced when it breaks."""

    def __init__(
        self,
        kind: str,
        size: int,
        log: logging.Logger,
        adapters: Adapters | None = None,
        database: DatabaseSettings | None = None,
    ) -> None:
        self.kind = kind
        self.database = database  # each process worker opens its own `/db` pool from these
        self.size = size
        self.log = log
        self.adapters = adapters or Adapters()
        self.generation = 0  # bumped by every replacement; a failure of an older one is stale
        self.restarts = 0
        self.cpu_lock = threading.Lock()  # the scrape and a replacement both touch the CPU sums
        self.retired_cpu = 0.0  # CPU seconds of replaced workers, so the counter never drops
        self.last_cpu: dict[int, float] = {}
        self.context = start_forkserver() if kind == "process" else None
        self.executor, self.workers = self.build()

    @property
    def pids(self) -> list[int]:
        """Pids of the current worker processes (empty for thread workers)."""
        return [worker.pid for worker in self.workers]

    def sentinels(self) -> list[int]:
        """Descriptors that become readable when a current worker process exits."""
        return [worker.process.sentinel for worker in self.workers if worker.process is not None]

    def build(self) -> tuple[Executor, list[Worker]]:
        """A new executor with every worker started; raises when that is not possible."""
        if self.kind != "process":
            return ThreadPoolExecutor(self.size, thread_name_prefix="worker"), []
        executor = ProcessPoolExecutor(
            self.size,
            mp_context=self.context,
            initializer=prepare_worker,
            initargs=(self.database,),
        )
        try:
            return executor, self.warm_up(executor)
        except BaseException:
            started = executor_processes(executor) or {}
            self.kill([Worker(pid, None) for pid in started])
            executor.shutdown(wait=False, cancel_futures=True)
            raise

    def warm_up(self, executor: ProcessPoolExecutor) -> list[Worker]:
        """Start every worker (the executor starts one per task while none is idle); record them."""
        pids: set[int] = set()
        for _ in range(WARM_UP_ROUNDS):
            futures = [executor.submit(report_pid, WARM_UP_PAUSE) for _ in range(self.size)]
            deadline = time.monotonic() + WARM_UP_TIMEOUT
            while not_done := wait(futures, timeout=0.05).not_done:
                # Out of threads, the manager thread dies and these futures never finish.
                manager = manager_thread(executor)
                if manager is not None and not manager.is_alive():
                    raise RuntimeError("the executor's manager thread died while starting")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(not_done)} workers did not start")
            pids.update(future.result() for future in futures)
            if len(pids) >= self.size:
                break
        return recorded_workers(executor, pids, self.adapters, self.log)

    def replace(self, generation: int) -> bool:
        """Replace the executor if it is still the broken `generation` (False: already done).

        Raises when no new executor can be built; the reactor lets that end the process.
        """
        if generation != self.generation:
            return False
        started = time.monotonic()
        old, old_workers = self.executor, self.workers
        manager = manager_thread(old)
        dead = {worker.pid for worker in old_workers if not is_alive(worker.pid)}
        with self.cpu_lock:
            for worker in old_workers:
                # The dead worker's last scraped figure is the best left of it.
                seen = self.last_cpu.pop(worker.pid, 0.0)
                self.retired_cpu += max(seen, cpu_seconds(worker.pid) or 0.0)
        # The survivors ignore SIGTERM, and the old executor's manager thread waits for them.
        self.kill(old_workers)
        old.shutdown(wait=False, cancel_futures=True)
        if manager is not None:
            manager.join(REAP_TIMEOUT)  # it reaps the workers: their exit codes are set after
        self.reap(old_workers)
        if not dead and self.kind == "process":
            # Every worker was alive when we looked: the helper died (its children die with
            # it, and their status is lost: code 255), or the executor's pipes broke.
            self.log.error("the executor broke with no worker seen dead; replacing it")
        for worker in old_workers:
            exitcode = worker.process.exitcode if worker.process is not None else None
            if worker.pid in dead or self.kind != "process":
                self.log.error("worker process %d died: %s", worker.pid, describe_exit(exitcode))
            else:
                self.log.info(
                    "worker process %d of the broken executor ended (%s)",
                    worker.pid,
                    describe_exit(exitcode),
                )
        self.executor, self.workers = self.build()
        self.generation += 1
        self.restarts += 1
        self.log.warning(
            "executor replaced in %.3f s (restart %d): new workers %s",
            time.monotonic() - started,
            self.restarts,
            self.pids or self.kind,
        )
        return True

    def kill(self, workers: list[Worker]) -> None:
        """SIGKILL worker processes (they ignore SIGTERM); gone ones are skipped."""
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    def reap(self, workers: list[Worker], timeout: float = REAP_TIMEOUT) -> list[int]:
        """Wait until killed workers are reaped; returns the pids still alive after `timeout`."""
        deadline = time.monotonic() + timeout
        for worker in workers:
            if worker.process is not None:
                with contextlib.suppress(OSError, ValueError, AssertionError):
                    worker.process.join(max(0.0, deadline - time.monotonic()))
        while (alive := [w.pid for w in workers if is_alive(w.pid)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)
        return alive

    def end(self) -> None:
        """Shut the executor down; kill and reap its worker processes by their recorded pids."""
        manager = manager_thread(self.executor)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.kill(self.workers)
        alive = self.reap(self.workers)
        if alive:
            self.log.error("worker processes %s still alive after SIGKILL", alive)
        if manager is not None:
            # Once it is done, nothing holds the queues: their named semaphores are unlinked
            # now, instead of the resource tracker warning about "leaked" ones at exit.
            manager.join(REAP_TIMEOUT)
            del manager
            self.executor = ThreadPoolExecutor(1)  # no thread until something is submitted
            gc.collect()

    def cpu_seconds(self) -> float:
        """CPU time of every worker process this pool has run (0 for thread workers)."""
        with self.cpu_lock:
            for worker in self.workers:
                used = cpu_seconds(worker.pid)
                if used is not None:
                    self.last_cpu[worker.pid] = used
            return self.retired_cpu + sum(self.last_cpu.values())

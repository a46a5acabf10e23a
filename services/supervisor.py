"""`--processes N`: N worker processes of one model on one port, supervised like gunicorn's arbiter.

One process cannot use more than one core for Python code; real servers combine processes with
threads or coroutines (gunicorn's workers, `uvicorn --workers`). The supervisor runs N copies
of the chosen model (threaded, gevent or asyncio; the pool model already spreads its requests
over worker processes, `--workers`) and owns nothing but their lives and one `/metrics`:

- **One port for all: `SO_REUSEPORT`.** The supervisor reserves the port (a socket bound with
  `SO_REUSEPORT` that never listens) and each worker binds and listens on it with the same
  option; the kernel hands each new connection to one listener by a hash of its addresses, so
  connections spread evenly whatever each worker is busy with. With one inherited listening
  socket (gunicorn's way; `--listen-fd`) the worker that wakes first takes the connection, which
  depends on which worker is idle at that moment. Measured both ways
  (`python -m loadtest.bench.spread`, 1,000 connections, echo, 2026-12-08, docs/PROCESSES.md):
  over three runs the busiest of the workers held 1.01-1.10x an even share with SO_REUSEPORT
  and 1.00-1.50x with the inherited socket (threaded, 2 workers: 749/251 once; 4 workers:
  1.19-1.29x for every model), the requests following. SO_REUSEPORT is as even or more, and
  needs no descriptor passing, which lets every worker start fresh.
  Workers are whole `python -m services MODEL` processes started fresh (never forked from a
  process that already holds threads, sockets or gevent's hub).
- **Supervised.** A worker that dies is logged with its pid and how it ended, and replaced at
  once; a worker that dies again within `QUICK_DEATH` seconds of its start waits a doubling
  back-off first, and `MAX_QUICK_DEATHS` such deaths in a row end the server with exit code 1
  instead of a restart loop. Each worker gets `PR_SET_PDEATHSIG` = SIGKILL: if the supervisor is
  killed, no worker outlives it holding the port. SIGTERM/SIGINT: every worker drains for the
  grace period (its own `--grace`), then the supervisor exits 0.
- **One scrape.** `/metrics` scrapes every live worker's own `/metrics` (on 127.0.0.1, a free
  port each) and adds them up: counters and histograms summed, with the last values of the
  workers that died kept in, so a sum never goes down; gauges summed over the live workers only.
  The families a per-worker view explains (connections, event-loop blocking, threads,
  greenlets) are repeated with a `worker` label. prometheus_client's multiprocess mode is not
  used: it works for metric objects updated per request (a file write each), while the servers
  count in plain integers per connection and build their families at scrape time, which is what
  makes the hot path cheap (docs/METRICS.md); a scrape of the workers' own text keeps that.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from services.config import Settings

log = logging.getLogger("arena.supervisor")

PR_SET_PDEATHSIG = 1
START_TIMEOUT = 30.0  # seconds for a worker to print its ready line
QUICK_DEATH = 5.0  # a worker that dies sooner than this after its start died "quickly"
MAX_QUICK_DEATHS = 5  # quick deaths in a row that end the server (exit 1)
FIRST_BACKOFF = 0.25  # seconds before restarting a worker that died quickly; doubles
SCRAPE_TIMEOUT = 5.0
WORKER_READY = re.compile(rb"ready model=\S+ host=\S+ port=(\d+) metrics_port=(\d+)")
# Families shown per worker too (label worker="N"), besides their sum.
PER_WORKER = (
    "arena_connections_active",
    "arena_event_loop_blocked_seconds",
    "arena_threads",
    "arena_greenlets",
    "arena_asyncio_transports",
)
SUMMED_TYPES = ("counter", "histogram", "summary")
# Gauges that describe each process alike: the merge shows the largest, not a sum.
LARGEST = ("process_start_time_seconds", "process_max_fds", "python_info", "arena_adapter_fallback")
Key = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and sorted labels


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind host:port with SO_REUSEPORT without listening: the port is ours, the workers join it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reservation = socket.socket(family, socket.SOCK_STREAM)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind((host, port))
    except OSError:
        reservation.close()
        raise
    return reservation


def die_with_parent() -> None:
    """In a new worker (before exec): be SIGKILLed when the supervisor dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def describe(returncode: int) -> str:
    """How a worker ended, from its return code (negative: the signal that killed it)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


SPARE = -1  # the slot of the spare worker, until it takes a dead worker's slot
STANDBY_LINE = b"standby: built, waiting to serve"  # services/__main__.py prints it


@dataclass
class Worker:
    """One worker process: its slot, its process, where its /metrics is, when it started."""

    index: int
    proc: subprocess.Popen[bytes]
    started: float
    metrics_port: int = 0
    ready: threading.Event = field(default_factory=threading.Event)  # serving
    built: threading.Event = field(default_factory=threading.Event)  # a spare, imported
    last_scrape: list[Metric] = field(default_factory=list)


class Supervisor(Collector):
    """Starts, watches, replaces and stops the workers; its `collect` is the merged scrape."""

    def __init__(self, settings: Settings, worker_argv: Sequence[str]) -> None:
        self.settings = settings
        self.worker_argv = list(worker_argv)  # the command line, without --processes
        self.workers: dict[int, Worker] = {}
        self.lock = threading.Lock()
        self.restarts = 0
        self.quick_deaths = 0
        # Dead workers' counters and histograms by family, as last scraped.
        self.retired: dict[str, dict[Key, float]] = {}
        self.retired_types: dict[str, tuple[str, str]] = {}
        self.stopping = threading.Event()
        self.port = 0
        # A worker started ahead, imported and built but not listening: a dead worker's slot
        # is served again as soon as it is told to (a fresh gevent worker needs 0.6 s to
        # start on an idle machine, several under load).
        self.spare: Worker | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, port: int) -> None:
        """Start every worker on `port` and wait until each is ready (or raise RuntimeError).

        A worker that dies while starting is replaced as in `watch`, with the same bound.
        """
        self.port = port
        for index in range(self.settings.processes):
            self.spawn(index)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(worker.ready.is_set() for worker in self.workers.values()):
            for worker in list(self.workers.values()):
                code = worker.proc.poll()
                dead = code is not None and not worker.ready.is_set()
                if dead and not self.replace(worker, code or 0):
                    raise RuntimeError("the workers keep dying as they start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.02)
        self.spare = self.spawn(SPARE)

    def spawn(self, index: int) -> Worker:
        """Start the worker for slot `index`, or the spare (its log goes through ours)."""
        env = {**os.environ, "ARENA_WORKER_INDEX": str(index), "PYTHONUNBUFFERED": "1"}
        if index == SPARE:
            env["ARENA_STANDBY"] = "1"
        # Flags after the user's win: the reserved port, a free metrics port, one process.
        overrides = ["--port", str(self.port), "--metrics-port", "0", "--processes", "1"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "services", *self.worker_argv, *overrides, "--reuse-port"],
            env=env,
            stdin=subprocess.PIPE if index == SPARE else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        worker = Worker(index, proc, time.monotonic())
        if index != SPARE:
            with self.lock:
                self.workers[index] = worker
        threading.Thread(target=self.pump, args=(worker,), daemon=True).start()
        return worker

    def activate(self, spare: Worker, index: int) -> None:
        """Give the spare a dead worker's slot and tell it to serve."""
        assert spare.proc.stdin is not None
        spare.index = index
        spare.started = time.monotonic()
        with self.lock:
            self.workers[index] = spare
        spare.proc.stdin.write(b"serve\n")
        spare.proc.stdin.close()

    def pump(self, worker: Worker) -> None:
        """Copy a worker's log lines to ours, noting its ready line's /metrics port."""
        assert worker.proc.stderr is not None
        for line in worker.proc.stderr:
            if line.startswith(STANDBY_LINE):
                worker.built.set()
                continue
            ready = WORKER_READY.search(line)
            if ready and not worker.ready.is_set():
                worker.metrics_port = int(ready[2])
                worker.ready.set()
                line = f"worker {worker.index} (pid {worker.proc.pid}) serving\n".encode()
            name = "spare" if worker.index == SPARE else f"worker {worker.index}"
            sys.stderr.buffer.write(f"[{name}] ".encode() + line)
            sys.stderr.buffer.flush()

    def watch(self) -> int:
        """Replace workers that die until stopped; the exit code (1: workers keep dying)."""
        while not self.stopping.wait(0.02):
            for worker in list(self.workers.values()):
                code = worker.proc.poll()
                if code is None or self.stopping.is_set():
                    continue
                if not self.replace(worker, code):
                    return 1
            spare = self.spare
            if spare is not None and (code := spare.proc.poll()) is not None:
                self.spare = None
                if not self.replace(spare, code):
                    return 1
        return 0

    def replace(self, worker: Worker, code: int) -> bool:
        """Log a dead worker and start its successor; False when workers keep dying."""
        lived = time.monotonic() - worker.started
        log.error(
            "%s (pid %d) %s after %.1f s; replacing it",
            "the spare worker" if worker.index == SPARE else f"worker {worker.index}",
            worker.proc.pid,
            describe(code),
            lived,
        )
        self.retire(worker)
        self.quick_deaths = self.quick_deaths + 1 if lived < QUICK_DEATH else 0
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            log.critical(
                "%d workers in a row died within %.0f s of their start; exiting with code 1",
                self.quick_deaths,
                QUICK_DEATH,
            )
            return False
        spare = self.spare
        if worker.index != SPARE and spare is not None and spare.built.is_set():
            self.spare = None
            self.activate(spare, worker.index)  # serving again within milliseconds
            self.restarts += 1
            worker = spare  # the next spare is started below, from the same start line
        elif worker.index != SPARE:
            self.restarts += 1
        if self.quick_deaths:
            self.stopping.wait(FIRST_BACKOFF * 2 ** (self.quick_deaths - 1))
            if self.stopping.is_set():
                return True
        if worker.index == SPARE or worker is spare:
            self.spare = self.spawn(SPARE)
        else:
            self.spawn(worker.index)
        return True

    def stop(self, grace: float) -> bool:
        """SIGTERM every worker, wait for their drain, SIGKILL what is left; True if all ended 0."""
        self.stopping.set()
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.proc.kill()  # never served: nothing to drain
            spare.proc.wait()
        workers = []
        for worker in list(self.workers.values()):
            if worker.ready.is_set():
                workers.append(worker)
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)
            else:  # still starting: it holds no connection, nothing to drain
                worker.proc.kill()
                worker.proc.wait()
        deadline = time.monotonic() + grace + START_TIMEOUT / 6
        clean = True
        for worker in workers:
            try:
                code = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                code = worker.proc.wait()
                log.error("worker %d (pid %d) did not stop in time", worker.index, worker.proc.pid)
            if code != 0:
                log.error("worker %d (pid %d) %s", worker.index, worker.proc.pid, describe(code))
            clean = clean and code == 0
        return clean

    # -- the merged scrape ------------------------------------------------------------------
    def scrape(self, worker: Worker) -> list[Metric]:
        """A live worker's families (remembered, so its counters outlive it)."""
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # every address: the loopback one is among them
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{worker.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
            text = response.read().decode()
        families = list(text_string_to_metric_families(text))
        worker.last_scrape = families
        return families

    def scrape_or_none(self, worker: Worker) -> list[Metric] | None:
        """A worker's families, or None when it cannot answer (dying: `watch` notices it)."""
        try:
            return self.scrape(worker)
        except OSError:
            return None

    def retire(self, worker: Worker) -> None:
        """Keep a dead worker's last counters and histograms in the sums (they never go down)."""
        with self.lock:
            if self.workers.get(worker.index) is worker:
                del self.workers[worker.index]
            for family in worker.last_scrape:
                if family.type not in SUMMED_TYPES:
                    continue
                self.retired_types[family.name] = (family.type, family.documentation)
                into = self.retired.setdefault(family.name, {})
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    into[key] = into.get(key, 0.0) + sample.value

    def collect(self) -> Iterator[Metric]:
        """Every worker's families summed, the per-worker views, and the supervisor's own."""
        kinds: dict[str, tuple[str, str]] = dict(self.retired_types)
        per_worker: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        info: dict[str, str] = {}
        with self.lock:
            live = [w for w in self.workers.values() if w.ready.is_set()]
            sums = {name: dict(samples) for name, samples in self.retired.items()}
        # Every worker at once: a scrape costs the slowest worker's, not the sum of them all.
        with ThreadPoolExecutor(max(1, len(live))) as scrapers:
            scraped = list(zip(live, scrapers.map(self.scrape_or_none, live), strict=True))
        for worker, families in scraped:
            for family in families or ():
                if family.name in ("arena_server", "arena_server_info"):
                    info = dict(family.samples[0].labels)
                    continue
                kinds.setdefault(family.name, (family.type, family.documentation))
                into = sums.setdefault(family.name, {})
                merge = max if family.name in LARGEST else float.__add__
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    into[key] = merge(into[key], sample.value) if key in into else sample.value
                    if family.name in PER_WORKER:
                        labels = {
                            **sample.labels,
                            "worker": str(worker.index),
                            "pid": str(worker.proc.pid),
                        }
                        per_worker.setdefault(family.name, []).append(
                            (sample.name, labels, sample.value)
                        )
        yield from self.families(sums, kinds, per_worker, info, len(live))

    def families(
        self,
        sums: dict[str, dict[Key, float]],
        kinds: dict[str, tuple[str, str]],
        per_worker: dict[str, list[tuple[str, dict[str, str], float]]],
        info: dict[str, str],
        live: int,
    ) -> Iterable[Metric]:
        """The merged families as metric objects."""
        if info:
            family = Metric("arena_server", "Which concurrency model this server runs", "info")
            labels = {**info, "processes": str(self.settings.processes)}
            family.add_sample("arena_server_info", labels, 1.0)
            yield family
        for name, summed in sums.items():
            kind, documentation = kinds[name]
            family = Metric(name, documentation, kind)
            for (sample_name, pairs), value in summed.items():
                family.add_sample(sample_name, dict(pairs), value)
            yield family
        for name, by_worker in per_worker.items():
            family = Metric(
                f"arena_worker_{name.removeprefix('arena_')}", f"{name} by worker", kinds[name][0]
            )
            for sample_name, worker_labels, value in by_worker:
                family.add_sample(
                    f"arena_worker_{sample_name.removeprefix('arena_')}", worker_labels, value
                )
            yield family
        yield GaugeMetricFamily(
            "arena_supervisor_workers", "Worker processes serving now", value=live
        )
        spare = self.spare
        yield GaugeMetricFamily(
            "arena_supervisor_spare_ready",
            "1 while a spare worker is built and waiting to take a dead worker's slot",
            value=1.0 if spare is not None and spare.built.is_set() else 0.0,
        )
        restarts = Metric(
            "arena_supervisor_worker_restarts", "Workers replaced after they died", "counter"
        )
        restarts.add_sample("arena_supervisor_worker_restarts_total", {}, float(self.restarts))
        yield restarts


def worker_arguments(argv: Sequence[str]) -> list[str]:
    """The command line without --processes (the workers read ARENA_PROCESSES=1)."""
    arguments, skip = [], False
    for argument in argv:
        if skip:
            skip = False
            continue
        if argument == "--processes":
            skip = True
            continue
        if argument.startswith("--processes="):
            continue
        arguments.append(argument)
    return arguments


def serve_supervised(settings: Settings, argv: Sequence[str]) -> int:
    """`python -m services MODEL --processes N`: run the supervisor until SIGTERM or SIGINT."""
    from services.metrics import serve_metrics

    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: requested.set())
    try:
        reservation = reserve_port(settings.host, settings.port)
    except OSError as error:
        print(
            f"python -m services: error: cannot listen on {settings.host}:{settings.port}: "
            f"{error.strerror} (choose another with --port or ARENA_PORT)",
            file=sys.stderr,
        )
        return 2
    port = reservation.getsockname()[1]
    supervisor = Supervisor(settings, worker_arguments(argv))
    try:
        supervisor.start(port)
    except RuntimeError as error:
        log.critical("%s; exiting with code 1", error)
        supervisor.stop(0)
        return 1
    metrics_port = 0
    if settings.metrics:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        registry.register(supervisor)
        try:
            metrics_port = serve_metrics(registry, settings.host, settings.metrics_port)
        except OSError as error:
            supervisor.stop(0)
            print(
                f"python -m services: error: cannot serve metrics on {settings.host}:"
                f"{settings.metrics_port}: {error.strerror}",
                file=sys.stderr,
            )
            return 2
    outcome: list[int] = []

    def watch() -> None:
        outcome.append(supervisor.watch())
        requested.set()

    threading.Thread(target=watch, name="supervise", daemon=True).start()
    log.info(
        "ready model=%s host=%s port=%d metrics_port=%d max_connections=%d idle_timeout=%s "
        "processes=%d workers=%s",
        settings.model,
        settings.host,
        port,
        metrics_port,
        settings.max_connections,
        settings.idle_timeout,
        settings.processes,
        ",".join(str(w.proc.pid) for w in supervisor.workers.values()),
    )
    while not requested.wait(0.5):  # a timeout keeps the main thread handling signals
        pass
    if outcome and outcome[0] != 0:
        supervisor.stop(0)
        return outcome[0]
    log.info("stopping: every worker answers received requests for up to %ss", settings.grace)
    clean = supervisor.stop(settings.grace)
    reservation.close()
    log.info("stopped")
    return 0 if clean else 1

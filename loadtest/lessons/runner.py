"""Measure each lesson against each model alone, with the same CPU allotment.

Every measurement starts one server alone, pinned to the same core(s) whatever the model (its
pool workers inherit the pinning), runs the C load generator of the benchmark pinned to the
other core, and stops the server: the comparison measures the models, not how the scheduler
split a machine between them. The `cores` lesson gives the server both cores; the load
generator then shares them, and its own CPU is measured and reported.

The database lessons' servers get the run's PostgreSQL in their environment (ARENA_DB_URL,
ARENA_DB_PASSWORD: `Rig.database_env`) and their pool size and driver on the command line.

The pieces are the benchmark's (`loadtest.bench.harness`, `loadgen`, `scenarios`); this module
only says what each lesson runs and turns the measurements into the figures `checks` decides on.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench import harness, loadgen
from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import checks
from loadtest.tools import procs

METRICS_PORT = re.compile(r"metrics_port=(\d+)")
BLOCKED_METRIC = "arena_event_loop_blocked_seconds_total"
INFO_METRIC = "arena_server_info"
CPYTHON_SWITCH = "switch 5 ms"  # the variant of the threaded server at CPython's interval
# Two-core runs: CPU time others (the load generator excluded) took on the server's cores above
# this many cores makes the figure noisy.
NOISY_OTHER_CORES = 0.3

IO_SLEEP_MS, IO_CONNECTIONS, IO_POOL_WORKERS = 20, 100, 2
CPU_CONNECTIONS = 100
POOL_SLEEP_MS, POOL_CONNECTIONS, POOL_SIZES = 50, 20, (2, 4)
CORES_POOL_WORKERS = 2
MANY_CONNECTIONS = 1000
BLOCKED_CONNECTIONS, BLOCKED_WORK_WEIGHT, BLOCKED_ECHO_WEIGHT = 4, 2, 98
# Lessons whose rates are low (pool-bound: 40 req/s) or whose p99 needs samples (blocked-loop)
# measure at least this long, even with --quick.
MIN_WINDOW_S = 2.0
# many-clients: the threaded server takes 1-2.4 s just to accept 1000 connections (see
# services/servers/threaded.py); a window of 5 s asks "is everyone served", not "how fast".
MANY_WINDOW_S = 5.0
# closed-loop: the server stopped for STALL_S inside a STALL_WINDOW_S window, STALL_AT of the way
# in; the open loop offers STALL_RATE requests/s over STALL_CONNECTIONS connections.
STALL_CONNECTIONS, STALL_RATE, STALL_S, STALL_WINDOW_S, STALL_AT = 10, 1000, 0.5, 3.0, 0.4
OPEN_LOOP, CLOSED_LOOP = "open loop", "closed loop"
# The database lessons: every query waits DB_MS in PostgreSQL (pg_sleep). db-wait: DB_CONNECTIONS
# connections against a database pool of DB_POOL per server; db-pool-bound: one model at each of
# DB_POOL_SIZES on POOL_BOUND_CONNECTIONS connections (at a pool of 5 a query queues about
# 50 / 5 x 20 ms = 200 ms for a connection, well inside the 2 s --db-timeout, past which it would
# answer ERR backend-busy); undetected-io: UNDETECTED_CONNECTIONS connections sending /db and echo
# half and half, per --db-driver, and the same mix with /work of DB_MS in place of /db.
DB_MS, DB_CONNECTIONS, DB_POOL, DB_POOL_SIZES = 20, 100, 20, (5, 10)
POOL_BOUND_CONNECTIONS = 50
UNDETECTED_CONNECTIONS, UNDETECTED_DB_WEIGHT, UNDETECTED_ECHO_WEIGHT = 40, 1, 1
DRIVERS = (checks.BLOCKING, checks.BLOCKING_FIXED, checks.DEFAULT_DRIVER)
# asyncio's blocking-fixed hands each query to the loop's default executor, whose threads bound
# it (services/servers/eventloop.py); gevent's (psycogreen) waits through the hub: only the
# database pool bounds it.
HELPER_THREADS_MODEL = "asyncio"


@dataclass(frozen=True)
class Pace:
    """How long and how often each measurement runs."""

    quick: bool
    duration: float  # measured seconds per repetition
    warmup: float
    reps: int  # figures are medians of the repetitions
    noisy_retries: int  # a repetition measured while others used the server's CPU is redone


QUICK = Pace(True, 1.0, 0.5, 1, 0)
FULL = Pace(False, 3.0, 0.5, 3, 1)


@dataclass(frozen=True)
class Work:
    """/work sizes for this machine, calibrated in this process (same interpreter as servers)."""

    rounds_1ms: int
    rounds_100ms: int
    round_ns: float

    @property
    def ms_1(self) -> float:
        """The real length of the ~1 ms /work here."""
        return self.rounds_1ms * self.round_ns / 1e6

    @property
    def ms_100(self) -> float:
        """The real length of the ~100 ms /work here."""
        return self.rounds_100ms * self.round_ns / 1e6


def calibrate(probes: int = 15, rounds: int = 20_000) -> Work:
    """Rounds of /work for ~1 ms and ~100 ms of CPU here.

    Timed in CPU time of this thread, not wall time, and the quickest probe kept: on a busy
    machine a wall-clock calibration counts the time others ran, makes /work look slower than
    the servers then find it, and a model would seem to beat one core's worth.
    """
    from services.protocol import burn_cpu

    best = float("inf")
    for _ in range(probes):
        start = time.thread_time_ns()
        burn_cpu(rounds)
        best = min(best, time.thread_time_ns() - start)
    round_ns = best / rounds
    return Work(max(1, round(1e6 / round_ns)), max(1, round(1e8 / round_ns)), round_ns)


@dataclass(frozen=True)
class Run:
    """One server, one load, measured `reps` times."""

    model: str
    variant: str  # "" or what differs from the model's other run ("workers 4", "alone")
    server_args: tuple[str, ...]
    scenario: Scenario
    two_cores: bool = False
    scrape: bool = False  # read /metrics before and after each repetition
    min_window: float = 0.0
    rate: float = 0.0  # open loop at this many requests/s (0: closed loop)
    stall_s: float = 0.0  # stop the server (SIGSTOP) this long inside the window
    database: bool = False  # the server queries the run's PostgreSQL (Rig.database_env)

    @property
    def label(self) -> str:
        """`pool (workers 4)`."""
        return f"{self.model} ({self.variant})" if self.variant else self.model


@dataclass
class Plan:
    """What one lesson runs, with the parameters its check and report need."""

    lesson: str
    setup: dict
    runs: list[Run] = field(default_factory=list)

    @property
    def needs_database(self) -> bool:
        """Does any of its servers query PostgreSQL?"""
        return self.lesson in checks.DATABASE_IDS


def _pool(workers: int) -> tuple[str, ...]:
    return ("--executor", "process", "--workers", str(workers))


def _args(model: str, pool_workers: int) -> tuple[str, ...]:
    return _pool(pool_workers) if model == checks.POOL else ()


def _db_args(pool: int, driver: str = checks.DEFAULT_DRIVER) -> tuple[str, ...]:
    """The database settings of a run, whatever ARENA_DB_POOL / ARENA_DB_DRIVER say."""
    return ("--db-pool", str(pool), "--db-driver", driver)


def helper_threads() -> int:
    """The threads of asyncio's default executor in a server here (blocking-fixed's bound)."""
    from services.servers.eventloop import DEFAULT_EXECUTOR_THREADS

    return DEFAULT_EXECUTOR_THREADS


def _work_1ms(
    lesson: str, title: str, work: Work, pool_workers: int, cores: int
) -> tuple[dict[str, Any], Scenario]:
    """The computing lessons' load, /work of about 1 ms on CPU_CONNECTIONS connections on
    `cores` cores: the lesson's setup and its scenario."""
    setup = {
        "connections": CPU_CONNECTIONS,
        "work_ms": work.ms_1,
        "work_rounds": work.rounds_1ms,
        "pool_workers": pool_workers,
        "cores": cores,
    }
    return setup, Scenario(lesson, title, CPU_CONNECTIONS, (bench_scenarios.work(work.rounds_1ms),))


Planned = tuple[dict[str, Any], list[Run]]  # a lesson's setup and its runs


def _plan_io_wait(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """io-wait: /sleep on IO_CONNECTIONS connections, the pool with IO_POOL_WORKERS workers."""
    setup = {
        "connections": IO_CONNECTIONS,
        "sleep_ms": IO_SLEEP_MS,
        "pool_workers": IO_POOL_WORKERS,
        "cores": 1,
    }
    scenario = Scenario(
        lesson, f"/sleep {IO_SLEEP_MS}", IO_CONNECTIONS, (bench_scenarios.sleep(IO_SLEEP_MS),)
    )
    return setup, [Run(m, "", _args(m, IO_POOL_WORKERS), scenario) for m in models]


def _plan_cpu_work(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """cpu-work: /work of about 1 ms on one core."""
    setup, scenario = _work_1ms(lesson, "/work ~1 ms", work, IO_POOL_WORKERS, cores=1)
    return setup, [Run(m, "", _args(m, IO_POOL_WORKERS), scenario) for m in models]


def _plan_pool_bound(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """pool-bound: long /sleep on few connections, the pool once per size of POOL_SIZES."""
    setup = {
        "connections": POOL_CONNECTIONS,
        "sleep_ms": POOL_SLEEP_MS,
        "pool_workers": list(POOL_SIZES),
        "cores": 1,
    }
    scenario = Scenario(
        lesson,
        f"/sleep {POOL_SLEEP_MS}",
        POOL_CONNECTIONS,
        (bench_scenarios.sleep(POOL_SLEEP_MS),),
    )
    runs = [
        Run(
            m,
            f"workers {size}" if size else "",
            _args(m, size),
            scenario,
            min_window=MIN_WINDOW_S,
        )
        for m in models
        for size in (POOL_SIZES if m == checks.POOL else (0,))
    ]
    return setup, runs


def _plan_cores(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """cores: /work of about 1 ms, server and load generator on every CPU."""
    setup, scenario = _work_1ms(
        lesson, "/work ~1 ms, all cores", work, CORES_POOL_WORKERS, cores=cpus
    )
    setup["cpus"] = cpus
    runs = [Run(m, "", _args(m, CORES_POOL_WORKERS), scenario, two_cores=True) for m in models]
    return setup, runs


def _plan_many_clients(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """many-clients: echo on MANY_CONNECTIONS connections over a long window."""
    setup: dict[str, Any] = {"connections": MANY_CONNECTIONS, "echo_bytes": 64, "cores": 1}
    scenario = Scenario(
        lesson,
        f"echo 64 B, {MANY_CONNECTIONS} conns",
        MANY_CONNECTIONS,
        (bench_scenarios.echo(64),),
    )
    return setup, [Run(m, "", _args(m, cpus), scenario, min_window=MANY_WINDOW_S) for m in models]


def _switch_variants(model: str) -> list[tuple[str, tuple[str, ...]]]:
    """blocked-loop: (variant, extra arguments) per GIL switch interval a model is measured at.

    The threaded server may set a longer switch interval than CPython's (for fairness between
    many threads): measured at both, so the trade-off shows.
    """
    variants: list[tuple[str, tuple[str, ...]]] = [("", ())]
    own = server_switch_interval() if model == checks.OS_THREADS else None
    if own is not None and abs(own - checks.CPYTHON_SWITCH_INTERVAL) > 1e-9:
        variants.append(
            (CPYTHON_SWITCH, ("--switch-interval", f"{checks.CPYTHON_SWITCH_INTERVAL:g}"))
        )
    return variants


def _plan_blocked_loop(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """blocked-loop: echo with a little long /work mixed in, and echo alone, /metrics scraped."""
    share = BLOCKED_WORK_WEIGHT / (BLOCKED_WORK_WEIGHT + BLOCKED_ECHO_WEIGHT)
    setup = {
        "connections": BLOCKED_CONNECTIONS,
        "work_ms": work.ms_100,
        "work_rounds": work.rounds_100ms,
        "work_share": share,
        "pool_workers": IO_POOL_WORKERS,
        "cores": 1,
    }
    mix = Scenario(
        lesson,
        "echo + 2 % /work ~100 ms",
        BLOCKED_CONNECTIONS,
        (
            bench_scenarios.echo(64, BLOCKED_ECHO_WEIGHT),
            bench_scenarios.work(work.rounds_100ms, BLOCKED_WORK_WEIGHT),
        ),
    )
    alone = Scenario(lesson, "echo only", BLOCKED_CONNECTIONS, (bench_scenarios.echo(64),))
    runs = []
    for m in models:
        for name, extra in _switch_variants(m):
            args = (*_args(m, IO_POOL_WORKERS), *extra)
            runs += [
                Run(
                    m,
                    f"{name}, alone" if name else "alone",
                    args,
                    alone,
                    scrape=True,
                    min_window=MIN_WINDOW_S,
                ),
                Run(m, name, args, mix, scrape=True, min_window=MIN_WINDOW_S),
            ]
    return setup, runs


def _plan_closed_loop(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """closed-loop: the same stall inside an open loop's window and a closed loop's."""
    setup = {
        "connections": STALL_CONNECTIONS,
        "rate": STALL_RATE,
        "stall_ms": STALL_S * 1000,
        "echo_bytes": 64,
        "cores": 1,
    }
    scenario = Scenario(
        lesson, "echo 64 B, a stall", STALL_CONNECTIONS, (bench_scenarios.echo(64),)
    )
    runs = [
        Run(
            m,
            variant,
            _args(m, IO_POOL_WORKERS),
            scenario,
            min_window=STALL_WINDOW_S,
            rate=rate,
            stall_s=STALL_S,
        )
        for m in models
        for variant, rate in ((OPEN_LOOP, STALL_RATE), (CLOSED_LOOP, 0.0))
    ]
    return setup, runs


def _plan_db_wait(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """db-wait: /db on DB_CONNECTIONS connections, a database pool of DB_POOL per server."""
    setup = {
        "connections": DB_CONNECTIONS,
        "db_ms": DB_MS,
        "db_pool": DB_POOL,
        "pool_workers": IO_POOL_WORKERS,
        "cores": 1,
    }
    scenario = Scenario(lesson, f"/db {DB_MS}", DB_CONNECTIONS, (bench_scenarios.db(DB_MS),))
    runs = [
        Run(m, "", (*_args(m, IO_POOL_WORKERS), *_db_args(DB_POOL)), scenario, database=True)
        for m in models
    ]
    return setup, runs


def _plan_db_pool_bound(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """db-pool-bound: /db through one switching model, once per database pool size."""
    chosen = next(iter(checks.switching_models(models)), "")
    setup = {
        "connections": POOL_BOUND_CONNECTIONS,
        "db_ms": DB_MS,
        "db_pool": list(DB_POOL_SIZES),
        "db_model": chosen,
        "cores": 1,
    }
    scenario = Scenario(
        lesson, f"/db {DB_MS}", POOL_BOUND_CONNECTIONS, (bench_scenarios.db(DB_MS),)
    )
    runs = [
        Run(
            chosen,
            f"db pool {size}",
            _db_args(size),
            scenario,
            min_window=MIN_WINDOW_S,
            database=True,
        )
        for size in (DB_POOL_SIZES if chosen else ())
    ]
    return setup, runs


def _undetected_setup(loops: Sequence[str], work: Work) -> dict[str, Any]:
    """undetected-io's setup: the mix, the database pool, the helper threads, the /work size."""
    rounds = work.rounds_1ms * DB_MS
    return {
        "connections": UNDETECTED_CONNECTIONS,
        "db_ms": DB_MS,
        "db_pool": DB_POOL,
        "db_share": UNDETECTED_DB_WEIGHT / (UNDETECTED_DB_WEIGHT + UNDETECTED_ECHO_WEIGHT),
        "helper_threads": (
            {HELPER_THREADS_MODEL: helper_threads()} if HELPER_THREADS_MODEL in loops else {}
        ),
        "work_ms": rounds * work.round_ns / 1e6,
        "work_rounds": rounds,
        "cores": 1,
    }


def _plan_undetected_io(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Planned:
    """undetected-io: each event loop on /db and echo per --db-driver, then /work for /db."""
    loops = [m for m in checks.EVENT_LOOPS if m in models]
    setup = _undetected_setup(loops, work)
    echo = bench_scenarios.echo(64, UNDETECTED_ECHO_WEIGHT)
    mix = Scenario(
        lesson,
        f"/db {DB_MS} + echo",
        UNDETECTED_CONNECTIONS,
        (bench_scenarios.db(DB_MS, UNDETECTED_DB_WEIGHT), echo),
    )
    computed = Scenario(
        lesson,
        f"/work ~{DB_MS} ms + echo",
        UNDETECTED_CONNECTIONS,
        (bench_scenarios.work(setup["work_rounds"], UNDETECTED_DB_WEIGHT), echo),
    )
    runs = []
    for m in loops:
        runs += [
            Run(
                m,
                driver,
                _db_args(DB_POOL, driver),
                mix,
                scrape=True,
                min_window=MIN_WINDOW_S,
                database=True,
            )
            for driver in DRIVERS
        ]
        runs.append(
            Run(m, checks.WORK_REFERENCE, (), computed, scrape=True, min_window=MIN_WINDOW_S)
        )
    return setup, runs


# Each lesson's planning step: (lesson, models, work, cpus) -> its setup and runs.
PLANNERS: dict[str, Callable[[str, Sequence[str], Work, int], Planned]] = {
    "io-wait": _plan_io_wait,
    "cpu-work": _plan_cpu_work,
    "pool-bound": _plan_pool_bound,
    "cores": _plan_cores,
    "many-clients": _plan_many_clients,
    "blocked-loop": _plan_blocked_loop,
    "closed-loop": _plan_closed_loop,
    "db-wait": _plan_db_wait,
    "db-pool-bound": _plan_db_pool_bound,
    "undetected-io": _plan_undetected_io,
}


def plan(lesson: str, models: Sequence[str], work: Work, cpus: int) -> Plan:
    """The runs of one lesson over the chosen models."""
    if lesson not in PLANNERS:
        raise KeyError(f"no plan for lesson {lesson!r}")
    setup, runs = PLANNERS[lesson](lesson, models, work, cpus)
    return Plan(lesson, setup, runs)


def server_switch_interval() -> float | None:
    """The GIL switch interval the threaded server would set here (None: it has no such
    setting, or the environment's ARENA_* settings are invalid and it would not start)."""
    from services.config import ConfigError, load_settings

    try:
        settings = load_settings([checks.OS_THREADS], os.environ)
    except ConfigError:
        return None
    return getattr(settings, "switch_interval", None)


# -- measuring -------------------------------------------------------------------------------


def scrape(server: harness.ServerProcess) -> tuple[dict[str, float], dict[str, str]]:
    """The server's unlabelled samples from /metrics and the labels of arena_server_info
    (both empty when it serves no metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    ports = [METRICS_PORT.search(line) for line in server.log]
    port = next((int(match.group(1)) for match in ports if match), 0)
    if not port:
        return {}, {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}, {}
    values: dict[str, float] = {}
    info: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
            elif sample.name == INFO_METRIC:
                info = dict(sample.labels)
    return values, info


def stop_for(pid: int, seconds: float) -> None:
    """Stop a process (SIGSTOP) for `seconds`, then let it go on (SIGCONT)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the stall itself
    finally:
        os.kill(pid, signal.SIGCONT)


def other_cores(record: Mapping, shared: bool) -> float:
    """CPU (in cores) others took on the server's CPUs; when the load generator shares them
    (two cores, or no pinning) it is not counted: it is there by design, reported on its own."""
    other = record["other_cpu_fraction"]
    return max(0.0, other - record["loadgen_cpu_fraction"]) if shared else other


def is_noisy(record: Mapping, shared: bool) -> bool:
    """Did other processes take enough of the server's CPU to make the figure doubtful?"""
    limit = NOISY_OTHER_CORES if shared else harness.NOISY_OTHER_FRACTION
    return other_cores(record, shared) > limit


@dataclass
class Rig:
    """The load generator, the pinnings and the pace every run shares."""

    binary: Path
    pace: Pace
    one_core: harness.Pinning
    all_cores: harness.Pinning
    progress: harness.Progress
    round_ns: float = float("inf")  # the quickest /work calibration so far
    # ARENA_DB_URL and ARENA_DB_PASSWORD of the run's PostgreSQL, for the runs that query it.
    database_env: Mapping[str, str] | None = None

    def window(self, run: Run) -> float:
        """Measured seconds per repetition of this run."""
        return max(self.pace.duration, run.min_window)

    def pinning(self, run: Run) -> harness.Pinning:
        """The CPUs of this run."""
        return self.all_cores if run.two_cores else self.one_core

    def shared(self, run: Run) -> bool:
        """Does the load generator share the server's CPUs in this run?"""
        pinning = self.pinning(run)
        return pinning.server is None or pinning.server == pinning.loadgen

    def measure_in_turn(self, lesson: str, runs: Sequence[Run]) -> dict[Run, dict]:
        """Start every run's server, measure them in turn `reps` times, stop them; the medians.

        The repetitions alternate between the servers (each waits idle while another is
        measured), so a drift of the machine's speed -- these virtual cores' speed moves by tens
        of per cent over minutes -- touches every model alike instead of whichever ran last, as
        in the benchmark (`loadtest.bench.harness.run_targets`).
        """
        servers: dict[Run, harness.ServerProcess] = {}
        records: dict[Run, list[dict]] = {run: [] for run in runs}
        try:
            for run in runs:
                servers[run] = self._start(run)
            for rep in range(self.pace.reps):
                for run in runs:
                    record = self._quietest(servers[run], run)
                    records[run].append(record)
                    self._report(lesson, run, rep, record)
        finally:
            for server in servers.values():
                server.stop()
        return {run: summarize(records[run], self.shared(run)) for run in runs}

    def _start(self, run: Run) -> harness.ServerProcess:
        """The run's server, pinned; a run that queries PostgreSQL gets the database's
        settings in its environment (raises harness.HarnessError when it does not start)."""
        command = procs.server_command(run.model, *run.server_args)
        cpus = self.pinning(run).server
        if not run.database:
            return harness.ServerProcess(run.label, command, cpus)
        if self.database_env is None:
            raise harness.HarnessError(f"{run.label} needs a database and the run has none")
        return harness.ServerProcess(run.label, command, cpus, dict(self.database_env))

    def _quietest(self, server: harness.ServerProcess, run: Run) -> dict:
        """One repetition, measured again while others used the server's CPU; the quietest."""
        pinning, shared = self.pinning(run), self.shared(run)
        attempts = []
        for _ in range(1 + self.pace.noisy_retries):
            attempts.append(self._once(server, run, pinning))
            if not is_noisy(attempts[-1], shared):
                break
        return min(attempts, key=lambda item: other_cores(item, shared))

    def _once(self, server: harness.ServerProcess, run: Run, pinning: harness.Pinning) -> dict:
        before = scrape(server)[0] if run.scrape else {}
        started = time.monotonic()
        stall = None
        if run.stall_s:
            # Connecting takes well under 0.3 s here: the stall falls inside the window.
            delay = self.pace.warmup + 0.3 + STALL_AT * self.window(run)
            stall = threading.Timer(delay, stop_for, (server.proc.pid, run.stall_s))
            stall.start()
        try:
            record = harness.measure_once(
                server,
                run.scenario,
                self.binary,
                self.window(run),
                self.pace.warmup,
                pinning,
                rate=run.rate,
            )
        finally:
            if stall is not None:
                stall.cancel()
                stall.join()
                os.kill(server.proc.pid, signal.SIGCONT)  # never leave it stopped
        if run.scrape:
            after, info = scrape(server)
            record["metrics"] = {
                name: after[name] - before.get(name, 0.0)
                for name in after
                if name.endswith("_total")
            }
            record["server_info"] = info
            # Counters rise over the whole load generator run (connect, warm-up, window).
            record["metrics_span_s"] = time.monotonic() - started
        return record

    def _report(self, lesson: str, run: Run, rep: int, record: dict) -> None:
        shared = self.shared(run)
        noise = other_cores(record, shared)
        flag = (
            f"  noisy: others took {noise:.0%} of the server's CPU"
            if is_noisy(record, shared)
            else ""
        )
        if record["starved"]:
            flag += f"  STARVED: {harness.starved_text(record)}"
        self.progress.step(
            f"{lesson:<12} {run.label:<29} {run.scenario.title:<24} rep {rep + 1}/"
            f"{self.pace.reps}: {record['rps']:>8,.0f} req/s  p99 "
            f"{record['latency_us']['p99'] / 1000:>8,.1f} ms  errors {record['errors']}{flag}"
        )


def summarize(records: list[dict], shared: bool) -> dict:
    """The harness's medians, plus per request kind, /metrics deltas and the noise."""
    import statistics

    summary = harness.summarize(records)
    summary["kinds"] = [
        {
            "requests": statistics.median(r["kinds"][i]["requests"] for r in records),
            "latency_us": {
                key: statistics.median(r["kinds"][i]["latency_us"][key] for r in records)
                for key in records[0]["kinds"][i]["latency_us"]
            },
        }
        for i in range(len(records[0]["kinds"]))
    ]
    if "metrics" in records[0]:
        summary["metrics"] = {
            name: statistics.median(r["metrics"].get(name, 0.0) for r in records)
            for name in records[0]["metrics"]
        }
        summary["server_info"] = records[-1]["server_info"]
        summary["metrics_span_s"] = statistics.median(r["metrics_span_s"] for r in records)
    summary["other_cores"] = max(other_cores(r, shared) for r in records)
    summary["noisy"] = any(is_noisy(r, shared) for r in records)
    summary["reps"] = len(records)
    return summary


# -- figures ---------------------------------------------------------------------------------


def _base(summary: Mapping) -> dict:
    return {
        "rps": round(summary["rps"], 1),
        "p99_ms": round(summary["latency_us"]["p99"] / 1e3, 2),
        "errors": summary["errors"],
        "noisy": summary["noisy"],
        "other_cpu": round(summary["other_cores"], 3),
    }


def _against(expected: float, summary: Mapping) -> dict:
    """The rate a run should reach and the share of it that it reached."""
    return {"expected_rps": expected, "of_expected": round(summary["rps"] / expected, 3)}


def _cpu(summary: Mapping) -> dict:
    """The server's CPU: cores used, and milliseconds per request."""
    return {
        "server_cores": round(summary["server_cpu_fraction"], 3),
        "cpu_ms_per_request": round(summary["server_cpu_us_per_request"] / 1e3, 3),
    }


def _io_wait_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """io-wait: the rate and its share of connections / sleep; the pool's workers."""
    ideal = setup["connections"] / (setup["sleep_ms"] / 1000)
    figure.update(base, of_ideal=round(summary["rps"] / ideal, 3))
    if run.model == checks.POOL:
        figure["workers"] = setup["pool_workers"]


def _cpu_work_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """cpu-work: the rate in cores' worth of /work, and the server's CPU."""
    figure.update(
        base, cores_worth=round(summary["rps"] * setup["work_ms"] / 1000, 3), **_cpu(summary)
    )


def _pool_bound_figures(
    figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping
) -> None:
    """pool-bound: per pool size (or the one run of a switching model), the rate against
    workers (or connections) / sleep."""
    if run.model == checks.POOL:
        workers = int(run.variant.split()[-1])
        expected = workers / (setup["sleep_ms"] / 1000)
        figure.setdefault("runs", []).append(
            {"workers": workers, **base, **_against(expected, summary)}
        )
    else:
        expected = setup["connections"] / (setup["sleep_ms"] / 1000)
        figure.update(base, **_against(expected, summary))


def _cores_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """cores: the server's CPU, the load generator's and the others' on the shared cores."""
    figure.update(
        base,
        **_cpu(summary),
        loadgen_cores=round(summary["loadgen_cpu_fraction"], 3),
        other_cores=round(summary["other_cores"], 3),
    )


def _many_clients_figures(
    figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping
) -> None:
    """many-clients: who was answered, the longest wait, replies per connection, the cost."""
    figure.update(
        base,
        connections=summary["connections"],
        answered=summary["answered_connections"],
        starved=summary["starved"],
        longest_wait_s=round(summary["longest_wait_s"], 4),
        longest_wait_unanswered=summary["longest_wait_unanswered"],
        requests_per_connection={
            "min": summary["requests_per_connection_min"],
            "median": summary["requests_per_connection_median"],
            "max": summary["requests_per_connection_max"],
        },
        threads=summary["threads"],
        peak_rss_mib=round(summary["peak_rss_bytes"] / 2**20, 1),
    )


def _closed_loop_figures(
    figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping
) -> None:
    """closed-loop: the open loop's or the closed loop's latency, both runs in one figure."""
    latency = summary["latency_us"]
    mode = "open" if run.variant == OPEN_LOOP else "closed"
    figure.update(
        {
            f"{mode}_rps": round(summary["rps"], 1),
            f"{mode}_p50_ms": round(latency["p50"] / 1e3, 2),
            f"{mode}_p99_ms": round(latency["p99"] / 1e3, 2),
            f"{mode}_max_ms": round(latency["max"] / 1e3, 2),
        }
    )
    if mode == "open":
        figure.update(base, offered_rps=run.rate)
    figure["noisy"] = figure.get("noisy", False) or base["noisy"]
    figure["other_cpu"] = max(figure.get("other_cpu", 0.0), base["other_cpu"])
    if mode == "closed":
        figure["closed_errors"] = base["errors"]


def _blocked_loop_figures(
    figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping
) -> None:
    """blocked-loop: the run's figures, at CPython's switch interval in a figure of their own."""
    at_cpython = run.variant.startswith(CPYTHON_SWITCH)
    _blocked_figures(
        figure.setdefault("at_cpython_interval", {}) if at_cpython else figure,
        run.variant.endswith("alone"),
        summary,
        base,
    )


def _db_wait_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """db-wait: the rate against what bounds it, the pool's workers or the database pool."""
    workers = setup["pool_workers"] if run.model == checks.POOL else 0
    bound = (workers or setup["db_pool"]) / (setup["db_ms"] / 1000)
    figure.update(base, bound_rps=bound, of_bound=round(summary["rps"] / bound, 3))
    if workers:
        figure["workers"] = workers
    else:
        figure["db_pool"] = setup["db_pool"]


def _db_pool_bound_figures(
    figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping
) -> None:
    """db-pool-bound: per database pool size, the rate against pool / query time."""
    size = int(run.variant.split()[-1])
    expected = size / (setup["db_ms"] / 1000)
    figure.setdefault("runs", []).append({"db_pool": size, **base, **_against(expected, summary)})


def _undetected_io_figures(
    figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping
) -> None:
    """undetected-io: one part per driver (and /work)."""
    figure.setdefault("runs", []).append(_undetected_figures(run, summary, base, setup))


# Each lesson's figures of one run, added to its model's figure.
FIGURES: dict[str, Callable[[dict, Run, Mapping, dict, Mapping], None]] = {
    "io-wait": _io_wait_figures,
    "cpu-work": _cpu_work_figures,
    "pool-bound": _pool_bound_figures,
    "cores": _cores_figures,
    "many-clients": _many_clients_figures,
    "blocked-loop": _blocked_loop_figures,
    "closed-loop": _closed_loop_figures,
    "db-wait": _db_wait_figures,
    "db-pool-bound": _db_pool_bound_figures,
    "undetected-io": _undetected_io_figures,
}


def _noise_of_parts(figure: dict) -> None:
    """A figure made of runs (pool sizes, drivers) is noisy if any of its runs was."""
    if "runs" in figure:
        figure["noisy"] = any(part["noisy"] for part in figure["runs"])
        figure["other_cpu"] = max(part["other_cpu"] for part in figure["runs"])


def _noise_with_alone(figure: dict) -> None:
    """blocked-loop: a figure is noisy if either of its two runs (with /work, alone) was."""
    for part in (figure, figure.get("at_cpython_interval")):
        if part:
            noisy_alone = part.pop("noisy_alone", False)
            part["noisy"] = part.get("noisy", False) or noisy_alone
            part["other_cpu"] = max(part.get("other_cpu", 0), part.pop("other_cpu_alone", 0))


# The lessons whose figures join several runs, and how their noise is told.
JOINED_NOISE: dict[str, Callable[[dict], None]] = {
    "pool-bound": _noise_of_parts,
    "db-pool-bound": _noise_of_parts,
    "undetected-io": _noise_of_parts,
    "blocked-loop": _noise_with_alone,
}


def figures(plan_: Plan, results: Mapping[Run, dict]) -> dict[str, dict]:
    """Per model, the figures the lesson's check reads (see checks.py)."""
    out: dict[str, dict] = {}
    for run in plan_.runs:
        summary = results[run]
        FIGURES[plan_.lesson](
            out.setdefault(run.model, {}), run, summary, _base(summary), plan_.setup
        )
    settle = JOINED_NOISE.get(plan_.lesson)
    if settle is not None:
        for figure in out.values():
            settle(figure)
    return out


def _undetected_figures(run: Run, summary: Mapping, base: Mapping, setup: Mapping) -> dict:
    """undetected-io, one driver (or /work in place of /db): the slow request's rate, echo's
    latency, the server's CPU, the loop's blocked seconds, and what should bound the rate."""
    slow, echo = summary["kinds"]
    answered = slow["requests"] + echo["requests"]
    rate = summary["rps"] * slow["requests"] / max(answered, 1)
    db_ms = setup["db_ms"]
    if run.variant == checks.WORK_REFERENCE:
        bound, bound_by = 1000 / setup["work_ms"], "one core"
    elif run.variant == checks.BLOCKING:
        bound, bound_by = 1000 / db_ms, "one query at a time"
    elif run.variant == checks.BLOCKING_FIXED and run.model in setup["helper_threads"]:
        threads = min(setup["helper_threads"][run.model], setup["db_pool"])
        bound, bound_by = threads / (db_ms / 1000), f"{threads} helper threads"
    else:
        bound, bound_by = setup["db_pool"] / (db_ms / 1000), "database pool"
    part = {
        "driver": run.variant,
        **base,
        ("work_rps" if run.variant == checks.WORK_REFERENCE else "db_rps"): round(rate, 1),
        "bound_rps": round(bound, 1),
        "bound_by": bound_by,
        "of_bound": round(rate / bound, 3),
        "echo_p99_ms": round(echo["latency_us"]["p99"] / 1e3, 2),
        "echo_p50_ms": round(echo["latency_us"]["p50"] / 1e3, 3),
        "server_cores": round(summary["server_cpu_fraction"], 3),
        "cpu_ms_per_request": round(summary["server_cpu_us_per_request"] / 1e3, 3),
    }
    _blocked_seconds(part, summary)
    return part


def _blocked_figures(figure: dict, alone: bool, summary: Mapping, base: Mapping) -> None:
    """blocked-loop: echo p99 with and without /work, /work latency, blocked loop seconds."""
    echo = summary["kinds"][0]
    interval = summary.get("server_info", {}).get("switch_interval")
    if interval:
        figure["switch_interval_s"] = float(interval)
    if alone:
        figure["echo_p99_alone_ms"] = round(echo["latency_us"]["p99"] / 1e3, 3)
        figure["noisy_alone"] = summary["noisy"]
        figure["other_cpu_alone"] = round(summary["other_cores"], 3)
        return
    work = summary["kinds"][1]
    figure.update(
        base,
        echo_p99_ms=round(echo["latency_us"]["p99"] / 1e3, 2),
        echo_p50_ms=round(echo["latency_us"]["p50"] / 1e3, 3),
        echo_requests=echo["requests"],
        work_requests=work["requests"],
        work_p50_ms=round(work["latency_us"]["p50"] / 1e3, 1),
        work_min_ms=round(work["latency_us"]["min"] / 1e3, 1),
    )
    _blocked_seconds(figure, summary)


def _blocked_seconds(figure: dict, summary: Mapping) -> None:
    """The seconds the loop's probe saw it blocked during the run, when it exports them."""
    metrics = summary.get("metrics", {})
    if BLOCKED_METRIC in metrics:
        figure["blocked_s"] = round(metrics[BLOCKED_METRIC], 3)
        figure["blocked_span_s"] = round(summary["metrics_span_s"], 2)


def estimate_seconds(plans: Sequence[Plan], pace: Pace) -> float:
    """A rough duration of all plans: server start-up, warm-up and window per repetition."""
    total = 0.0
    for item in plans:
        for run in item.runs:
            window = max(pace.duration, run.min_window)
            total += 2.0 + pace.reps * (pace.warmup + window + 0.8)
    return total


def run_plans(
    plans: Sequence[Plan], rig: Rig, on_lesson: Callable[[Plan, dict[str, dict]], None]
) -> None:
    """Measure every plan in order; call on_lesson with its figures after each."""
    for item in plans:
        if "work_rounds" in item.setup:
            recalibrate(item, rig)
        results = rig.measure_in_turn(item.lesson, item.runs)
        on_lesson(item, figures(item, results))


def recalibrate(item: Plan, rig: Rig) -> None:
    """The /work time of a lesson from the quickest calibration so far, one taken now on the
    server's CPU(s) included: on a shared virtual machine the speed of a core drifts with the
    host's load (a calibration at the start measured 113 ns a round, later ones 62-68 ns), and a
    slow calibration would make a model seem to beat one core's worth."""
    cpus = rig.pinning(item.runs[0]).server if item.runs else None
    saved = os.sched_getaffinity(0)
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        rig.round_ns = min(rig.round_ns, calibrate().round_ns)
    finally:
        os.sched_setaffinity(0, saved)
    item.setup["work_ms"] = item.setup["work_rounds"] * rig.round_ns / 1e6
    item.setup["work_round_ns"] = round(rig.round_ns, 2)


def make_rig(pace: Pace, progress: harness.Progress) -> Rig:
    """Build the load generator and choose the pinnings (raises loadgen.LoadgenError)."""
    binary = loadgen.build()
    harness.raise_open_file_limit()
    one_core = harness.Pinning.choose(True)
    cpus = frozenset(os.sched_getaffinity(0))
    all_cores = harness.Pinning(cpus, cpus)
    return Rig(binary, pace, one_core, all_cores, progress)

"""The measuring machinery every lesson shares: one model alone, the same CPU allotment.

Every measurement starts one server alone, pinned to the same core(s) whatever the model (its
pool workers inherit the pinning), runs the C load generator of the benchmark pinned to the
other core (blocked-loop runs its own probe there instead: `loadtest.lessons.probe`), and stops
the server: the comparison measures the models, not how the scheduler split a machine between
them. The `cores` lesson gives the server both cores; the load generator then shares them,
and its own CPU is measured and reported.

The database lessons' servers get the run's PostgreSQL in their environment (ARENA_DB_URL,
ARENA_DB_PASSWORD: `Rig.database_env`) and their pool size and driver on the command line.

The pieces are the benchmark's (`loadtest.bench.harness`, `loadgen`, `scenarios`); this module
runs the plans the lessons make (`loadtest.lessons.claims`: what each lesson runs) and turns the
measurements into figures with the lesson's own `add_figures`, given as an argument.
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
from loadtest.lessons import probe
from loadtest.lessons.machine import drift
from loadtest.lessons.probe import Probe
from loadtest.lessons.verdict import OS_THREADS, POOL
from loadtest.tools import procs

METRICS_PORT = re.compile(r"metrics_port=(\d+)")
BLOCKED_METRIC = "arena_event_loop_blocked_seconds_total"
INFO_METRIC = "arena_server_info"
# Two-core runs: CPU time others (the load generator excluded) took on the server's cores above
# this many cores makes the figure noisy.
NOISY_OTHER_CORES = 0.3

# The pool's workers where a lesson does not count them (io-wait, cpu-work, blocked-loop, ...).
IO_POOL_WORKERS = 2
CPU_CONNECTIONS = 100  # the computing lessons (cpu-work, cores)
# Lessons whose rates are low (pool-bound: 40 req/s) or whose p99 needs samples (undetected-io)
# measure at least this long, even with --quick.
MIN_WINDOW_S = 2.0
# A run with a stall (closed-loop) stops its server this far into its window.
STALL_AT = 0.4
# The database lessons: every query waits DB_MS in PostgreSQL (pg_sleep), through a database
# pool of DB_POOL per server where the lesson does not vary it.
DB_MS, DB_POOL = 20, 20
DEFAULT_DRIVER = "default"  # the database driver a server uses unless told (--db-driver)


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
    # Measured by the blocked-loop probe (loadtest.lessons.probe) instead of the load generator:
    # its `scenario` then only names the load.
    probe: Probe | None = None

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
    needs_database: bool = False  # does any of its servers query PostgreSQL?


Planned = tuple[dict[str, Any], list[Run]]  # a lesson's setup and its runs


def _pool(workers: int) -> tuple[str, ...]:
    return ("--executor", "process", "--workers", str(workers))


def server_args(model: str, pool_workers: int) -> tuple[str, ...]:
    """The model's command line: the pool's workers, nothing for the others."""
    return _pool(pool_workers) if model == POOL else ()


def db_args(pool: int, driver: str = DEFAULT_DRIVER) -> tuple[str, ...]:
    """The database settings of a run, whatever ARENA_DB_POOL / ARENA_DB_DRIVER say."""
    return ("--db-pool", str(pool), "--db-driver", driver)


def helper_threads() -> int:
    """The threads of asyncio's default executor in a server here (blocking-fixed's bound)."""
    from services.servers.eventloop import DEFAULT_EXECUTOR_THREADS

    return DEFAULT_EXECUTOR_THREADS


def work_1ms(
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


def server_switch_interval() -> float | None:
    """The GIL switch interval the threaded server would set here (None: it has no such
    setting, or the environment's ARENA_* settings are invalid and it would not start)."""
    from services.config import ConfigError, load_settings

    try:
        settings = load_settings([OS_THREADS], os.environ)
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
    # What the machine could give, measured before the lessons (loadtest.lessons.machine).
    machine: Any = None
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
            if run.probe is not None:
                record = measure_probe(server, run.probe, self.window(run), pinning)
            else:
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
        if "probe" in record:
            seen = record["probe"]
            flag = (
                f"  echoes during /work {seen['echoes_during_work']:,}, covered "
                f"{seen['covered_share']:.0%}{flag}"
            )
        self.progress.step(
            f"{lesson:<12} {run.label:<29} {run.scenario.title:<24} rep {rep + 1}/"
            f"{self.pace.reps}: {record['rps']:>8,.0f} req/s  p99 "
            f"{record['latency_us']['p99'] / 1000:>8,.1f} ms  errors {record['errors']}{flag}"
        )


def measure_probe(
    server: harness.ServerProcess, spec: Probe, seconds: float, pinning: harness.Pinning
) -> dict:
    """One repetition of the blocked-loop probe against a running server: a record with
    measure_once's keys (rate, latency per kind, CPU, noise) and the probe's figures under
    "probe". The probe runs in this process, on the load generator's CPUs while it runs (it
    times every reply: off the server's core, as the load generator is)."""
    saved = os.sched_getaffinity(0)
    try:
        if pinning.loadgen:
            os.sched_setaffinity(0, pinning.loadgen)
        sampler = harness.Sampler(server, pinning.server)  # its thread inherits the pinning
        try:
            own_start = time.process_time()
            sampler.marker("measure-start")
            reading = probe.run(
                server.port,
                spec.work_rounds,
                seconds,
                spec.left_s,
                spec.echo_connections,
                spec.echo_pause_s,
            )
            sampler.marker("measure-end")
            own_cpu = time.process_time() - own_start
        finally:
            sampler.close()
    except OSError as error:  # refused, reset, closed: the server could not be probed
        raise harness.HarnessError(f"{server.name}: the probe failed: {error}") from None
    finally:
        os.sched_setaffinity(0, saved)
    if server.proc.poll() is not None:
        log = "\n".join(server.log)
        raise harness.HarnessError(f"{server.name} exited during the run:\n{log}")
    elapsed = max(sampler.time_end - sampler.time_start, 1e-9)
    return _probe_record(reading, sampler, own_cpu, elapsed)


def _probe_record(
    reading: probe.Reading, sampler: harness.Sampler, own_cpu: float, elapsed: float
) -> dict:
    """measure_once's record for a probe's reading: echo and /work as its two request kinds,
    each probe connection as one of its connections, the probe's own CPU as the load
    generator's."""
    import statistics

    server_cpu = max(0.0, sampler.cpu_end - sampler.cpu_start)
    # As in measure_once: CPU time on the server's CPUs that the server did not use.
    other = max(0.0, (sampler.busy_end - sampler.busy_start) - server_cpu) / elapsed
    spans = [*reading.echo_spans, *reading.work_spans]
    replies = reading.replies or (0,)
    return {
        "rps": len(spans) / elapsed,
        "requests": len(spans),
        "errors": reading.errors,
        "connections": len(replies),
        "answered_connections": sum(1 for count in replies if count),
        "starved": not all(replies),
        "requests_per_connection_min": min(replies),
        "requests_per_connection_median": statistics.median(replies),
        "requests_per_connection_max": max(replies),
        "longest_wait_s": max((end - start for start, end in spans), default=0.0),
        "longest_wait_unanswered": False,  # the probe waits for every reply
        "latency_us": probe.latency_us(spans),
        "kinds": [
            {"requests": len(kind), "latency_us": probe.latency_us(kind)}
            for kind in (reading.echo_spans, reading.work_spans)
        ],
        "elapsed_s": elapsed,
        "server_cpu_s": round(server_cpu, 4),
        "server_cpu_fraction": round(server_cpu / elapsed, 4),
        "server_cpu_us_per_request": round(server_cpu / max(1, len(spans)) * 1e6, 2),
        "peak_rss_bytes": sampler.peak_rss,
        "threads": sampler.peak_threads,
        "loadgen_cpu_s": round(own_cpu, 4),
        "loadgen_cpu_fraction": round(own_cpu / elapsed, 4),
        "loadgen_saturated": False,
        "other_cpu_fraction": round(other, 4),
        "probe": reading.as_figures(),
    }


def summarize(records: list[dict], shared: bool) -> dict:
    """The harness's medians, plus per request kind, /metrics deltas and the noise (and a
    probe's figures, counts summed over the repetitions: probe.combine)."""
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
    if "probe" in records[0]:
        # Summed, not medianed: every echo seen during a /work is one more sample of the same
        # mechanism, and a repetition with few of them should weigh little.
        summary["probe"] = probe.combine([r["probe"] for r in records])
    summary["other_cores"] = max(other_cores(r, shared) for r in records)
    summary["noisy"] = any(is_noisy(r, shared) for r in records)
    summary["reps"] = len(records)
    return summary


# -- figures ---------------------------------------------------------------------------------


def base_figures(summary: Mapping) -> dict:
    """The figures of every run: rate, p99, errors and the noise."""
    return {
        "rps": round(summary["rps"], 1),
        "p99_ms": round(summary["latency_us"]["p99"] / 1e3, 2),
        "errors": summary["errors"],
        "noisy": summary["noisy"],
        "other_cpu": round(summary["other_cores"], 3),
    }


def against(expected: float, summary: Mapping) -> dict:
    """The rate a run should reach and the share of it that it reached."""
    return {"expected_rps": expected, "of_expected": round(summary["rps"] / expected, 3)}


def cpu_figures(summary: Mapping) -> dict:
    """The server's CPU: cores used, and milliseconds per request."""
    return {
        "server_cores": round(summary["server_cpu_fraction"], 3),
        "cpu_ms_per_request": round(summary["server_cpu_us_per_request"] / 1e3, 3),
    }


def add_blocked_seconds(figure: dict, summary: Mapping) -> None:
    """The seconds the loop's probe saw it blocked during the run, when it exports them."""
    metrics = summary.get("metrics", {})
    if BLOCKED_METRIC in metrics:
        figure["blocked_s"] = round(metrics[BLOCKED_METRIC], 3)
        figure["blocked_span_s"] = round(summary["metrics_span_s"], 2)


def noise_of_parts(figure: dict) -> None:
    """A figure made of runs (pool sizes, drivers) is noisy if any of its runs was."""
    if "runs" in figure:
        figure["noisy"] = any(part["noisy"] for part in figure["runs"])
        figure["other_cpu"] = max(part["other_cpu"] for part in figure["runs"])


AddFigures = Callable[[dict, Run, Mapping, dict, Mapping], None]


def figures(
    plan_: Plan,
    results: Mapping[Run, dict],
    add_figures: AddFigures,
    settle: Callable[[dict], None],
) -> dict[str, dict]:
    """Per model, the figures the lesson's check reads: its `add_figures` with each run's, then
    its `settle` on each model's (the lesson module's, `loadtest.lessons.claims`)."""
    out: dict[str, dict] = {}
    for run in plan_.runs:
        summary = results[run]
        add_figures(out.setdefault(run.model, {}), run, summary, base_figures(summary), plan_.setup)
    for figure in out.values():
        settle(figure)
    return out


def estimate_seconds(plans: Sequence[Plan], pace: Pace) -> float:
    """A rough duration of all plans: server start-up, warm-up and window per repetition."""
    total = 0.0
    for item in plans:
        for run in item.runs:
            window = max(pace.duration, run.min_window)
            total += 2.0 + pace.reps * (pace.warmup + window + 0.8)
    return total


def run_plans(
    plans: Sequence[Plan], rig: Rig, on_lesson: Callable[[Plan, dict[Run, dict]], None]
) -> None:
    """Measure every plan in order; call on_lesson with its measurements after each."""
    for item in plans:
        computes = "work_rounds" in item.setup
        if computes:
            recalibrate(item, rig)
        measured = rig.measure_in_turn(item.lesson, item.runs)
        if computes:
            record_drift(item, rig)
        on_lesson(item, measured)


def _calibrate_on(item: Plan, rig: Rig) -> float:
    """A /work calibration (ns a round) taken now on the CPU(s) of the plan's server."""
    cpus = rig.pinning(item.runs[0]).server if item.runs else None
    saved = os.sched_getaffinity(0)
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        return calibrate().round_ns
    finally:
        os.sched_setaffinity(0, saved)


def recalibrate(item: Plan, rig: Rig) -> None:
    """The /work time of a lesson from the quickest calibration so far, one taken now on the
    server's CPU(s) included: on a shared virtual machine the speed of a core drifts with the
    host's load (a calibration at the start measured 113 ns a round, later ones 62-68 ns), and a
    slow calibration would make a model seem to beat one core's worth."""
    fresh = _calibrate_on(item, rig)
    rig.round_ns = min(rig.round_ns, fresh)
    item.setup["work_ms"] = item.setup["work_rounds"] * rig.round_ns / 1e6
    item.setup["work_round_ns"] = round(rig.round_ns, 2)
    item.setup["work_round_ns_before"] = round(fresh, 2)


def record_drift(item: Plan, rig: Rig) -> None:
    """Calibrate again once the lesson is measured: how far the core's speed moved under it
    (`work_drift`; verdict.drift_verdict makes a failure on a drifted run inconclusive)."""
    after = _calibrate_on(item, rig)
    item.setup["work_round_ns_after"] = round(after, 2)
    item.setup["work_drift"] = round(drift(item.setup["work_round_ns_before"], after), 3)


def make_rig(pace: Pace, progress: harness.Progress) -> Rig:
    """Build the load generator and choose the pinnings (raises loadgen.LoadgenError)."""
    binary = loadgen.build()
    harness.raise_open_file_limit()
    one_core = harness.Pinning.choose(True)
    cpus = frozenset(os.sched_getaffinity(0))
    all_cores = harness.Pinning(cpus, cpus)
    return Rig(binary, pace, one_core, all_cores, progress)

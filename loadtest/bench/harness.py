"""Run every target under every scenario, one server at a time, and collect the numbers.

For each (scenario, model family) fresh servers are started on the server CPU(s) -- ours, ours
without metrics, the textbook version -- measured in turn `reps` times, one at a time, by the C
load generator pinned to another CPU, and stopped (SIGTERM, then SIGKILL of its process group,
so no worker survives into the next measurement). While the load
generator measures, a sampler thread reads the server's processes in /proc
(loadtest/tools/procs.py): CPU seconds (workers included), peak resident memory and thread count.
In a `/db` scenario the servers get a throwaway PostgreSQL's settings in their environment, and
the sampler also reads the CPU seconds of its postmaster and every backend below it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil

from loadtest.bench import loadgen
from loadtest.bench.scenarios import Scenario, Target
from loadtest.tools import procs

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
LOG_LINES = 200  # of a server's stderr shown when it fails
SAMPLE_INTERVAL = 0.05
# Above this share of the server's CPU used by someone else, a measurement is noisy: it is
# repeated (--noisy-retries) and, if still noisy, flagged in the report.
NOISY_OTHER_FRACTION = 0.15


class HarnessError(RuntimeError):
    """A server could not be started or measured."""


@contextlib.contextmanager
def measuring(tool: str) -> Iterator[None]:
    """Around a tool's measurements: a harness or load generator error ends the tool with its
    message and exit code 1, Ctrl-C with exit code 130; either way nothing is written."""
    try:
        yield
    except (HarnessError, loadgen.LoadgenError) as error:
        print(f"{tool}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{tool}: interrupted; nothing written", file=sys.stderr)
        raise SystemExit(130) from None


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the server and the load generator may use (None: not pinned)."""

    server: frozenset[int] | None
    loadgen: frozenset[int] | None

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        """Server on every CPU but the first, load generator on the first, when 2+ CPUs."""
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled or len(cpus) < 2:
            return cls(None, None)
        return cls(frozenset(cpus[1:]), frozenset(cpus[:1]))

    def every_cpu(self) -> Pinning:
        """The server and the load generator both on every CPU of this pinning (unpinned stays
        unpinned): for a server of several processes, which one CPU would keep on one core."""
        if self.server is None or self.loadgen is None:
            return self
        cpus = self.server | self.loadgen
        return Pinning(cpus, cpus)

    @property
    def shared(self) -> bool:
        """The server's CPUs are the load generator's too."""
        return bool(self.server and self.loadgen and self.server & self.loadgen)

    def describe(self) -> str:
        """Human text for the report."""
        if self.server is None or self.loadgen is None:
            return "not pinned"
        if self.shared:
            return f"server and load generator on CPU {_cpu_list(self.server | self.loadgen)}"
        return f"server on CPU {_cpu_list(self.server)}, load generator on CPU " + _cpu_list(
            self.loadgen
        )


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def raise_open_file_limit() -> None:
    """Lift the soft descriptor limit to the hard one; servers inherit it (1000 connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its descendants, those it already reaped included."""
    samples = procs.tree_samples(pid)
    if not samples:
        return 0.0
    return samples[0].reaped_cpu_seconds + sum(sample.cpu_seconds for sample in samples)


SCHEDSTAT = Path("/proc/self/schedstat").exists()  # CONFIG_SCHED_INFO: run time in ns


def database_cpu_seconds(pid: int) -> float:
    """CPU seconds of PostgreSQL: the postmaster and every live backend below it, to the
    nanosecond (/proc/PID/schedstat: a pooled backend's few milliseconds in a short window
    vanish in /proc/PID/stat's 10 ms ticks; PostgreSQL's processes are single-threaded, so the
    process's main thread is all of it), plus the backends the postmaster already reaped."""
    if not SCHEDSTAT:
        return tree_cpu_seconds(pid)
    total = 0.0
    for member in (pid, *procs.descendants(pid)):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{member}/schedstat").read_text().split()[0]) / 1e9
    with contextlib.suppress(OSError):
        total += procs.proc_sample(pid).reaped_cpu_seconds
    return total


def pin_tree(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin a running process and everything below it to `cpus` (None: leave it); children it
    forks later inherit the setting (PostgreSQL's backends)."""
    if cpus is None:
        return
    try:
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.cpu_affinity(sorted(cpus))
    except (psutil.Error, OSError) as error:
        raise HarnessError(f"cannot pin process {pid} to CPU {_cpu_list(cpus)}: {error}") from None


@dataclass(frozen=True)
class Database:
    """The PostgreSQL the servers of a `/db` scenario use: its settings and its postmaster."""

    env: dict[str, str]  # ARENA_DB_URL and ARENA_DB_PASSWORD (loadtest/tools/postgres.py)
    pid: int


class ServerProcess:
    """One server subprocess in its own session (tools/procs.py), its stderr kept in a log."""

    def __init__(
        self,
        name: str,
        command: list[str],
        cpus: frozenset[int] | None,
        env: dict[str, str] | None = None,
    ) -> None:
        """`env` adds to this process's environment (the database settings)."""
        self.name = name
        try:
            self.server = procs.start_server(
                command,
                name=name,
                cpus=cpus,
                env=None if env is None else {**os.environ, **env},
                timeout=START_TIMEOUT,
            )
        except procs.StartError as error:
            raise HarnessError(str(error)) from None
        self.proc = self.server.proc
        self.port = self.server.port

    @property
    def log(self) -> list[str]:
        """Its stderr's last lines."""
        return self.server.log[-LOG_LINES:]

    def usage(self) -> tuple[float, int, int]:
        """CPU seconds, resident bytes and threads of the server and all its descendants (the
        CPU of workers it already reaped included)."""
        samples = procs.tree_samples(self.proc.pid)
        if not samples:
            return 0.0, 0, 0
        cpu = samples[0].reaped_cpu_seconds + sum(sample.cpu_seconds for sample in samples)
        return cpu, sum(s.rss for s in samples), sum(s.threads for s in samples)

    def stop(self) -> None:
        """SIGTERM the server, wait, then SIGKILL whatever is left of its process group."""
        self.server.stop(STOP_TIMEOUT)


def busy_seconds(cpus: frozenset[int] | None) -> float:
    """CPU seconds the given CPUs (all when None) spent busy since boot, whoever ran."""
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = per_cpu if cpus is None else [per_cpu[cpu] for cpu in sorted(cpus)]
    return sum(sum(times) - times.idle - getattr(times, "iowait", 0.0) for times in chosen)


def background_load(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over a short idle interval: how loud the machine is already."""
    before = busy_seconds(None)
    time.sleep(seconds)
    # Per-CPU counters can step back a tick between two reads: never below nothing.
    return max(0.0, (busy_seconds(None) - before) / seconds / (os.cpu_count() or 1))


class Sampler:
    """Samples a server's usage in a thread between the load generator's markers (and the CPU
    of the database's process tree at both markers, when `database_pid` is given)."""

    def __init__(
        self,
        server: ServerProcess,
        server_cpus: frozenset[int] | None,
        database_pid: int | None = None,
    ) -> None:
        self.server = server
        self.server_cpus = server_cpus
        self.database_pid = database_pid
        self.busy_start = self.busy_end = 0.0
        self.cpu_start = self.cpu_end = 0.0
        self.database_cpu_start = self.database_cpu_end = 0.0
        self.time_start = self.time_end = 0.0
        self.peak_rss = 0
        self.peak_threads = 0
        self._measuring = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def marker(self, name: str) -> None:
        """Called by the load generator's stderr reader."""
        cpu, rss, threads = self.server.usage()
        database = database_cpu_seconds(self.database_pid) if self.database_pid else 0.0
        busy = busy_seconds(self.server_cpus)
        if name == "measure-start":
            self.cpu_start, self.time_start, self.busy_start = cpu, time.monotonic(), busy
            self.database_cpu_start = database
            self._measuring.set()
        else:
            self.cpu_end, self.time_end, self.busy_end = cpu, time.monotonic(), busy
            self.database_cpu_end = database
            self._measuring.clear()
        self._note(rss, threads)

    def _note(self, rss: int, threads: int) -> None:
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_threads = max(self.peak_threads, threads)

    def _loop(self) -> None:
        while not self._done.wait(SAMPLE_INTERVAL):
            if self._measuring.is_set():
                _, rss, threads = self.server.usage()
                self._note(rss, threads)

    def close(self) -> None:
        """Stop the sampling thread."""
        self._done.set()
        self._thread.join(timeout=5)


def measure_once(
    server: ServerProcess,
    scenario: Scenario,
    binary: Path,
    duration: float,
    warmup: float,
    pinning: Pinning,
    rate: float = 0.0,
    database_pid: int | None = None,
) -> dict:
    """One measurement of a running server, closed loop or (`rate` > 0 requests per second)
    open loop; returns one repetition's record. With `database_pid` (the postmaster, pinned
    to the server's CPUs: pin_tree) the record has its CPU too, and it is not "other" work."""
    sampler = Sampler(server, pinning.server, database_pid)
    try:
        args = loadgen.command(
            binary,
            server.port,
            scenario.connections,
            duration,
            warmup,
            scenario.requests,
            rate=rate,
        )
        result = loadgen.run(
            args,
            sampler.marker,
            set(pinning.loadgen) if pinning.loadgen else None,
            timeout=duration + warmup + 60,
        )
    finally:
        sampler.close()
    if server.proc.poll() is not None:
        raise HarnessError(f"{server.name} exited during the run:\n" + "\n".join(server.log))
    elapsed = result["elapsed_s"] or duration
    server_cpu = max(0.0, sampler.cpu_end - sampler.cpu_start)
    loadgen_cpu = result["cpu_s"]["user"] + result["cpu_s"]["system"]
    errors = sum(result["errors"].values())
    database_cpu = max(0.0, sampler.database_cpu_end - sampler.database_cpu_start)
    # CPU time on the server's CPUs that the server (and its database) did not use: other
    # processes (when pinned, a busy neighbour that makes the figure noisy; unpinned, the load
    # generator too).
    used = server_cpu + database_cpu
    other = max(0.0, (sampler.busy_end - sampler.busy_start) - used) / elapsed
    database_figures = (
        {
            "postgres_cpu_s": round(database_cpu, 4),
            "postgres_cpu_fraction": round(database_cpu / elapsed, 4),
            "postgres_cpu_us_per_request": round(
                database_cpu / max(1, result["requests"]) * 1e6, 2
            ),
        }
        if database_pid
        else {}
    )
    return {
        "rps": result["rps"],
        "requests": result["requests"],
        "errors": errors,
        "error_kinds": result["errors"],
        "connected": result["connected"],
        "connect_s": result["connect_s"],
        "ramp_s": result["connect_s"],  # the old name, for readers of older results
        **fairness(result),
        "latency_us": result["latency_us"],
        "kinds": result["kinds"],
        "elapsed_s": elapsed,
        "server_cpu_s": round(server_cpu, 4),
        "server_cpu_fraction": round(server_cpu / elapsed, 4),
        # CPU per request barely moves when a busy neighbour steals time: the robust figure.
        "server_cpu_us_per_request": round(server_cpu / max(1, result["requests"]) * 1e6, 2),
        **database_figures,
        "peak_rss_bytes": sampler.peak_rss,
        "threads": sampler.peak_threads,
        "loadgen_cpu_s": round(loadgen_cpu, 4),
        "loadgen_cpu_fraction": result["cpu_fraction"],
        "loadgen_saturated": result["cpu_fraction"] > loadgen.SATURATION_CPU_FRACTION,
        "other_cpu_fraction": round(other, 4),
        **({"open_loop": result["open_loop"]} if "open_loop" in result else {}),
    }


def fairness(result: dict) -> dict:
    """The load generator's per-connection figures, flat, as one repetition records them."""
    fair = result["fairness"]
    per_connection = fair["requests_per_connection"]
    return {
        "connections": fair["connections"],
        "answered_connections": fair["answered_connections"],
        "starved": fair["starved"],
        "requests_per_connection_min": per_connection["min"],
        "requests_per_connection_median": per_connection["median"],
        "requests_per_connection_max": per_connection["max"],
        "longest_wait_s": fair["longest_wait_s"],
        "longest_wait_unanswered": fair["longest_wait_unanswered"],
    }


def worst_fairness(reps: list[dict]) -> dict:
    """The fairness figures of the worst repetition: one starved run is enough to say so."""
    longest = max(reps, key=lambda rep: rep["longest_wait_s"])
    return {
        "connections": reps[0]["connections"],
        "answered_connections": min(rep["answered_connections"] for rep in reps),
        "starved": any(rep["starved"] for rep in reps),
        "starved_reps": sum(rep["starved"] for rep in reps),
        "requests_per_connection_min": min(rep["requests_per_connection_min"] for rep in reps),
        "requests_per_connection_median": statistics.median(
            rep["requests_per_connection_median"] for rep in reps
        ),
        "requests_per_connection_max": max(rep["requests_per_connection_max"] for rep in reps),
        "longest_wait_s": longest["longest_wait_s"],
        "longest_wait_unanswered": longest["longest_wait_unanswered"],
    }


MEDIAN_FIELDS = (
    "rps",
    "requests",
    "server_cpu_s",
    "server_cpu_fraction",
    "server_cpu_us_per_request",
    "peak_rss_bytes",
    "threads",
    "loadgen_cpu_s",
    "loadgen_cpu_fraction",
    "other_cpu_fraction",
)
# Only in the records of `/db` scenarios.
DATABASE_FIELDS = ("postgres_cpu_s", "postgres_cpu_fraction", "postgres_cpu_us_per_request")


def summarize(reps: list[dict]) -> dict:
    """Median of the repetitions; errors summed; saturation, fairness: the worst rep."""
    fields = MEDIAN_FIELDS + tuple(field for field in DATABASE_FIELDS if field in reps[0])
    summary: dict = {field: statistics.median(rep[field] for rep in reps) for field in fields}
    summary["latency_us"] = {
        key: statistics.median(rep["latency_us"][key] for rep in reps)
        for key in reps[0]["latency_us"]
    }
    summary["errors"] = sum(rep["errors"] for rep in reps)
    summary["loadgen_saturated"] = any(rep["loadgen_saturated"] for rep in reps)
    summary.update(worst_fairness(reps))
    return summary


def wait_text(seconds: float) -> str:
    """A wait for people: 5.9 s, 32 ms, 0.4 ms."""
    if seconds >= 1:
        return f"{seconds:.1f} s"
    if seconds >= 0.01:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds * 1e3:.1f} ms"


def starved_text(record: dict) -> str:
    """'352/1000 connections answered; a request still waiting after 5.9 s'."""
    how = "still waiting after" if record["longest_wait_unanswered"] else "answered after"
    return (
        f"{record['answered_connections']}/{record['connections']} connections answered; "
        f"a request {how} {wait_text(record['longest_wait_s'])}"
    )


class Progress:
    """One stderr line per measurement with a count and an estimate of the time left."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.enabled = enabled

    def step(self, text: str) -> None:
        """Count one finished measurement and print it."""
        self.done += 1
        self.total = max(self.total, self.done)  # a sweep may add steps past its plan
        if not self.enabled:
            return
        spent = time.monotonic() - self.started
        left = spent / self.done * (self.total - self.done)
        print(
            f"[{self.done:>3}/{self.total}] {text}  (about {duration_text(left)} left)",
            file=sys.stderr,
            flush=True,
        )

    def note(self, text: str) -> None:
        """Print a line that is not a measurement."""
        if self.enabled:
            print(text, file=sys.stderr, flush=True)


def duration_text(seconds: float) -> str:
    """A time estimate for people, to the second: 45s, 3m07s."""
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def without_loadgen(record: dict) -> dict:
    """A record measured with the load generator on the server's CPUs: its CPU no longer
    counted as other processes' (it is in its own column), so "other" means neighbours again."""
    record["other_cpu_fraction"] = round(
        max(0.0, record["other_cpu_fraction"] - record["loadgen_cpu_fraction"]), 4
    )
    record["shared_cpus"] = True
    return record


def _loadgen_apart(measure: Callable[[], dict]) -> dict:
    return without_loadgen(measure())


def quietest(measure: Callable[[], dict], retries: int) -> dict:
    """`measure()`, again up to `retries` times while other work took more than
    NOISY_OTHER_FRACTION of the server CPU; the quietest record, with its number of attempts."""
    attempts = []
    for _ in range(1 + retries):
        attempts.append(measure())
        if attempts[-1]["other_cpu_fraction"] <= NOISY_OTHER_FRACTION:
            break
        time.sleep(1.0)  # give a passing neighbour a moment
    record = min(attempts, key=lambda attempt: attempt["other_cpu_fraction"])
    record["attempts"] = len(attempts)
    return record


def run_targets(
    targets: list[Target],
    scenario: Scenario,
    binary: Path,
    pinning: Pinning,
    reps: int,
    duration: float,
    warmup: float,
    progress: Progress,
    noisy_retries: int = 0,
    database: Database | None = None,
) -> list[dict]:
    """Start the servers of one family, measure them in turn `reps` times, stop them.

    The repetitions alternate between the servers (ours, ours without metrics, textbook, then
    again), so a drift of the machine's speed during the scenario -- these virtual cores' speed
    moves by tens of per cent over minutes -- touches every server alike instead of whichever
    was measured last. A server waits idle while another is measured. A repetition during which
    other work took more than NOISY_OTHER_FRACTION of the (pinned) server CPU is measured again,
    up to `noisy_retries` times; the quietest attempt is kept. With `database` the servers get
    its settings and its CPU is measured beside theirs.
    """
    servers = []
    records: list[list[dict]] = [[] for _ in targets]
    retries = noisy_retries if pinning.server else 0  # unpinned, the load generator is "other"
    try:
        for target in targets:
            servers.append(
                ServerProcess(
                    target.name,
                    list(target.command),
                    pinning.server,
                    database.env if database else None,
                )
            )
        for rep in range(reps):
            for index, (target, server) in enumerate(zip(targets, servers, strict=True)):
                measure = partial(
                    measure_once,
                    server,
                    scenario,
                    binary,
                    duration,
                    warmup,
                    pinning,
                    database_pid=database.pid if database else None,
                )
                if pinning.shared:
                    measure = partial(_loadgen_apart, measure)
                record = quietest(measure, retries)
                records[index].append(record)
                progress.step(
                    f"{scenario.name:<13} {target.name:<26} rep {rep + 1}/{reps}: "
                    f"{record['rps']:>9,.0f} req/s  p99 {record['latency_us']['p99']:>9,.0f} µs  "
                    f"errors {record['errors']}  answered {record['answered_connections']}/"
                    f"{record['connections']}{_database_text(record)}"
                    f"{_flags(record, record['attempts'])}"
                )
    finally:
        for server in servers:
            server.stop()
    return [
        {
            "scenario": scenario.name,
            "target": target.name,
            "family": target.family,
            "kind": target.kind,
            "command": target.description,
            "reps": target_records,
            "median": summarize(target_records),
        }
        for target, target_records in zip(targets, records, strict=True)
    ]


def _database_text(record: dict) -> str:
    """The progress line's CPU per request of the server and of PostgreSQL, in `/db` runs."""
    if "postgres_cpu_us_per_request" not in record:
        return ""
    return (
        f"  CPU/req: server {record['server_cpu_us_per_request']:,.0f} µs, "
        f"postgres {record['postgres_cpu_us_per_request']:,.0f} µs"
    )


def _flags(record: dict, attempts: int) -> str:
    """What the progress line says about a repetition beyond its figures."""
    flag = "  LOAD GENERATOR SATURATED" if record["loadgen_saturated"] else ""
    if record["starved"]:
        flag += f"  STARVED: {starved_text(record)}"
    if record["other_cpu_fraction"] > NOISY_OTHER_FRACTION:
        flag += f"  noisy: {record['other_cpu_fraction']:.0%} of the server CPU was busy"
    elif attempts > 1:
        flag += f"  (quiet on attempt {attempts})"
    return flag


def measure_ceiling(
    binary: Path,
    scenario: Scenario,
    pinning: Pinning,
    duration: float,
    warmup: float,
) -> dict:
    """The load generator against its own C echo server: the fastest rate this rig can show."""
    server = ServerProcess("c-epoll", [str(binary), "--serve", "0"], pinning.server)
    try:
        record = measure_once(server, scenario, binary, duration, warmup, pinning)
    finally:
        server.stop()
    return {
        "scenario": scenario.name,
        "rps": record["rps"],
        "loadgen_cpu_fraction": record["loadgen_cpu_fraction"],
        "server_cpu_fraction": record["server_cpu_fraction"],
        "errors": record["errors"],
    }

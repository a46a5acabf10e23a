"""The verdicts: each lesson's hypothesis in numbers, decided from the figures it measured.

Pure functions over plain dictionaries (the figures as `lessons.json` stores them), so every
verdict can be tested on synthetic figures without starting a server. The measurement that
produces the figures is `loadtest.lessons.runner`.

A verdict is `holds`, `fails`, or `inconclusive`. A check that fails on figures measured while
other processes used the server's CPU is *inconclusive*: a busy neighbour cannot be told from
the model, so the run neither passes nor fails on noise; the reason says so. A check that holds
on noisy figures holds, and its reason says the machine was busy.

Model roles are read from the registry, never listed: the pool is the model with workers; every
other model switches between connections (a thread, a greenlet or a Protocol per connection);
the models with one event loop for every connection (gevent, asyncio: those exporting the loop's
blocked seconds) are the event loops of `blocked-loop`, threaded its preempted OS threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from loadtest.lessons.catalog import DB_CHECKED, LESSONS_BY_ID, Lesson
from services import models

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"

POOL = "pool"  # the model whose concurrency is its number of workers
# One loop for every connection: a blocking call blocks them all (gevent's and asyncio's).
EVENT_LOOPS: tuple[str, ...] = tuple(
    model.name for model in models.MODELS if "arena_event_loop_blocked_seconds" in model.own_metrics
)
OS_THREADS = "threaded"  # the OS preempts a long request

# io-wait: the switching models against a pool of IO_POOL_WORKERS on /sleep.
IO_SPEEDUP = 10.0
IO_IDEAL_SHARE = 0.70
# cpu-work: the switching models within CPU_SPREAD of each other; none above one core's worth
# (rate x /work time) by more than CORE_SLACK, the calibration's own error.
CPU_SPREAD = 0.25
CORE_SLACK = 0.15
# pool-bound: rate within POOL_TOLERANCE of workers / sleep; doubling the workers doubles it.
POOL_TOLERANCE = 0.25
# cores: the process pool on two cores against the threaded server.
CORES_RATIO = 1.6
# Below this many cores of the server's allotment actually available (others took the rest),
# the cores lesson cannot be decided.
CORES_AVAILABLE = 1.6
# blocked-loop: each event loop's echo p99 with the long /work against without it.
BLOCKED_FACTOR = 10.0
# closed-loop: the same stall, timed on a timetable (open loop) and by a closed loop. The open
# loop's p99 reaches at least this share of the stall; the closed loop's stays below this one.
STALL_OPEN_SHARE = 0.25
STALL_CLOSED_SHARE = 0.1
# db-wait: each switching model >= DB_IDEAL_SHARE of database pool / query time; the worker pool
# at most workers / query time (+DB_POOL_SLACK: the window's edges).
DB_IDEAL_SHARE = 0.70
DB_POOL_SLACK = 0.10
# db-pool-bound: the rate within DB_POOL_TOLERANCE of pool / query time for each pool size.
DB_POOL_TOLERANCE = 0.25
# undetected-io, with the blocking driver: at most UNDETECTED_SERIAL_FACTOR x one query at a
# time, echo p99 >= the query time, server CPU below UNDETECTED_CPU_SHARE of the same mix with
# /work in place of /db. With blocking-fixed and default: >= DB_IDEAL_SHARE of what the helper
# threads or the database pool allow, echo p99 below UNDETECTED_FAST_SHARE of the query time.
UNDETECTED_SERIAL_FACTOR = 1.2
UNDETECTED_CPU_SHARE = 0.5
UNDETECTED_FAST_SHARE = 0.5
BLOCKING, BLOCKING_FIXED, DEFAULT_DRIVER = "blocking", "blocking-fixed", "default"
WORK_REFERENCE = "work"  # undetected-io's run with /work in place of /db: blocked-loop's block
# CPython's own GIL switch interval (sys.getswitchinterval() unless changed): the threaded
# server may set a longer one; blocked-loop then measures it at both.
CPYTHON_SWITCH_INTERVAL = 0.005

CORES = Lesson(
    "cores",
    "cores: /work on two cores",
    "Processes use cores, threads and greenlets do not: under the GIL a thread per connection and "
    "an event loop compute on one core at a time, a pool of worker processes on all of them.",
    "requests/s and the cores each server used.",
    "the process pool near two cores' worth of /work; threaded, gevent and asyncio near one.",
)
HIDES_QUEUEING = Lesson(
    "closed-loop",
    "closed-loop: one stall, timed by a closed and an open loop",
    "A closed loop hides queueing: while a server stalls its clients stop sending, so the stall "
    "is timed once per connection; on a timetable every request that fell due during the stall "
    "is timed, from when it was due.",
    "the p99 of the same stall in both modes (Locust: --arrival-rate, the latency from the "
    "intended start and the late starts).",
    "the open loop's p99 close to half the stall or more; the closed loop's p99 barely moves, "
    "only its maximum shows the stall.",
)
# Checked here, not Locust scenarios (a stall or a server alone on every core is no knob preset).
CHECK_ONLY: tuple[Lesson, ...] = (CORES, HIDES_QUEUEING)
# The lessons with a verdict, in the order they run and print.
CHECKED_IDS: tuple[str, ...] = (
    "io-wait",
    "cpu-work",
    "pool-bound",
    "cores",
    "many-clients",
    "blocked-loop",
    "closed-loop",
    "db-wait",
    "db-pool-bound",
    "undetected-io",
)
# The lessons that query PostgreSQL: `python -m loadtest.lessons` starts one for them.
DATABASE_IDS: tuple[str, ...] = tuple(entry.id for entry in DB_CHECKED)


def lesson(lesson_id: str) -> Lesson:
    """The catalog entry of a checked lesson (the check-only ones included)."""
    extra = {entry.id: entry for entry in (*CHECK_ONLY, *DB_CHECKED)}
    return extra.get(lesson_id) or LESSONS_BY_ID[lesson_id]


def switching_models(names: Iterable[str] = models.NAMES) -> list[str]:
    """The models that switch between connections: every registered model but the pool."""
    return [name for name in names if name != POOL]


@dataclass(frozen=True)
class Verdict:
    """holds, fails or inconclusive, and why, in one sentence with the deciding figures."""

    verdict: str
    reason: str


def _noisy(figures: Mapping[str, Mapping], names: Iterable[str]) -> list[str]:
    return [name for name in names if figures.get(name, {}).get("noisy")]


class Problems(list):
    """What failed, each with the models whose figures show it."""

    def add(self, text: str, *names: str) -> None:
        """One failed part of the hypothesis, shown by these models' figures."""
        self.append((names, text))


def _decide(
    problems: Problems, ok: str, figures: Mapping[str, Mapping], used: Iterable[str]
) -> Verdict:
    """Holds without problems. With problems it fails, unless every problem shows in a noisy
    figure: then it is inconclusive (a busy neighbour cannot be told from the model)."""
    noisy = set(_noisy(figures, used))
    if not problems:
        busy = _busy(figures, [name for name in used if name in noisy])
        return Verdict(HOLDS, ok + (f"; measured while {busy}" if busy else ""))
    text = "; ".join(problem for _, problem in problems)
    if all(noisy.intersection(names) for names, _ in problems):
        involved = [
            name for name in used if any(name in names for names, _ in problems) and name in noisy
        ]
        return Verdict(
            INCONCLUSIVE,
            f"{text}; but {_busy(figures, involved)}, so this cannot be told from noise",
        )
    return Verdict(FAILS, text)


def _busy(figures: Mapping[str, Mapping], names: list[str]) -> str:
    if not names:
        return ""
    shares = ", ".join(f"{name} {figures[name].get('other_cpu', 0):.0%}" for name in names)
    return f"the machine was busy (other processes on the server's CPU: {shares})"


def _missing(figures: Mapping[str, Mapping], needed: Iterable[str]) -> Verdict | None:
    absent = [name for name in needed if name not in figures]
    if absent:
        return Verdict(
            INCONCLUSIVE, "not checked: needs " + ", ".join(absent) + " (narrowed by --models)"
        )
    return None


def _rate(value: float) -> str:
    return f"{value:,.0f} req/s"


def _ms(value: float) -> str:
    return f"{value:,.1f} ms" if value < 10 else f"{value:,.0f} ms"


# -- io-wait ---------------------------------------------------------------------------------


def check_io_wait(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Switching models >= IO_SPEEDUP x the pool and each >= IO_IDEAL_SHARE of the ideal."""
    switching = switching_models(figures)
    missing = _missing(figures, [POOL]) or (
        None if switching else Verdict(INCONCLUSIVE, "not checked: needs a switching model")
    )
    if missing:
        return missing
    ideal = setup["connections"] / (setup["sleep_ms"] / 1000)
    pool = figures[POOL]["rps"]
    problems = Problems()
    for name in switching:
        rps = figures[name]["rps"]
        if rps < IO_IDEAL_SHARE * ideal:
            problems.add(
                f"{name} {_rate(rps)} is {rps / ideal:.0%} of the ideal "
                f"{_rate(ideal)} (needs {IO_IDEAL_SHARE:.0%})",
                name,
            )
        if rps < IO_SPEEDUP * pool:
            problems.add(
                f"{name} is {rps / max(pool, 1e-9):.1f}x the pool's {_rate(pool)} "
                f"(needs {IO_SPEEDUP:g}x)",
                name,
                POOL,
            )
    shares = ", ".join(
        f"{name} {figures[name]['rps'] / ideal:.0%} of the ideal and "
        f"{figures[name]['rps'] / max(pool, 1e-9):.0f}x the pool"
        for name in switching
    )
    ok = (
        f"{shares} ({_rate(pool)} with {setup['pool_workers']} workers; ideal {_rate(ideal)} "
        f"= {setup['connections']} connections / {setup['sleep_ms']} ms)"
    )
    return _decide(problems, ok, figures, [POOL, *switching])


# -- cpu-work --------------------------------------------------------------------------------


def check_cpu_work(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Switching models within CPU_SPREAD of each other; none above one core's worth."""
    switching = switching_models(figures)
    if len(switching) < 2 and not figures:
        return Verdict(INCONCLUSIVE, "not checked: no model measured")
    worth = 1000 / setup["work_ms"]
    problems = Problems()
    rates = {name: figures[name]["rps"] for name in switching}
    if len(rates) >= 2:
        low, high = min(rates.values()), max(rates.values())
        if high > (1 + CPU_SPREAD) * low:
            problems.add(
                "the switching models differ by "
                + f"{high / max(low, 1e-9) - 1:.0%}"
                + f" (needs within {CPU_SPREAD:.0%}): "
                + ", ".join(
                    f"{name} {_rate(rate)}" + _cpu_per_request(figures[name])
                    for name, rate in rates.items()
                ),
                *rates,
            )
    for name, figure in figures.items():
        if figure["rps"] > (1 + CORE_SLACK) * worth:
            problems.add(
                f"{name} {_rate(figure['rps'])} is {figure['rps'] / worth:.2f} cores' "
                f"worth of /work (one core: {_rate(worth)})",
                name,
            )
    spread = (
        f"within {max(rates.values()) / max(min(rates.values()), 1e-9) - 1:.0%} of each other, "
        if len(rates) >= 2
        else ""
    )
    ok = (
        ", ".join(
            f"{name} {_rate(figure['rps'])} ({figure['rps'] / worth:.2f} of a core's worth)"
            for name, figure in figures.items()
        )
        + f": {spread}none above one core's worth ({_rate(worth)} of {setup['work_ms']:.2f} ms "
        "/work)"
    )
    return _decide(problems, ok, figures, list(figures))


def _cpu_per_request(figure: Mapping) -> str:
    """` (1.45 ms of server CPU per request)` when measured: where a slower model's core went."""
    cpu = figure.get("cpu_ms_per_request")
    return f" ({cpu:.2f} ms of server CPU per request)" if cpu else ""


# -- pool-bound ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proportional:
    """A rate that should follow a size: each run's size / its requests' wait (workers / sleep,
    database pool / query time), so that twice the size gives twice the rate."""

    size: str  # each run's key of its size: "workers"
    wait_ms: str  # the setup's key of each request's wait: "sleep_ms"
    label: str  # one run, by its size: "{} workers"
    rule: str  # the expectation in words: "workers / sleep"
    grown: str  # the size, in the problem when the rate does not follow it: "the workers"
    grown_ok: str  # the size, in the reason it holds: "the workers"
    tolerance: float

    def expected(self, run: Mapping, setup: Mapping) -> float:
        """The rate this run's size should give, in requests/s."""
        return run[self.size] / (setup[self.wait_ms] / 1000)


BY_WORKERS = Proportional(
    size="workers",
    wait_ms="sleep_ms",
    label="{} workers",
    rule="workers / sleep",
    grown="the workers",
    grown_ok="the workers",
    tolerance=POOL_TOLERANCE,
)


def _follows_size(
    problems: Problems,
    name: str,
    runs: list[Mapping],
    rule: Proportional,
    setup: Mapping,
    each: Callable[[Mapping], None] | None = None,
) -> str:
    """Each run's rate within the tolerance of what its size should give, and twice the size
    twice the rate (runs sorted by size); the reason it holds. `each` adds a run's other
    problems, after its rate's."""
    for run in runs:
        expected = rule.expected(run, setup)
        if abs(run["rps"] / expected - 1) > rule.tolerance:
            problems.add(
                f"{rule.label.format(run[rule.size])}: {_rate(run['rps'])}, "
                f"{run['rps'] / expected:.0%} of {rule.rule} = {_rate(expected)} "
                f"(needs within {rule.tolerance:.0%})",
                name,
            )
        if each is not None:
            each(run)
    ok = ", ".join(
        f"{rule.label.format(run[rule.size])} {_rate(run['rps'])} "
        f"({run['rps'] / rule.expected(run, setup):.0%} of {rule.rule})"
        for run in runs
    )
    if len(runs) >= 2:
        factor = runs[-1][rule.size] / runs[0][rule.size]
        ratio = runs[-1]["rps"] / max(runs[0]["rps"], 1e-9)
        if abs(ratio / factor - 1) > rule.tolerance:
            problems.add(
                f"{factor:g}x {rule.grown} gave {ratio:.2f}x the rate "
                f"(needs {factor:g}x within {rule.tolerance:.0%})",
                name,
            )
        ok += f"; {factor:g}x {rule.grown_ok}, {ratio:.2f}x the rate"
    return ok


def check_pool_bound(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """The pool's rate ~ workers / sleep for each size; twice the workers, twice the rate."""
    missing = _missing(figures, [POOL])
    if missing:
        return missing
    runs = sorted(figures[POOL]["runs"], key=lambda run: run["workers"])
    problems = Problems()
    ok = _follows_size(problems, POOL, runs, BY_WORKERS, setup)
    noisy_pool = any(run.get("noisy") for run in runs)
    pool_noise = {
        POOL: {"noisy": noisy_pool, "other_cpu": max(run.get("other_cpu", 0) for run in runs)}
    }
    return _decide(problems, ok, pool_noise, [POOL])


# -- cores -----------------------------------------------------------------------------------


def check_cores(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """The process pool on two cores >= CORES_RATIO x the threaded server on /work."""
    if setup.get("cpus", 0) < 2:
        return Verdict(
            INCONCLUSIVE,
            f"not checked: this machine gives {setup.get('cpus', 0)} "
            "CPU(s) to the server, the lesson needs 2",
        )
    missing = _missing(figures, [POOL, OS_THREADS])
    if missing:
        return missing
    pool, threaded = figures[POOL], figures[OS_THREADS]
    ratio = pool["rps"] / max(threaded["rps"], 1e-9)
    used = ", ".join(f"{name} {figure['server_cores']:.2f}" for name, figure in figures.items())
    text = (
        f"the process pool answered {ratio:.2f}x the threaded server ({_rate(pool['rps'])} vs "
        f"{_rate(threaded['rps'])}); cores used: {used}; the load generator shared the cores "
        f"and took {pool['loadgen_cores']:.2f} of a core"
    )
    if threaded["other_cores"] > setup["cpus"] - 1:
        # Others took more than the one core threads can use: the threaded figure is too low.
        return Verdict(
            INCONCLUSIVE,
            f"{text}; but other processes took "
            f"{threaded['other_cores']:.2f} cores during the threaded run, so its one "
            "core was not free",
        )
    if ratio >= CORES_RATIO:
        return Verdict(HOLDS, text)
    # Not enough: was there a second core to use? Cores the server could have had = its
    # allotment minus what others (load generator excluded) took.
    available = setup["cpus"] - pool["other_cores"]
    if available < CORES_AVAILABLE:
        return Verdict(
            INCONCLUSIVE,
            f"{text}; the machine could not give 2 quiet cores: other "
            f"processes took {pool['other_cores']:.2f} cores during the pool's run",
        )
    return Verdict(FAILS, f"{text} (needs {CORES_RATIO:g}x)")


# -- many-clients ----------------------------------------------------------------------------


def check_many_clients(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Every connection of every model answered in the window; the longest waits reported."""
    if not figures:
        return Verdict(INCONCLUSIVE, "not checked: no model measured")
    problems = Problems()
    for name, figure in figures.items():
        if figure["answered"] < figure["connections"]:
            how = "still waiting after" if figure["longest_wait_unanswered"] else "waited"
            problems.add(
                f"{name} answered {figure['answered']}/{figure['connections']} "
                f"connections (a request {how} {figure['longest_wait_s']:.1f} s)",
                name,
            )
    ok = (
        f"every connection answered in the {setup['window_s']:g} s window; longest wait: "
        + ", ".join(
            f"{name} {_ms(figure['longest_wait_s'] * 1000)}" for name, figure in figures.items()
        )
    )
    return _decide(problems, ok, figures, list(figures))


# -- blocked-loop ----------------------------------------------------------------------------


def check_blocked_loop(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Each event loop's echo p99 >= the /work time and >= 10x alone, its loop blocked;
    threaded's below the /work time."""
    loops = [name for name in EVENT_LOOPS if name in figures]
    missing = _missing(figures, [OS_THREADS, *(() if loops else EVENT_LOOPS)])
    if missing:
        return missing
    work = setup["work_ms"]
    threads = figures[OS_THREADS]
    problems = Problems()
    for name in loops:
        _check_loop_blocked(name, figures[name], work, problems)
    preempted, trade_off = _preemption(threads, work)
    if not preempted:
        problems.add(trade_off, OS_THREADS)
    ok = "; ".join(
        f"{name}'s echo p99 {_ms(loop['echo_p99_ms'])} >= the /work time {_ms(work)} and "
        f"{loop['echo_p99_ms'] / max(loop['echo_p99_alone_ms'], 1e-9):.0f}x its p99 without "
        f"/work ({_ms(loop['echo_p99_alone_ms'])}), the loop blocked "
        f"{loop.get('blocked_s') or 0:.1f} s of a {loop.get('blocked_span_s', 0):.1f} s run"
        for name, loop in ((name, figures[name]) for name in loops)
    )
    ok += f"; {trade_off}"
    used = {**{name: figures[name] for name in loops}, OS_THREADS: _threads_noise(threads)}
    return _decide(problems, ok, used, [*loops, OS_THREADS])


def _check_loop_blocked(name: str, loop: Mapping, work: float, problems: Problems) -> None:
    """What one event loop's figures must show: echo waited for /work, the probe saw it."""
    if loop["echo_p99_ms"] < work:
        problems.add(
            f"{name}'s echo p99 {_ms(loop['echo_p99_ms'])} is below the /work time {_ms(work)}",
            name,
        )
    if loop["echo_p99_ms"] < BLOCKED_FACTOR * loop["echo_p99_alone_ms"]:
        problems.add(
            f"{name}'s echo p99 {_ms(loop['echo_p99_ms'])} is only "
            f"{loop['echo_p99_ms'] / max(loop['echo_p99_alone_ms'], 1e-9):.1f}x its "
            f"p99 without /work ({_ms(loop['echo_p99_alone_ms'])}; needs "
            f"{BLOCKED_FACTOR:g}x)",
            name,
        )
    blocked = loop.get("blocked_s")
    if blocked is None:
        # Not a measurement: no noise excuses a missing metric.
        problems.add(f"{name}'s /metrics gave no arena_event_loop_blocked_seconds_total")
    elif blocked <= 0:
        problems.add(f"{name}'s arena_event_loop_blocked_seconds_total did not rise", name)


def _interval(figure: Mapping) -> str:
    interval = figure.get("switch_interval_s")
    return f"{interval * 1000:g} ms" if interval else "its"


def _preemption(threads: Mapping, work: float) -> tuple[bool, str]:
    """Is the threaded server's echo p99 below the /work time: at the server's own switch
    interval, or else at CPython's (a longer interval chosen for fairness preempts later)?"""
    own = threads["echo_p99_ms"]
    at_cpython = threads.get("at_cpython_interval")
    if own < work:
        return True, (
            f"{OS_THREADS}'s echo p99 {_ms(own)} stays below it (switch interval "
            f"{_interval(threads)})"
        )
    if at_cpython and at_cpython["echo_p99_ms"] < work:
        return True, (
            f"{OS_THREADS}'s echo p99 stays below it at CPython's "
            f"{_interval(at_cpython)} switch interval ({_ms(at_cpython['echo_p99_ms'])})"
            f", not at the server's {_interval(threads)} ({_ms(own)}): a longer "
            "interval (fewer hand-overs between many busy threads) lets a long "
            "request hold the GIL longer: the trade-off"
        )
    cpython = (
        f", {_ms(at_cpython['echo_p99_ms'])} at CPython's {_interval(at_cpython)}"
        if at_cpython
        else ""
    )
    return False, (
        f"{OS_THREADS}'s echo p99 {_ms(own)} (switch interval {_interval(threads)})"
        f"{cpython} is not below the /work time {_ms(work)}"
    )


def _threads_noise(threads: Mapping) -> Mapping:
    """The threaded figures' noise, its run at CPython's switch interval included."""
    at_cpython = threads.get("at_cpython_interval") or {}
    return {
        "noisy": threads.get("noisy") or at_cpython.get("noisy", False),
        "other_cpu": max(threads.get("other_cpu", 0), at_cpython.get("other_cpu", 0)),
    }


# -- closed-loop -----------------------------------------------------------------------------


def check_closed_loop(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Per model: open-loop p99 >= STALL_OPEN_SHARE x the stall, closed-loop p99 below
    STALL_CLOSED_SHARE x the stall."""
    if not figures:
        return Verdict(INCONCLUSIVE, "not checked: no model measured")
    stall = setup["stall_ms"]
    problems = Problems()
    for name, figure in figures.items():
        if figure["open_p99_ms"] < STALL_OPEN_SHARE * stall:
            problems.add(
                f"{name}'s open-loop p99 {_ms(figure['open_p99_ms'])} is below "
                f"{STALL_OPEN_SHARE:.0%} of the {_ms(stall)} stall",
                name,
            )
        if figure["closed_p99_ms"] > STALL_CLOSED_SHARE * stall:
            problems.add(
                f"{name}'s closed-loop p99 {_ms(figure['closed_p99_ms'])} is above "
                f"{STALL_CLOSED_SHARE:.0%} of the {_ms(stall)} stall",
                name,
            )
    ok = "; ".join(
        f"{name}: p99 {_ms(f['open_p99_ms'])} open loop, {_ms(f['closed_p99_ms'])} closed loop "
        f"(its max {_ms(f['closed_max_ms'])})"
        for name, f in figures.items()
    )
    return _decide(problems, f"{ok}; the stall {_ms(stall)}", figures, list(figures))


# -- the database lessons --------------------------------------------------------------------


def _no_database(setup: Mapping) -> Verdict | None:
    """Inconclusive when the run had no PostgreSQL to query (the reason says how to get one)."""
    problem = setup.get("database_unavailable")
    return Verdict(INCONCLUSIVE, f"not checked: {problem}") if problem else None


def _errors(problems: Problems, name: str, figure: Mapping, what: str = "") -> None:
    """A /db answered with ERR (backend-busy, backend-unavailable) is a failed request."""
    if figure.get("errors"):
        problems.add(f"{name}{what} answered {figure['errors']:,} requests with an error", name)


def db_bound(setup: Mapping) -> float:
    """What the database pool allows: its connections / the query time, in requests/s."""
    return setup["db_pool"] / (setup["db_ms"] / 1000)


def check_db_wait(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Switching models >= DB_IDEAL_SHARE x pool / query time; the worker pool at most
    workers / query time."""
    unavailable = _no_database(setup)
    if unavailable:
        return unavailable
    switching = switching_models(figures)
    if not figures:
        return Verdict(INCONCLUSIVE, "not checked: no model measured")
    bound = db_bound(setup)
    problems = Problems()
    for name in switching:
        rps = figures[name]["rps"]
        if rps < DB_IDEAL_SHARE * bound:
            problems.add(
                f"{name} {_rate(rps)} is {rps / bound:.0%} of database pool / query time "
                f"{_rate(bound)} (needs {DB_IDEAL_SHARE:.0%})",
                name,
            )
        _errors(problems, name, figures[name])
    parts = [
        f"{name} {_rate(figures[name]['rps'])} ({figures[name]['rps'] / bound:.0%})"
        for name in switching
    ]
    ok = (", ".join(parts) + f" of database pool / query time {_rate(bound)}") if parts else ""
    if POOL in figures:
        workers = setup["pool_workers"] / (setup["db_ms"] / 1000)
        rps = figures[POOL]["rps"]
        if rps > (1 + DB_POOL_SLACK) * workers:
            problems.add(
                f"the pool's {_rate(rps)} is above workers / query time {_rate(workers)} "
                f"(+{DB_POOL_SLACK:.0%})",
                POOL,
            )
        _errors(problems, POOL, figures[POOL])
        ok += ("; " if ok else "") + (
            f"the pool {_rate(rps)} with {setup['pool_workers']} workers "
            f"(workers / query time {_rate(workers)})"
        )
    return _decide(problems, ok, figures, list(figures))


BY_DB_POOL = Proportional(
    size="db_pool",
    wait_ms="db_ms",
    label="pool of {}",
    rule="pool / query time",
    grown="the database pool",
    grown_ok="the pool",
    tolerance=DB_POOL_TOLERANCE,
)


def check_db_pool_bound(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """The rate ~ database pool / query time for each pool size; twice the pool, twice the
    rate."""
    unavailable = _no_database(setup)
    if unavailable:
        return unavailable
    name = setup.get("db_model", "")
    if name not in figures:
        return Verdict(INCONCLUSIVE, "not checked: needs a switching model (narrowed by --models)")
    runs = sorted(figures[name]["runs"], key=lambda run: run["db_pool"])
    problems = Problems()
    ok = _follows_size(
        problems,
        name,
        runs,
        BY_DB_POOL,
        setup,
        lambda run: _errors(problems, name, run, f" with a pool of {run['db_pool']}"),
    )
    return _decide(problems, f"{name}: {ok}", figures, [name])


def _driver(figure: Mapping, driver: str) -> Mapping | None:
    return next((run for run in figure["runs"] if run["driver"] == driver), None)


def check_undetected_io(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Per event loop: blocking serves one query at a time, echo waits for it, CPU stays low;
    blocking-fixed and default overlap the queries again and echo stays fast."""
    unavailable = _no_database(setup)
    if unavailable:
        return unavailable
    loops = [name for name in EVENT_LOOPS if name in figures]
    if not loops:
        return Verdict(
            INCONCLUSIVE, "not checked: needs " + ", ".join(EVENT_LOOPS) + " (narrowed by --models)"
        )
    db_ms = setup["db_ms"]
    serial = 1000 / db_ms
    problems = Problems()
    parts = []
    for name in loops:
        figure = figures[name]
        blocking, work = _driver(figure, BLOCKING), _driver(figure, WORK_REFERENCE)
        if blocking is not None:
            if blocking["db_rps"] > UNDETECTED_SERIAL_FACTOR * serial:
                problems.add(
                    f"{name} with the blocking driver answered {_rate(blocking['db_rps'])} "
                    f"/db, above {UNDETECTED_SERIAL_FACTOR:g}x one query at a time "
                    f"({_rate(serial)})",
                    name,
                )
            if blocking["echo_p99_ms"] < db_ms:
                problems.add(
                    f"{name}'s echo p99 with the blocking driver {_ms(blocking['echo_p99_ms'])} "
                    f"is below the query time {_ms(db_ms)}",
                    name,
                )
            if work is not None and blocking["server_cores"] > (
                UNDETECTED_CPU_SHARE * work["server_cores"]
            ):
                problems.add(
                    f"{name}'s server CPU with the blocking driver {blocking['server_cores']:.2f} "
                    f"cores is not below {UNDETECTED_CPU_SHARE:.0%} of its CPU blocked by /work "
                    f"({work['server_cores']:.2f})",
                    name,
                )
            _errors(problems, name, blocking, " with the blocking driver")
            cpu = f", CPU {blocking['server_cores']:.2f} cores" + (
                f" vs {work['server_cores']:.2f} blocked by /work" if work else ""
            )
            parts.append(
                f"{name} blocking {_rate(blocking['db_rps'])} /db, echo p99 "
                f"{_ms(blocking['echo_p99_ms'])}{cpu}"
            )
        for driver in (BLOCKING_FIXED, DEFAULT_DRIVER):
            run = _driver(figure, driver)
            if run is None:
                continue
            bound = run["bound_rps"]
            if run["db_rps"] < DB_IDEAL_SHARE * bound:
                problems.add(
                    f"{name} with the {driver} driver answered {_rate(run['db_rps'])} /db, "
                    f"{run['db_rps'] / bound:.0%} of the {_rate(bound)} set by its "
                    f"{run['bound_by']} (needs {DB_IDEAL_SHARE:.0%})",
                    name,
                )
            if run["echo_p99_ms"] >= UNDETECTED_FAST_SHARE * db_ms:
                problems.add(
                    f"{name}'s echo p99 with the {driver} driver {_ms(run['echo_p99_ms'])} is "
                    f"not below {UNDETECTED_FAST_SHARE:.0%} of the query time {_ms(db_ms)}",
                    name,
                )
            _errors(problems, name, run, f" with the {driver} driver")
            parts.append(
                f"{driver} {_rate(run['db_rps'])} ({run['db_rps'] / bound:.0%} of its "
                f"{run['bound_by']}), echo p99 {_ms(run['echo_p99_ms'])}"
            )
    return _decide(problems, "; ".join(parts), figures, loops)


CHECKS: Mapping[str, Callable[[Mapping[str, Mapping], Mapping], Verdict]] = {
    "io-wait": check_io_wait,
    "cpu-work": check_cpu_work,
    "pool-bound": check_pool_bound,
    "cores": check_cores,
    "many-clients": check_many_clients,
    "blocked-loop": check_blocked_loop,
    "closed-loop": check_closed_loop,
    "db-wait": check_db_wait,
    "db-pool-bound": check_db_pool_bound,
    "undetected-io": check_undetected_io,
}
# Each lesson's claim in numbers: a template over its setup, the thresholds above and the
# figures derived from both (`hypothesis_values`), so every claim reads the constants its check
# decides with.
HYPOTHESES: Mapping[str, str] = {
    "io-wait": (
        "On /sleep {sleep_ms} with {connections} connections, every model but the pool answers "
        ">= {IO_SPEEDUP:g}x a pool of {pool_workers} workers, and each >= {IO_IDEAL_SHARE:.0%} "
        "of the ideal {ideal} (connections / sleep)."
    ),
    "cpu-work": (
        "On one core, /work of {work_ms:.2f} ms with {connections} connections: the models that "
        "switch between connections are within {CPU_SPREAD:.0%} of each other, and no model "
        "goes above one core's worth ({worth}, +{CORE_SLACK:.0%} for the calibration)."
    ),
    "pool-bound": (
        "On /sleep {sleep_ms} with {connections} connections, a pool of {sizes} workers answers "
        "workers / sleep (within {POOL_TOLERANCE:.0%}), so doubling the workers doubles the "
        "rate; the switching models serve every connection."
    ),
    "cores": (
        "With the server given {cpus} cores, /work of {work_ms:.2f} ms and {connections} "
        "connections: a pool of {pool_workers} worker processes answers >= {CORES_RATIO:g}x the "
        "threaded server."
    ),
    "many-clients": (
        "With {connections} connections sending echo without pause, every connection of every "
        "model gets a reply within the {window_s:g} s window (none starved); the longest wait is "
        "reported per model."
    ),
    "blocked-loop": (
        "With {connections} connections sending {work_share:.0%} /work of {work_ms:.0f} ms among "
        "echo requests, the echo p99 of each event loop ({event_loops}) reaches the /work time "
        "and >= {BLOCKED_FACTOR:g}x its echo p99 without /work, and its "
        "arena_event_loop_blocked_seconds_total rises; {OS_THREADS}'s echo p99 stays below the "
        "/work time, measured at the server's own GIL switch interval and at CPython's "
        "{cpython_switch_ms:g} ms (a longer interval, chosen for fairness, preempts later: the "
        "trade-off is shown)."
    ),
    "closed-loop": (
        "With the server stopped (SIGSTOP) for {stall_ms:g} ms in the middle of a run on "
        "{connections} connections: on a timetable of {rate:,} requests/s (open loop, each "
        "timed from when it was due) the p99 reaches >= {STALL_OPEN_SHARE:.0%} of the stall; "
        "the same stall under a closed loop leaves the p99 below {STALL_CLOSED_SHARE:.0%} of it "
        "(each connection waits once)."
    ),
    "db-wait": (
        "On /db {db_ms} with {connections} connections and a database pool of {db_pool} "
        "connections per server, every model but the pool answers >= {DB_IDEAL_SHARE:.0%} of "
        "database pool / query time ({db_bound}); a pool of {pool_workers} workers at most "
        "workers / query time ({workers_bound}, +{DB_POOL_SLACK:.0%})."
    ),
    "db-pool-bound": (
        "On /db {db_ms} with {connections} connections, {db_model} with a database pool of "
        "{db_sizes} connections answers pool / query time for each (within "
        "{DB_POOL_TOLERANCE:.0%}), so doubling the pool doubles the rate."
    ),
    "undetected-io": (
        "On {connections} connections sending /db {db_ms} and echo half and half, each event "
        "loop ({event_loops}) with --db-driver blocking answers at most "
        "{UNDETECTED_SERIAL_FACTOR:g}x one query at a time ({serial}), its echo p99 reaches "
        "the query time and its server CPU stays below {UNDETECTED_CPU_SHARE:.0%} of the same "
        "mix with /work of {work_ms:.0f} ms in place of /db (blocked-loop's block, computed); "
        "with blocking-fixed it answers >= {DB_IDEAL_SHARE:.0%} of what its helper threads "
        "allow ({fixed}), with default >= {DB_IDEAL_SHARE:.0%} of database pool / query time "
        "({db_bound}), both with echo p99 below {UNDETECTED_FAST_SHARE:.0%} of the query time."
    ),
}


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """What a claim's template may name: the setup, the thresholds, figures derived from them."""
    values: dict[str, object] = {
        name: value for name, value in globals().items() if name.isupper() and name.isidentifier()
    }
    values.update(
        setup,
        cpus=setup.get("cpus", 2),
        cpython_switch_ms=CPYTHON_SWITCH_INTERVAL * 1000,
        event_loops=", ".join(EVENT_LOOPS),
    )
    if setup.get("sleep_ms") and setup.get("connections"):
        values["ideal"] = _rate(setup["connections"] / (setup["sleep_ms"] / 1000))
    if setup.get("work_ms"):
        values["worth"] = _rate(1000 / setup["work_ms"])
    if setup.get("db_ms"):
        values["serial"] = _rate(1000 / setup["db_ms"])
        if isinstance(setup.get("db_pool"), int):
            values["db_bound"] = _rate(db_bound(setup))
        if isinstance(setup.get("pool_workers"), int):
            values["workers_bound"] = _rate(setup["pool_workers"] / (setup["db_ms"] / 1000))
        if isinstance(setup.get("db_pool"), list | tuple):
            values["db_sizes"] = " and ".join(str(size) for size in setup["db_pool"])
    if setup.get("db_ms") and isinstance(setup.get("db_pool"), int):
        helpers = setup.get("helper_threads") or {}
        values["fixed"] = ", ".join(
            f"{name} {count} {'threads' if name in helpers else 'connections'} / "
            f"{setup['db_ms']} ms = {_rate(count / (setup['db_ms'] / 1000))}"
            for name, count in {
                **dict.fromkeys(EVENT_LOOPS, setup.get("db_pool", 0)),
                **helpers,
            }.items()
        )
    workers = setup.get("pool_workers")
    if isinstance(workers, list | tuple):
        values["sizes"] = " and ".join(str(size) for size in workers)
    return values


def hypothesis(lesson_id: str, setup: Mapping) -> str:
    """The claim of one lesson in numbers, for this setup."""
    return HYPOTHESES[lesson_id].format_map(hypothesis_values(setup))


def decide(lesson_id: str, figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """The verdict of one lesson."""
    return CHECKS[lesson_id](figures, setup)

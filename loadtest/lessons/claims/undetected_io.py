"""undetected-io: a database driver the loop cannot see blocks every connection, using no CPU.

Measured per event loop alone on one core, UNDETECTED_CONNECTIONS connections sending /db of
rig.DB_MS and echo half and half, once per --db-driver (blocking, blocking-fixed, default), then
with /work as long in place of /db: the /db rate against what should bound it, echo's p99, the
server's CPU and the loop's blocked seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog, rig
from loadtest.lessons.charts import (
    ECHO_P99,
    ERRORS,
    LOOP_BLOCKED,
    NOISE,
    SERVER_CORES,
    Column,
    Rows,
    bars,
    legend_line,
    log_durations,
    marks,
    ms_number,
    one_row_per_run,
    percent,
    unlabelled_bars,
)
from loadtest.lessons.rig import (
    DB_MS,
    DB_POOL,
    DEFAULT_DRIVER,
    MIN_WINDOW_S,
    Planned,
    Run,
    Work,
    add_blocked_seconds,
    db_args,
    noise_of_parts,
)
from loadtest.lessons.verdict import (
    DB_IDEAL_SHARE,
    EVENT_LOOPS,
    INCONCLUSIVE,
    Problems,
    Verdict,
    add_errors,
    decide_with_noise,
    ms_text,
    no_database,
    rate_text,
)

ID = "undetected-io"
DATABASE = True  # its servers query the run's PostgreSQL
LESSON = catalog.get(ID, {entry.id: entry for entry in catalog.DB_CHECKED})

# UNDETECTED_CONNECTIONS connections sending /db and echo half and half, per --db-driver, and
# the same mix with /work of DB_MS in place of /db.
UNDETECTED_CONNECTIONS, UNDETECTED_DB_WEIGHT, UNDETECTED_ECHO_WEIGHT = 40, 1, 1
BLOCKING, BLOCKING_FIXED = "blocking", "blocking-fixed"
DRIVERS = (BLOCKING, BLOCKING_FIXED, DEFAULT_DRIVER)
WORK_REFERENCE = "work"  # the run with /work in place of /db: blocked-loop's block
# asyncio's blocking-fixed hands each query to the loop's default executor, whose threads bound
# it (services/servers/eventloop.py); gevent's (psycogreen) waits through the hub: only the
# database pool bounds it.
HELPER_THREADS_MODEL = "asyncio"
# With the blocking driver: at most UNDETECTED_SERIAL_FACTOR x one query at a time, echo p99 >=
# the query time, server CPU below UNDETECTED_CPU_SHARE of the same mix with /work in place of
# /db. With blocking-fixed and default: >= DB_IDEAL_SHARE of what the helper threads or the
# database pool allow, echo p99 below UNDETECTED_FAST_SHARE of the query time: no echo waits
# for a whole query. (Half the query time was a margin, not the mechanism: over ten quick runs
# here the drivers the loop can switch around showed echo p99 of 0.8-5.5 ms with one of 8.8 ms
# and one of 12.6 ms on a 20 ms query, the blocking driver 410-730 ms.)
UNDETECTED_SERIAL_FACTOR = 1.2
UNDETECTED_CPU_SHARE = 0.5
UNDETECTED_FAST_SHARE = 1.0

HYPOTHESIS = (
    "On {connections} connections sending /db {db_ms} and echo half and half, each event "
    "loop ({event_loops}) with --db-driver blocking answers at most "
    "{UNDETECTED_SERIAL_FACTOR:g}x one query at a time ({serial}), its echo p99 reaches "
    "the query time and its server CPU stays below {UNDETECTED_CPU_SHARE:.0%} of the same "
    "mix with /work of {work_ms:.0f} ms in place of /db (blocked-loop's block, computed); "
    "with blocking-fixed it answers >= {DB_IDEAL_SHARE:.0%} of what its helper threads "
    "allow ({fixed}), with default >= {DB_IDEAL_SHARE:.0%} of database pool / query time "
    "({db_bound}), both with echo p99 below the query time: no echo waits for a whole query."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """One query at a time, and what each event loop's helper threads or database pool allow."""
    values: dict[str, object] = {}
    if setup.get("db_ms"):
        values["serial"] = rate_text(1000 / setup["db_ms"])
    if setup.get("db_ms") and isinstance(setup.get("db_pool"), int):
        helpers = setup.get("helper_threads") or {}
        values["fixed"] = ", ".join(
            f"{name} {count} {'threads' if name in helpers else 'connections'} / "
            f"{setup['db_ms']} ms = {rate_text(count / (setup['db_ms'] / 1000))}"
            for name, count in {
                **dict.fromkeys(EVENT_LOOPS, setup.get("db_pool", 0)),
                **helpers,
            }.items()
        )
    return values


def _setup(loops: Sequence[str], work: Work) -> dict[str, Any]:
    """The setup: the mix, the database pool, the helper threads, the /work size."""
    rounds = work.rounds_1ms * DB_MS
    return {
        "connections": UNDETECTED_CONNECTIONS,
        "db_ms": DB_MS,
        "db_pool": DB_POOL,
        "db_share": UNDETECTED_DB_WEIGHT / (UNDETECTED_DB_WEIGHT + UNDETECTED_ECHO_WEIGHT),
        "helper_threads": (
            {HELPER_THREADS_MODEL: rig.helper_threads()} if HELPER_THREADS_MODEL in loops else {}
        ),
        "work_ms": rounds * work.round_ns / 1e6,
        "work_rounds": rounds,
        "cores": 1,
    }


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """Each event loop on /db and echo per --db-driver, then /work for /db."""
    loops = [m for m in EVENT_LOOPS if m in models]
    setup = _setup(loops, work)
    echo = bench_scenarios.echo(64, UNDETECTED_ECHO_WEIGHT)
    mix = Scenario(
        ID,
        f"/db {DB_MS} + echo",
        UNDETECTED_CONNECTIONS,
        (bench_scenarios.db(DB_MS, UNDETECTED_DB_WEIGHT), echo),
    )
    computed = Scenario(
        ID,
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
                db_args(DB_POOL, driver),
                mix,
                scrape=True,
                min_window=MIN_WINDOW_S,
                database=True,
            )
            for driver in DRIVERS
        ]
        runs.append(Run(m, WORK_REFERENCE, (), computed, scrape=True, min_window=MIN_WINDOW_S))
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """One part per driver (and /work)."""
    figure.setdefault("runs", []).append(_run_figures(run, summary, base, setup))


def _run_figures(run: Run, summary: Mapping, base: Mapping, setup: Mapping) -> dict:
    """One driver (or /work in place of /db): the slow request's rate, echo's
    latency, the server's CPU, the loop's blocked seconds, and what should bound the rate."""
    slow, echo = summary["kinds"]
    answered = slow["requests"] + echo["requests"]
    rate = summary["rps"] * slow["requests"] / max(answered, 1)
    db_ms = setup["db_ms"]
    if run.variant == WORK_REFERENCE:
        bound, bound_by = 1000 / setup["work_ms"], "one core"
    elif run.variant == BLOCKING:
        bound, bound_by = 1000 / db_ms, "one query at a time"
    elif run.variant == BLOCKING_FIXED and run.model in setup["helper_threads"]:
        threads = min(setup["helper_threads"][run.model], setup["db_pool"])
        bound, bound_by = threads / (db_ms / 1000), f"{threads} helper threads"
    else:
        bound, bound_by = setup["db_pool"] / (db_ms / 1000), "database pool"
    part = {
        "driver": run.variant,
        **base,
        ("work_rps" if run.variant == WORK_REFERENCE else "db_rps"): round(rate, 1),
        "bound_rps": round(bound, 1),
        "bound_by": bound_by,
        "of_bound": round(rate / bound, 3),
        "echo_p99_ms": round(echo["latency_us"]["p99"] / 1e3, 2),
        "echo_p50_ms": round(echo["latency_us"]["p50"] / 1e3, 3),
        "server_cores": round(summary["server_cpu_fraction"], 3),
        "cpu_ms_per_request": round(summary["server_cpu_us_per_request"] / 1e3, 3),
    }
    add_blocked_seconds(part, summary)
    return part


settle = noise_of_parts  # each event loop's figure joins one run per driver


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Per event loop: blocking serves one query at a time, echo waits for it, CPU stays low;
    blocking-fixed and default overlap the queries again and echo stays fast."""
    unavailable = no_database(setup)
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
                    f"{name} with the blocking driver answered {rate_text(blocking['db_rps'])} "
                    f"/db, above {UNDETECTED_SERIAL_FACTOR:g}x one query at a time "
                    f"({rate_text(serial)})",
                    name,
                    miss=math.inf,  # others' CPU cannot make queries overlap
                )
            if blocking["echo_p99_ms"] < db_ms:
                problems.add(
                    f"{name}'s echo p99 with the blocking driver "
                    f"{ms_text(blocking['echo_p99_ms'])} is below the query time {ms_text(db_ms)}",
                    name,
                    miss=math.inf,  # others' CPU only adds waiting
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
            add_errors(problems, name, blocking, " with the blocking driver")
            cpu = f", CPU {blocking['server_cores']:.2f} cores" + (
                f" vs {work['server_cores']:.2f} blocked by /work" if work else ""
            )
            parts.append(
                f"{name} blocking {rate_text(blocking['db_rps'])} /db, echo p99 "
                f"{ms_text(blocking['echo_p99_ms'])}{cpu}"
            )
        for driver in (BLOCKING_FIXED, DEFAULT_DRIVER):
            run = _driver(figure, driver)
            if run is None:
                continue
            bound = run["bound_rps"]
            if run["db_rps"] < DB_IDEAL_SHARE * bound:
                problems.add(
                    f"{name} with the {driver} driver answered {rate_text(run['db_rps'])} /db, "
                    f"{run['db_rps'] / bound:.0%} of the {rate_text(bound)} set by its "
                    f"{run['bound_by']} (needs {DB_IDEAL_SHARE:.0%})",
                    name,
                    miss=DB_IDEAL_SHARE * bound / max(run["db_rps"], 1e-9),
                )
            if run["echo_p99_ms"] >= UNDETECTED_FAST_SHARE * db_ms:
                problems.add(
                    f"{name}'s echo p99 with the {driver} driver {ms_text(run['echo_p99_ms'])} is "
                    f"not below the query time {ms_text(db_ms)}",
                    name,
                    miss=run["echo_p99_ms"] / (UNDETECTED_FAST_SHARE * db_ms),
                )
            add_errors(problems, name, run, f" with the {driver} driver")
            parts.append(
                f"{driver} {rate_text(run['db_rps'])} ({run['db_rps'] / bound:.0%} of its "
                f"{run['bound_by']}), echo p99 {ms_text(run['echo_p99_ms'])}"
            )
    return decide_with_noise(problems, "; ".join(parts), figures, loops)


def _driver(figure: Mapping, driver: str) -> Mapping | None:
    return next((run for run in figure["runs"] if run["driver"] == driver), None)


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """Per event loop, blocking against /work (CPU side by side), then the drivers that
    overlap the queries again."""
    parts = [_loop_reading(name, figures[name], setup) for name in EVENT_LOOPS if figures.get(name)]
    return " ".join(parts) if parts else "(no model measured)"


def _loop_reading(name: str, figure: Mapping, setup: Mapping) -> str:
    """One event loop: its blocking driver's reading, then its fixes'."""
    runs = {run["driver"]: run for run in figure["runs"]}
    text = f"{name}: "
    blocking = runs.get(BLOCKING)
    if blocking:
        text += _blocking_reading(blocking, runs.get(WORK_REFERENCE), setup)
    fixes = [
        f"{driver} {run['db_rps']:,.0f} /db a second ({percent(run['of_bound'])} of the "
        f"{run['bound_rps']:,.0f} set by its {run['bound_by']}), echo p99 "
        f"{ms_number(run['echo_p99_ms'])} ms"
        for driver, run in runs.items()
        if driver in (BLOCKING_FIXED, DEFAULT_DRIVER)
    ]
    if fixes:
        text += "A driver it can switch around overlaps the queries again: " + "; ".join(fixes)
        text += "."
    return text.strip()


def _blocking_reading(blocking: Mapping, work: Mapping | None, setup: Mapping) -> str:
    """--db-driver blocking: one query at a time, echo behind it, little CPU
    (against /work in place of /db when measured)."""
    text = (
        f"with --db-driver blocking its loop waits inside each query, so it answers "
        f"{blocking['db_rps']:,.0f} /db a second (one {setup['db_ms']} ms query at a "
        f"time: {1000 / setup['db_ms']:,.0f}) and an echo waits behind them: p99 "
        f"{ms_number(blocking['echo_p99_ms'])} ms"
        + (
            f", the loop blocked {blocking['blocked_s']:.1f} s of "
            f"{blocking.get('blocked_span_s', 0):.1f} s"
            if "blocked_s" in blocking
            else ""
        )
        + f". Its CPU: {blocking['server_cores']:.2f} cores"
    )
    if work:
        text += (
            f", against {work['server_cores']:.2f} with /work of "
            f"{setup['work_ms']:.0f} ms in place of /db (blocked-loop's block, echo p99 "
            f"{ms_number(work['echo_p99_ms'])} ms): the same stalled loop, but waiting, not "
            "computing, so a CPU graph shows nothing wrong"
        )
    return text + ". "


def _slow_rps(figure: Mapping) -> float:
    """The rate of /db, or of /work in the run that computes instead."""
    return figure["db_rps"] if "db_rps" in figure else figure["work_rps"]


def _driver_label(model: str, figure: Mapping) -> str:
    """`gevent, blocking`, or `gevent, /work 20 ms` for the run that computes instead."""
    if figure["driver"] == WORK_REFERENCE:
        return f"{model}, /work (blocked-loop)"
    return f"{model}, {figure['driver']}"


COLUMNS: list[Column] = [
    ("/db (or /work) req/s", lambda f: f"{_slow_rps(f):,.0f}"),
    ("bound", lambda f: f"{f['bound_rps']:,.0f} ({f['bound_by']})"),
    ECHO_P99,
    SERVER_CORES,
    LOOP_BLOCKED,
    ERRORS,
    NOISE,
]


def rows(figures: Mapping[str, Mapping]) -> Rows:
    """A row per event loop and driver (and /work)."""
    return one_row_per_run(figures, _driver_label)


PANELS = 3  # the chart's panels, side by side


def chart(axes, entry: Mapping) -> None:
    """Per driver: the rate against its bound, echo p99, and the server's CPU."""
    setup = entry["setup"]
    pairs = rows(entry["figures"])
    labels = [label for label, _ in pairs]
    noisy = [f["noisy"] for _, f in pairs]
    bounds = [f["bound_rps"] for _, f in pairs]
    bars(
        axes[0],
        labels,
        [_slow_rps(f) for _, f in pairs],
        noisy,
        "/db (or /work) requests / s",
        lambda v: f"{v:,.0f}",
        reach=bounds,
    )
    marks(axes[0], bounds)
    axes[0].set_title(
        "rate; red: its bound (one at a time, helper threads, pool, one core)", fontsize=9
    )
    p99s = [max(f["echo_p99_ms"], 0.001) * 1e3 for _, f in pairs]
    axis = axes[1]
    unlabelled_bars(axis, labels, p99s, noisy, lambda v: f" {ms_number(v / 1e3)} ms")
    log_durations(axis)
    axis.set_xlim(min(p99s) / 3, max([*p99s, setup["db_ms"] * 1e3]) * 20)
    legend_line(axis, setup["db_ms"] * 1e3, f"the query time, {setup['db_ms']} ms")
    axis.legend(fontsize=7, loc="lower right")
    axis.set_xlabel("echo p99 (log scale)")
    axis.set_title(f"echo p99, {setup['connections']} connections, /db or /work half", fontsize=9)
    cores = [f["server_cores"] for _, f in pairs]
    axis = axes[2]
    unlabelled_bars(axis, labels, cores, noisy, lambda v: f" {v:.2f}")
    axis.set_xlim(0, max([*cores, 1.0]) * 1.25)
    axis.set_xlabel("server CPU (cores)")
    axis.set_title("server CPU: waiting blocks the loop without computing", fontsize=9)
    axis.grid(axis="x", alpha=0.3)

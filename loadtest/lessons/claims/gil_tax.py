"""gil-tax: many threads contending for the GIL cost CPU per request; the interval is the knob.

Measured with /work of about 1 ms (calibrated here), each model alone with every CPU of the run
(the load generator shares them): the threaded server with one connection (no contention), then
with rig.CPU_CONNECTIONS at CPython's 5 ms switch interval and at SHORT_INTERVAL
(`--switch-interval`, which calls sys.setswitchinterval), and each event loop with as many: the
server CPU per request of each run.

Why it costs: a thread waiting for the GIL waits at most one switch interval, then asks the
running thread to drop it; the running thread is interrupted about /work time / interval times
per request, and every waiting thread wakes each interval to ask again. With 99 threads waiting
and an interval short against the request's CPU time, those wake-ups and hand-overs take a
large share of the CPU. An event loop runs the same requests one after another and pays none.

Why every CPU: on one core a waiting thread asks for the GIL only when the kernel's scheduler
runs it, so the scheduler's slice, not the interval, sets the tax: 1.1-2.4x on an otherwise
quiet core and 3-10x with other processes waking on it (2026-12-07, Linux 6.18, 2 virtual
CPUs; a first version of this lesson on one core held 5 runs of 7). With a second CPU the
waiting threads run beside the holder and ask every interval, as on any multi-core server: 2.2
against 8.7-9.1 ms of CPU per request here, with the machine busy. Fewer than
FREE_CORES_NEEDED free cores: a missing tax is inconclusive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog
from loadtest.lessons.charts import (
    CPU_PER_REQUEST,
    NOISE,
    NOISY_BAR,
    P99,
    RPS,
    SERVER_CORES,
    Column,
    Rows,
    joined,
    legend_line,
    one_row_per_run,
    row_bars,
)
from loadtest.lessons.rig import (
    IO_POOL_WORKERS,
    Planned,
    Run,
    Work,
    cpu_figures,
    noise_of_parts,
    server_args,
    work_1ms,
)
from loadtest.lessons.verdict import (
    CPYTHON_SWITCH_INTERVAL,
    EVENT_LOOPS,
    OS_THREADS,
    Problems,
    Verdict,
    cores_verdict,
    decide_with_noise,
    missing_models,
    ms_text,
)

ID = "gil-tax"
DATABASE = False
LESSON = catalog.LESSONS_BY_ID[ID]

SHORT_INTERVAL = 0.0005  # seconds: short against ~1 ms of /work, so every request is interrupted
# At SHORT_INTERVAL, threaded's CPU per request >= this x its CPU per request with one
# connection, and >= this x each event loop's (measured: 1.1-9x, see the docstring).
TAX_FACTOR = 1.5
# The free cores the tax needs to show: a second CPU where the waiting threads run.
FREE_CORES_NEEDED = 1.5
# The runs of the threaded server, by variant: one connection, then many at each interval.
ONE = "1 connection"
AT_CPYTHON = "switch 5 ms"
AT_SHORT = "switch 0.5 ms"
INTERVALS = {
    ONE: CPYTHON_SWITCH_INTERVAL,
    AT_CPYTHON: CPYTHON_SWITCH_INTERVAL,
    AT_SHORT: SHORT_INTERVAL,
}

HYPOTHESIS = (
    "With the server on {cores} CPUs ({free_cores:.2f} free cores), /work of {work_ms:.2f} ms = "
    "{short_intervals:.1f} intervals of {short_ms:g} "
    "ms: with {connections} connections each request is interrupted about {interrupted} while "
    "{waiting} threads wait for the GIL, so {OS_THREADS}'s server CPU per request at a "
    "{short_ms:g} ms switch interval is >= {TAX_FACTOR:g}x its CPU per request with one "
    "connection and >= {TAX_FACTOR:g}x each event loop's ({event_loops}) on the same load; at "
    "CPython's {cpython_ms:g} ms (/work = {cpython_intervals:.2f} intervals) the tax is smaller."
)


def _times(count: int) -> str:
    """`once`, `twice`, `3 times` (`less than once` for none)."""
    return {0: "less than once", 1: "once", 2: "twice"}.get(count, f"{count} times")


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """The intervals of /work at each switch interval and the threads that wait."""
    work = setup.get("work_ms")
    if not work:
        return {}
    return {
        "short_ms": SHORT_INTERVAL * 1000,
        "cpython_ms": CPYTHON_SWITCH_INTERVAL * 1000,
        "short_intervals": handovers(work, SHORT_INTERVAL),
        "cpython_intervals": handovers(work, CPYTHON_SWITCH_INTERVAL),
        # Rounded: about one interruption per interval the request spans.
        "interrupted": _times(round(handovers(work, SHORT_INTERVAL))),
        "waiting": setup["connections"] - 1,
    }


def handovers(work_ms: float, interval: float) -> float:
    """Times per request the GIL is taken from a thread computing /work: its time / interval."""
    return work_ms / (interval * 1000)


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """/work of about 1 ms on every CPU: threaded alone and contended at two intervals, and
    each event loop contended."""
    setup, many = work_1ms(ID, "/work ~1 ms, all cores", work, IO_POOL_WORKERS, cores=cpus)
    del setup["pool_workers"]  # the pool is not measured: its workers do not share a GIL
    setup.update(
        cpus=cpus, short_interval_s=SHORT_INTERVAL, cpython_interval_s=CPYTHON_SWITCH_INTERVAL
    )
    one = Scenario(
        ID, "/work ~1 ms, 1 connection, all cores", 1, (bench_scenarios.work(work.rounds_1ms),)
    )
    runs = []
    if OS_THREADS in models:
        # Every run names its interval, so an ARENA_SWITCH_INTERVAL here cannot change it.
        runs += [
            Run(
                OS_THREADS,
                variant,
                ("--switch-interval", f"{interval:g}"),
                one if variant == ONE else many,
                two_cores=True,
            )
            for variant, interval in INTERVALS.items()
        ]
    runs += [
        Run(m, "", server_args(m, IO_POOL_WORKERS), many, two_cores=True)
        for m in models
        if m in EVENT_LOOPS
    ]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The server CPU per request: threaded's per run, an event loop's one run."""
    own = {
        "connections": run.scenario.connections,
        **base,
        **cpu_figures(summary),
        "loadgen_cores": round(summary["loadgen_cpu_fraction"], 3),
        # The noise rule reads a share of the server's CPUs: here, of all of them.
        "other_cpu": round(summary["other_cores"] / max(setup["cores"], 1), 3),
    }
    if run.model == OS_THREADS:
        figure.setdefault("runs", []).append(
            {"variant": run.variant, "switch_interval_s": INTERVALS[run.variant], **own}
        )
    else:
        figure.update(own)


settle = noise_of_parts  # threaded's figure joins its three runs


def _by_label(figures: Mapping[str, Mapping]) -> dict[str, Mapping]:
    """Each run's figure by its row label (`threaded, switch 0.5 ms`, `gevent`)."""
    return dict(rows(figures))


def _label(variant: str) -> str:
    return f"{OS_THREADS}, {variant}"


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """At SHORT_INTERVAL threaded's CPU per request >= TAX_FACTOR x with one connection and
    >= TAX_FACTOR x each event loop's; smaller at CPython's interval."""
    loops = [name for name in EVENT_LOOPS if name in figures]
    missing = missing_models(figures, [OS_THREADS, *(() if loops else EVENT_LOOPS)])
    if missing:
        return missing
    runs = _by_label(figures)
    one, cpython, short = (
        runs[_label(variant)]["cpu_ms_per_request"] for variant in (ONE, AT_CPYTHON, AT_SHORT)
    )
    short_ms = SHORT_INTERVAL * 1000
    problems = Problems()
    if short < TAX_FACTOR * one:
        problems.add(
            f"at a {short_ms:g} ms switch interval {OS_THREADS} used {ms_text(short)} of CPU per "
            f"request, {short / max(one, 1e-9):.2f}x its {ms_text(one)} with one connection "
            f"(needs {TAX_FACTOR:g}x)",
            _label(ONE),
            _label(AT_SHORT),
            miss=TAX_FACTOR * one / max(short, 1e-9),
        )
    for name in loops:
        loop = figures[name]["cpu_ms_per_request"]
        if short < TAX_FACTOR * loop:
            problems.add(
                f"at a {short_ms:g} ms switch interval {OS_THREADS}'s {ms_text(short)} of CPU per "
                f"request is {short / max(loop, 1e-9):.2f}x {name}'s {ms_text(loop)} (needs "
                f"{TAX_FACTOR:g}x)",
                _label(AT_SHORT),
                name,
                miss=TAX_FACTOR * loop / max(short, 1e-9),
            )
    if cpython >= short:
        problems.add(
            f"the knob did not work: at CPython's {CPYTHON_SWITCH_INTERVAL * 1000:g} ms "
            f"{OS_THREADS} used {ms_text(cpython)} of CPU per request, not less than the "
            f"{ms_text(short)} at {short_ms:g} ms",
            _label(AT_CPYTHON),
            _label(AT_SHORT),
            miss=cpython / max(short, 1e-9),
        )
    ok = (
        f"at a {short_ms:g} ms switch interval {OS_THREADS} used {ms_text(short)} of CPU per "
        f"request: {short / max(one, 1e-9):.1f}x its {ms_text(one)} with one connection, "
        + ", ".join(
            f"{short / max(figures[name]['cpu_ms_per_request'], 1e-9):.1f}x {name}'s "
            f"{ms_text(figures[name]['cpu_ms_per_request'])}"
            for name in loops
        )
        + f"; at CPython's {CPYTHON_SWITCH_INTERVAL * 1000:g} ms {ms_text(cpython)}"
    )
    if problems:
        unshowable = cores_verdict(
            setup, FREE_CORES_NEEDED, "; ".join(p for _, p, _ in problems) + "; not decided"
        )
        if unshowable:
            return unshowable
    return decide_with_noise(problems, ok, runs, list(runs))


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The tax in milliseconds per request and in hand-overs, against the event loops."""
    work = setup["work_ms"]
    text = f"Each /work computes {work:.2f} ms holding the GIL. "
    threads = figures.get(OS_THREADS)
    if threads:
        runs = {run["variant"]: run for run in threads["runs"]}
        one = runs[ONE]["cpu_ms_per_request"]
        text += (
            f"Alone, a thread needs {ms_text(one)} of server CPU per request. With "
            f"{setup['connections']} connections, {setup['connections'] - 1} threads wait for "
            "the GIL, and each wakes every switch interval to ask for it. "
            + " ".join(_tax_text(v, runs[v], one, work) for v in (AT_CPYTHON, AT_SHORT))
        )
    loops = [name for name in EVENT_LOOPS if name in figures]
    if loops:
        text += (
            " An event loop runs the same requests one after another, with nobody to hand "
            "over to: "
            + joined([f"{name} {ms_text(figures[name]['cpu_ms_per_request'])}" for name in loops])
            + " per request."
        )
    return text.strip()


def _tax_text(variant: str, run: Mapping, one: float, work: float) -> str:
    """One contended run's tax: in ms per request, and per hand-over of the GIL ("" for the
    run with one connection)."""
    if variant == ONE:
        return ""
    interval = INTERVALS[variant]
    spans, cpu = handovers(work, interval), run["cpu_ms_per_request"]
    tax = cpu - one
    if spans < 1:
        how = "most requests end before a waiting thread asks for the GIL"
    else:
        how = f"it is interrupted about {_times(round(spans))}"
    per = f" ({ms_text(tax / spans)} per hand-over)" if spans >= 1 and tax > 0 else ""
    return (
        f"At a {interval * 1000:g} ms interval a request spans {spans:.1f} intervals, so {how}: "
        f"{ms_text(cpu)} per request, a tax of {ms_text(tax)}{per}."
    )


COLUMNS: list[Column] = [
    ("connections", lambda f: f"{f['connections']:,}"),
    (
        "switch interval",
        lambda f: f"{f['switch_interval_s'] * 1000:g} ms" if "switch_interval_s" in f else "-",
    ),
    CPU_PER_REQUEST,
    RPS,
    SERVER_CORES,
    P99,
    NOISE,
]


def rows(figures: Mapping[str, Mapping]) -> Rows:
    """A row per run: threaded's three, one per event loop."""
    return one_row_per_run(figures, lambda model, run: f"{model}, {run['variant']}")


def chart(axes, entry: Mapping) -> None:
    """CPU per request per run; threaded's with one connection as a line."""
    figures, setup = entry["figures"], entry["setup"]
    pairs = rows(figures)
    axis = axes[0]
    row_bars(
        axis, pairs, "cpu_ms_per_request", "server CPU ms per request", lambda v: f"{v:.2f} ms"
    )
    one = dict(pairs).get(_label(ONE))
    if one:
        alone = one["cpu_ms_per_request"]
        axis.axvline(
            alone, color="grey", linestyle="--", linewidth=1, label=f"{OS_THREADS}, one connection"
        )
        legend_line(axis, TAX_FACTOR * alone, f"{TAX_FACTOR:g}x that: the tax the claim needs")
        _legend(axis, any(f["noisy"] for _, f in pairs))
    axis.set_title(
        f"/work {setup['work_ms']:.2f} ms, {OS_THREADS} alone, then {setup['connections']} "
        f"connections; server on {setup['cores']} CPUs",
        fontsize=9,
    )


def _legend(axis, noisy: bool) -> None:
    """The lines' legend, with the noisy bars' patch that `bars` had put in its own."""
    from matplotlib.patches import Patch

    handles, _ = axis.get_legend_handles_labels()
    if noisy:
        handles.append(Patch(color=NOISY_BAR, label="noisy: other processes took the server's CPU"))
    axis.legend(handles=handles, fontsize=7, loc="lower right")

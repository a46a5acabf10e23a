"""blocked-loop: a long request blocks an event loop's every connection; OS threads preempt it.

Measured with BLOCKED_CONNECTIONS connections sending echo with a little /work of about 100 ms
mixed in, then echo alone, each model alone on one core and its /metrics scraped: each event
loop's echo p99 against the /work time and against its p99 alone, the seconds its probe saw the
loop blocked, and threaded's echo p99 (also at CPython's switch interval if the server sets
another).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog, rig
from loadtest.lessons.charts import (
    BAR,
    ECHO_P99,
    LOOP_BLOCKED,
    NOISE,
    RPS,
    Column,
    Rows,
    legend_line,
    log_durations,
    ms_number,
)
from loadtest.lessons.rig import (
    IO_POOL_WORKERS,
    MIN_WINDOW_S,
    Planned,
    Run,
    Work,
    add_blocked_seconds,
    server_args,
)
from loadtest.lessons.verdict import (
    CPYTHON_SWITCH_INTERVAL,
    EVENT_LOOPS,
    OS_THREADS,
    POOL,
    Problems,
    Verdict,
    decide_with_noise,
    missing_models,
    ms_text,
)

ID = "blocked-loop"
DATABASE = False
LESSON = catalog.LESSONS_BY_ID[ID]

BLOCKED_CONNECTIONS, BLOCKED_WORK_WEIGHT, BLOCKED_ECHO_WEIGHT = 4, 2, 98
CPYTHON_SWITCH = "switch 5 ms"  # the variant of the threaded server at CPython's interval
# Each event loop's echo p99 with the long /work against without it.
BLOCKED_FACTOR = 10.0

HYPOTHESIS = (
    "With {connections} connections sending {work_share:.0%} /work of {work_ms:.0f} ms among "
    "echo requests, the echo p99 of each event loop ({event_loops}) reaches the /work time "
    "and >= {BLOCKED_FACTOR:g}x its echo p99 without /work, and its "
    "arena_event_loop_blocked_seconds_total rises; {OS_THREADS}'s echo p99 stays below the "
    "/work time, measured at the server's own GIL switch interval and at CPython's "
    "{cpython_switch_ms:g} ms (a longer interval, chosen for fairness, preempts later: the "
    "trade-off is shown)."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """CPython's switch interval in milliseconds."""
    return {"cpython_switch_ms": CPYTHON_SWITCH_INTERVAL * 1000}


def _switch_variants(model: str) -> list[tuple[str, tuple[str, ...]]]:
    """(variant, extra arguments) per GIL switch interval a model is measured at.

    The threaded server may set a longer switch interval than CPython's (for fairness between
    many threads): measured at both, so the trade-off shows.
    """
    variants: list[tuple[str, tuple[str, ...]]] = [("", ())]
    own = rig.server_switch_interval() if model == OS_THREADS else None
    if own is not None and abs(own - CPYTHON_SWITCH_INTERVAL) > 1e-9:
        variants.append((CPYTHON_SWITCH, ("--switch-interval", f"{CPYTHON_SWITCH_INTERVAL:g}")))
    return variants


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """Echo with a little long /work mixed in, and echo alone, /metrics scraped."""
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
        ID,
        "echo + 2 % /work ~100 ms",
        BLOCKED_CONNECTIONS,
        (
            bench_scenarios.echo(64, BLOCKED_ECHO_WEIGHT),
            bench_scenarios.work(work.rounds_100ms, BLOCKED_WORK_WEIGHT),
        ),
    )
    alone = Scenario(ID, "echo only", BLOCKED_CONNECTIONS, (bench_scenarios.echo(64),))
    runs = []
    for m in models:
        for name, extra in _switch_variants(m):
            args = (*server_args(m, IO_POOL_WORKERS), *extra)
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


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The run's figures, at CPython's switch interval in a figure of their own."""
    at_cpython = run.variant.startswith(CPYTHON_SWITCH)
    _blocked_figures(
        figure.setdefault("at_cpython_interval", {}) if at_cpython else figure,
        run.variant.endswith("alone"),
        summary,
        base,
    )


def _blocked_figures(figure: dict, alone: bool, summary: Mapping, base: Mapping) -> None:
    """Echo p99 with and without /work, /work latency, blocked loop seconds."""
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
    add_blocked_seconds(figure, summary)


def settle(figure: dict) -> None:
    """A figure is noisy if either of its two runs (with /work, alone) was."""
    for part in (figure, figure.get("at_cpython_interval")):
        if part:
            noisy_alone = part.pop("noisy_alone", False)
            part["noisy"] = part.get("noisy", False) or noisy_alone
            part["other_cpu"] = max(part.get("other_cpu", 0), part.pop("other_cpu_alone", 0))


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Each event loop's echo p99 >= the /work time and >= 10x alone, its loop blocked;
    threaded's below the /work time."""
    loops = [name for name in EVENT_LOOPS if name in figures]
    missing = missing_models(figures, [OS_THREADS, *(() if loops else EVENT_LOOPS)])
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
        f"{name}'s echo p99 {ms_text(loop['echo_p99_ms'])} >= the /work time {ms_text(work)} and "
        f"{loop['echo_p99_ms'] / max(loop['echo_p99_alone_ms'], 1e-9):.0f}x its p99 without "
        f"/work ({ms_text(loop['echo_p99_alone_ms'])}), the loop blocked "
        f"{loop.get('blocked_s') or 0:.1f} s of a {loop.get('blocked_span_s', 0):.1f} s run"
        for name, loop in ((name, figures[name]) for name in loops)
    )
    ok += f"; {trade_off}"
    used = {**{name: figures[name] for name in loops}, OS_THREADS: _threads_noise(threads)}
    return decide_with_noise(problems, ok, used, [*loops, OS_THREADS])


def _check_loop_blocked(name: str, loop: Mapping, work: float, problems: Problems) -> None:
    """What one event loop's figures must show: echo waited for /work, the probe saw it."""
    if loop["echo_p99_ms"] < work:
        problems.add(
            f"{name}'s echo p99 {ms_text(loop['echo_p99_ms'])} is below the /work time "
            f"{ms_text(work)}",
            name,
        )
    if loop["echo_p99_ms"] < BLOCKED_FACTOR * loop["echo_p99_alone_ms"]:
        problems.add(
            f"{name}'s echo p99 {ms_text(loop['echo_p99_ms'])} is only "
            f"{loop['echo_p99_ms'] / max(loop['echo_p99_alone_ms'], 1e-9):.1f}x its "
            f"p99 without /work ({ms_text(loop['echo_p99_alone_ms'])}; needs "
            f"{BLOCKED_FACTOR:g}x)",
            name,
        )
    blocked = loop.get("blocked_s")
    if blocked is None:
        # Not a measurement: no noise excuses a missing metric.
        problems.add(f"{name}'s /metrics gave no arena_event_loop_blocked_seconds_total")
    elif blocked <= 0:
        problems.add(f"{name}'s arena_event_loop_blocked_seconds_total did not rise", name)


def _interval(figure: Mapping, unknown: str = "its") -> str:
    """The figure's switch interval, `50 ms` (`unknown` when the server did not say)."""
    interval = figure.get("switch_interval_s")
    return f"{interval * 1000:g} ms" if interval else unknown


def _preemption(threads: Mapping, work: float) -> tuple[bool, str]:
    """Is the threaded server's echo p99 below the /work time: at the server's own switch
    interval, or else at CPython's (a longer interval chosen for fairness preempts later)?"""
    own = threads["echo_p99_ms"]
    at_cpython = threads.get("at_cpython_interval")
    if own < work:
        return True, (
            f"{OS_THREADS}'s echo p99 {ms_text(own)} stays below it (switch interval "
            f"{_interval(threads)})"
        )
    if at_cpython and at_cpython["echo_p99_ms"] < work:
        return True, (
            f"{OS_THREADS}'s echo p99 stays below it at CPython's "
            f"{_interval(at_cpython)} switch interval ({ms_text(at_cpython['echo_p99_ms'])})"
            f", not at the server's {_interval(threads)} ({ms_text(own)}): a longer "
            "interval (fewer hand-overs between many busy threads) lets a long "
            "request hold the GIL longer: the trade-off"
        )
    cpython = (
        f", {ms_text(at_cpython['echo_p99_ms'])} at CPython's {_interval(at_cpython)}"
        if at_cpython
        else ""
    )
    return False, (
        f"{OS_THREADS}'s echo p99 {ms_text(own)} (switch interval {_interval(threads)})"
        f"{cpython} is not below the /work time {ms_text(work)}"
    )


def _threads_noise(threads: Mapping) -> Mapping:
    """The threaded figures' noise, its run at CPython's switch interval included."""
    at_cpython = threads.get("at_cpython_interval") or {}
    return {
        "noisy": threads.get("noisy") or at_cpython.get("noisy", False),
        "other_cpu": max(threads.get("other_cpu", 0), at_cpython.get("other_cpu", 0)),
    }


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The event loops' echo waits for /work, threads' for a slice, the pool's for a worker."""
    text = f"{setup['work_share']:.0%} of requests compute {setup['work_ms']:.0f} ms. "
    for name in EVENT_LOOPS:
        loop = figures.get(name)
        if not loop:
            continue
        text += (
            f"{name} runs one connection's code at a time on its loop: an echo that "
            f"arrives during /work waits for it, so its echo p99 is "
            f"{ms_number(loop['echo_p99_ms'])} ms (without /work "
            f"{ms_number(loop['echo_p99_alone_ms'])} ms) and its probe saw the loop blocked "
            f"{loop.get('blocked_s', 0):.1f} s of a {loop.get('blocked_span_s', 0):.1f} s run. "
        )
    threads = figures.get(OS_THREADS)
    if threads:
        parts = [threads, threads.get("at_cpython_interval") or {}]
        p99s = " and ".join(
            f"{ms_number(part['echo_p99_ms'])} ms at a {_interval(part, '?')} switch interval"
            for part in parts
            if part
        )
        text += (
            f"{OS_THREADS}: the OS runs every thread, and the long request's "
            "thread must hand over the GIL each switch interval, so an echo waits for "
            f"a slice, not the whole /work: p99 {p99s}. "
        )
    pool = figures.get(POOL)
    if pool:
        text += (
            f"The pool's echo requests wait for one of its {setup['pool_workers']} "
            f"busy workers: p99 {ms_number(pool['echo_p99_ms'])} ms."
        )
    return text.strip()


COLUMNS: list[Column] = [
    ECHO_P99,
    ("echo p99 ms, no /work", lambda f: ms_number(f["echo_p99_alone_ms"])),
    ("/work p50 ms", lambda f: ms_number(f["work_p50_ms"])),
    LOOP_BLOCKED,
    RPS,
    NOISE,
]


def rows(figures: Mapping[str, Mapping]) -> Rows:
    """A row per model; threaded's two when measured at CPython's switch interval too."""
    out: Rows = []
    for model, figure in figures.items():
        if figure.get("at_cpython_interval"):
            out += [
                (f"{model}, switch {_interval(part, '?')}", part)
                for part in (figure, figure["at_cpython_interval"])
            ]
        else:
            out.append((model, figure))
    return out


PANELS = 2  # the chart's panels, side by side


def chart(axes, entry: Mapping) -> None:
    """Echo p99 with and without /work per model; the loops' blocked seconds."""
    figures, setup = entry["figures"], entry["setup"]
    pairs = rows(figures)
    names = [label for label, _ in pairs]
    positions = range(len(names))
    with_work = [f["echo_p99_ms"] * 1e3 for _, f in pairs]
    alone = [f["echo_p99_alone_ms"] * 1e3 for _, f in pairs]
    axis = axes[0]
    axis.barh([p - 0.2 for p in positions], alone, height=0.4, color="#9ecae1", label="echo only")
    axis.barh(
        [p + 0.2 for p in positions],
        with_work,
        height=0.4,
        color=BAR,
        label=f"with {setup['work_share']:.0%} /work",
    )
    for position, value in zip(positions, with_work, strict=True):
        axis.text(value, position + 0.2, f" {ms_number(value / 1e3)} ms", va="center", fontsize=8)
    axis.set_yticks(list(positions), names)
    axis.invert_yaxis()
    log_durations(axis)
    legend_line(axis, setup["work_ms"] * 1e3, f"the /work time, {setup['work_ms']:.0f} ms")
    axis.set_xlim(min([*alone, *with_work]) / 3, max([*with_work, setup["work_ms"] * 1e3]) * 40)
    axis.set_xlabel("echo p99 (log scale)")
    axis.set_title(f"echo p99, {setup['connections']} connections, server on one core", fontsize=9)
    axis.legend(fontsize=7, loc="upper right")
    blocked = [
        (name, f["blocked_s"], f.get("blocked_span_s", 0.0))
        for name, f in figures.items()
        if "blocked_s" in f
    ]
    axis = axes[1]
    if blocked:
        axis.bar(
            [name for name, _, _ in blocked],
            [span for _, _, span in blocked],
            color="#dddddd",
            label="the run (connect, warm-up, window)",
        )
        axis.bar(
            [name for name, _, _ in blocked],
            [value for _, value, _ in blocked],
            color=BAR,
            width=0.5,
            label="event loop blocked",
        )
        for index, (_, value, span) in enumerate(blocked):
            share = f" ({value / span:.0%})" if span else ""
            axis.text(index, value, f"{value:.2f} s{share}", ha="center", va="bottom", fontsize=8)
        axis.set_ylim(0, max(span for _, _, span in blocked) * 1.25 or 1)
        axis.legend(fontsize=7, loc="upper right")
    axis.set_ylabel("seconds")
    axis.set_title("arena_event_loop_blocked_seconds_total: its rise during one run", fontsize=9)

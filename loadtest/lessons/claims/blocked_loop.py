"""blocked-loop: a long request blocks an event loop's every connection; OS threads preempt it.

Measured with the probe (`loadtest.lessons.probe`), each model alone on one core and its /metrics
scraped: one connection asks for a /work of about 100 ms again and again, ECHO_CONNECTIONS others
send echoes with a short pause. Every echo sent while a /work ran with at least `left` of it
still to go is classed: answered only after that /work's reply (its wait covered the rest of the
/work) or before it. An event loop computes the /work inline, so every such echo waits for it;
the threaded server's /work thread is preempted every GIL switch interval, so the echo is
answered within a few of them, before the /work is done, when `left` is LEFT_PER_SWITCH of them
or more. The share of covered echoes is the mechanism itself: unlike a p99 it does not depend on
how many echoes a fast model fits between two blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog, rig
from loadtest.lessons.charts import BAR, LIMIT, LOOP_BLOCKED, NOISE, NOISY_BAR, Column, ms_number
from loadtest.lessons.probe import Probe
from loadtest.lessons.rig import IO_POOL_WORKERS, Planned, Run, Work, add_blocked_seconds
from loadtest.lessons.rig import server_args as model_args
from loadtest.lessons.verdict import (
    CPYTHON_SWITCH_INTERVAL,
    EVENT_LOOPS,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    OS_THREADS,
    Problems,
    Verdict,
    decide_with_noise,
    missing_models,
    ms_text,
)

ID = "blocked-loop"
DATABASE = False
LESSON = catalog.LESSONS_BY_ID[ID]

# Each event loop answers at least this share of the echoes sent during a /work only after it.
COVERED_BY_LOOP = 0.9
# The threaded server answers at most this share of them that late.
COVERED_BY_THREADS = 0.5
# Fewer echoes sent during a /work than this, for a model, cannot decide its share.
MIN_DURING = 10
# An echo counts when at least this much of the /work is still to go when it is sent: at least
# MIN_LEFT_S (the loopback and the probe's wake-ups are not a preemption) and LEFT_PER_SWITCH
# switch intervals of the threaded server (the /work's thread, then whichever threads run
# before the echo's, each may hold the GIL that long).
MIN_LEFT_S = 0.020
LEFT_PER_SWITCH = 4
# The measured /work must last at least the time left plus this, or no echo has room to count.
ROOM_S = 0.020
# The /work is the ~100 ms calibrated one, or a multiple of it if the time left needs more.
WORK_OVER_LEFT = 2
ECHO_CONNECTIONS = 8
ECHO_PAUSE_S = 0.002
# The probe's window, also with --quick: an event loop sees a few echoes per /work, and MIN_DURING
# of them need a few dozen /works.
PROBE_WINDOW_S = 3.0

HYPOTHESIS = (
    "Of the echoes sent while a /work of {work_ms:.0f} ms of CPU ran with at least "
    "{left_ms:.0f} ms of it still to go (max({min_left_ms:g} ms, {LEFT_PER_SWITCH} x "
    "{OS_THREADS}'s {switch_interval_ms:g} ms GIL switch interval)), each event loop "
    "({event_loops}) answers >= {COVERED_BY_LOOP:.0%} only after that /work's reply (they "
    "waited for the rest of it) and its arena_event_loop_blocked_seconds_total rises; "
    "{OS_THREADS} answers <= {COVERED_BY_THREADS:.0%} of them that late (the OS preempts the "
    "/work's thread every switch interval). One connection loops the /work beside "
    "{echo_connections} echo connections; a model with fewer than {MIN_DURING} such echoes "
    "cannot decide."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """The least time left, in milliseconds."""
    return {"min_left_ms": MIN_LEFT_S * 1000}


def left_s(switch_interval: float) -> float:
    """How much of a /work must still be to go when an echo is sent for the echo to count."""
    return max(MIN_LEFT_S, LEFT_PER_SWITCH * switch_interval)


def work_multiple(left: float) -> int:
    """How many ~100 ms /works make one long enough for `left` and the room after it."""
    return max(1, math.ceil(WORK_OVER_LEFT * (left + ROOM_S) / 0.1))


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """The probe on each event loop and on threaded, /metrics scraped."""
    # What the threaded server will set (ARENA_SWITCH_INTERVAL, else CPython's): its run's
    # arena_server_info says what it did set, and the check compares the two.
    interval = rig.server_switch_interval() or CPYTHON_SWITCH_INTERVAL
    left = left_s(interval)
    rounds = work.rounds_100ms * work_multiple(left)
    setup = {
        "work_ms": rounds * work.round_ns / 1e6,
        "work_rounds": rounds,
        "left_ms": round(left * 1000, 1),
        "switch_interval_ms": interval * 1000,
        "echo_connections": ECHO_CONNECTIONS,
        "echo_pause_ms": ECHO_PAUSE_S * 1000,
        "cores": 1,
    }
    probe = Probe(rounds, left, ECHO_CONNECTIONS, ECHO_PAUSE_S)
    scenario = Scenario(
        ID,
        f"probe: /work ~{setup['work_ms']:.0f} ms + echo",
        1 + ECHO_CONNECTIONS,
        (bench_scenarios.work(rounds),),
    )
    runs = [
        Run(
            model,
            "",
            model_args(model, IO_POOL_WORKERS),
            scenario,
            scrape=True,
            min_window=PROBE_WINDOW_S,
            probe=probe,
        )
        for model in models
        if model in EVENT_LOOPS or model == OS_THREADS
    ]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The probe's figures (counts summed over the repetitions), the loop's blocked seconds,
    the switch interval the server set."""
    figure.update(base, **summary["probe"])
    interval = summary.get("server_info", {}).get("switch_interval")
    if interval:
        figure["switch_interval_s"] = float(interval)
    add_blocked_seconds(figure, summary)


def _undecidable(name: str, figure: Mapping, setup: Mapping) -> str:
    """Why this model's figures cannot decide its share ("" when they can)."""
    if figure["work_median_ms"] < figure["left_ms"] + ROOM_S * 1000:
        took = ms_text(figure["work_median_ms"])
        return (
            f"the /work was too short to leave room: {name}'s took {took}, not the "
            f"{ms_text(figure['left_ms'])} an echo needs left of it + {ms_text(ROOM_S * 1000)}"
        )
    if figure["echoes_during_work"] < MIN_DURING:
        return (
            f"too few samples: {name} saw {figure['echoes_during_work']} echoes sent during a "
            f"/work (needs {MIN_DURING})"
        )
    interval = figure.get("switch_interval_s")
    if interval and LEFT_PER_SWITCH * interval * 1000 > setup["left_ms"] + 0.05:
        return (
            f"{name} ran with a {interval * 1000:g} ms switch interval: the "
            f"{ms_text(setup['left_ms'])} left were derived for {setup['switch_interval_ms']:g} ms"
        )
    return ""


def _share_text(figure: Mapping) -> str:
    """`112 of 112 echoes sent during a /work waited for all of it (100%)`."""
    return (
        f"{figure['echoes_waited_whole_work']:,} of {figure['echoes_during_work']:,} echoes sent "
        f"during a /work waited for all of it ({figure['covered_share']:.0%})"
    )


def _check_loop(name: str, loop: Mapping, problems: Problems, decides: bool) -> str:
    """An event loop's problems (its share only if its figures decide); the reason it holds."""
    share = loop["covered_share"]
    if decides and share < COVERED_BY_LOOP:
        problems.add(
            f"{name}: only {_share_text(loop)}, needs >= {COVERED_BY_LOOP:.0%}: its loop served "
            "other connections while a /work computed",
            name,
            miss=COVERED_BY_LOOP / max(share, 0.01),
        )
    blocked = loop.get("blocked_s")
    if blocked is None:
        # Not a measurement: no noise excuses a missing metric.
        problems.add(f"{name}'s /metrics gave no arena_event_loop_blocked_seconds_total")
    elif blocked <= 0:
        # A busy machine slows a loop; it cannot make a /work of ~100 ms block it less.
        problems.add(
            f"{name}'s arena_event_loop_blocked_seconds_total did not rise", name, miss=math.inf
        )
    return (
        f"{name}: {_share_text(loop)}, the loop blocked {blocked or 0:.1f} s of a "
        f"{loop.get('blocked_span_s', 0):.1f} s run"
    )


def _check_threads(threads: Mapping, problems: Problems, decides: bool) -> str:
    """The threaded server's problem (if its figures decide); the reason it holds."""
    share = threads["covered_share"]
    interval = threads.get("switch_interval_s")
    at = f" (switch interval {interval * 1000:g} ms)" if interval else ""
    if decides and share > COVERED_BY_THREADS:
        problems.add(
            f"{OS_THREADS}: {_share_text(threads)}{at}, needs <= {COVERED_BY_THREADS:.0%}: "
            "the /work's thread was not preempted",
            OS_THREADS,
            miss=share / COVERED_BY_THREADS,
        )
    return f"{OS_THREADS}: {_share_text(threads)}{at}"


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Each event loop's echoes during a /work wait for all of it, its loop blocked; threaded's
    are answered before the /work is done."""
    loops = [name for name in EVENT_LOOPS if name in figures]
    missing = missing_models(figures, [OS_THREADS, *(() if loops else EVENT_LOOPS)])
    if missing:
        return missing
    used = [*loops, OS_THREADS]
    unsure = {name: _undecidable(name, figures[name], setup) for name in used}
    problems = Problems()
    parts = [_check_loop(name, figures[name], problems, not unsure[name]) for name in loops]
    parts.append(_check_threads(figures[OS_THREADS], problems, not unsure[OS_THREADS]))
    for name in used:
        if figures[name].get("probe_errors"):
            problems.add(
                f"{name} answered {figures[name]['probe_errors']:,} probe requests with an error",
                name,
                miss=math.inf,
            )
    verdict = decide_with_noise(problems, "; ".join(parts), figures, used)
    why = "; ".join(reason for reason in unsure.values() if reason)
    if not why:
        return verdict
    if verdict.verdict == FAILS:
        return Verdict(FAILS, f"{verdict.reason}; besides, {why}")
    if verdict.verdict == HOLDS:
        return Verdict(INCONCLUSIVE, f"{why}; the rest: {verdict.reason}")
    return Verdict(INCONCLUSIVE, f"{why}; {verdict.reason}")


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """What waited for a /work on each model, and why."""
    text = (
        f"One connection asks for a /work of {setup['work_ms']:.0f} ms again and again beside "
        f"{setup['echo_connections']} echo connections; an echo counts when it is sent with at "
        f"least {setup['left_ms']:.0f} ms of a /work to go. "
    )
    for name in EVENT_LOOPS:
        loop = figures.get(name)
        if loop:
            text += (
                f"{name} computes the /work on its loop, so nothing else runs meanwhile: "
                f"{_share_text(loop)} (the /work took {ms_number(loop['work_median_ms'])} ms), "
                f"and the loop reported {loop.get('blocked_s') or 0:.1f} s blocked. "
            )
    threads = figures.get(OS_THREADS)
    if threads:
        interval = threads.get("switch_interval_s")
        every = f"every {interval * 1000:g} ms" if interval else "every switch interval"
        text += (
            f"{OS_THREADS}: the OS runs every thread and the /work's thread hands over the GIL "
            f"{every}, so an echo waits for a slice, not the rest of the /work: "
            f"{_share_text(threads)}."
        )
    return text.strip()


COLUMNS: list[Column] = [
    ("echoes during a /work", lambda f: f"{f['echoes_during_work']:,}"),
    ("of them answered after it", lambda f: f"{f['echoes_waited_whole_work']:,}"),
    ("covered share", lambda f: f"{f['covered_share']:.0%}"),
    ("/work median ms", lambda f: ms_number(f["work_median_ms"])),
    LOOP_BLOCKED,
    NOISE,
]


def chart(axes, entry: Mapping) -> None:
    """The covered share per model, against the event loops' and threaded's marks."""
    from matplotlib.ticker import PercentFormatter

    figures, setup = entry["figures"], entry["setup"]
    names = list(figures)
    shares = [f["covered_share"] for f in figures.values()]
    axis = axes[0]
    axis.barh(names, shares, color=[NOISY_BAR if f.get("noisy") else BAR for f in figures.values()])
    axis.invert_yaxis()
    for index, figure in enumerate(figures.values()):
        noisy = "  (noisy ⚠)" if figure.get("noisy") else ""
        axis.text(
            figure["covered_share"],
            index,
            f" {figure['covered_share']:.0%} of {figure['echoes_during_work']:,}{noisy}",
            va="center",
            fontsize=8,
        )
    axis.axvline(
        COVERED_BY_LOOP,
        color=LIMIT,
        linestyle="--",
        linewidth=1,
        label=f"event loops: at least {COVERED_BY_LOOP:.0%}",
    )
    axis.axvline(
        COVERED_BY_THREADS,
        color="#ff7f0e",
        linestyle=":",
        linewidth=1.5,
        label=f"{OS_THREADS}: at most {COVERED_BY_THREADS:.0%}",
    )
    axis.set_xlim(0, 1.45)  # room for the labels right of a full bar
    axis.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    axis.xaxis.set_major_formatter(PercentFormatter(1.0))
    axis.set_xlabel(
        f"echoes sent with >= {setup['left_ms']:.0f} ms of a /work to go, answered only after it"
    )
    axis.set_title(
        f"Who waits for a /work of {setup['work_ms']:.0f} ms of CPU: one connection looping it, "
        f"{setup['echo_connections']} sending echo, server on one core",
        fontsize=9,
    )
    axis.legend(fontsize=7, loc="upper right")
    axis.grid(axis="x", alpha=0.3)

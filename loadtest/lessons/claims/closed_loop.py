"""closed-loop: a closed loop hides queueing; a timetable (open loop) shows the stall.

Measured by stopping each server (SIGSTOP) for STALL_S inside a STALL_WINDOW_S window on
STALL_CONNECTIONS connections, once on a timetable of STALL_RATE requests/s (each timed from when
it was due) and once closed loop: the p99 of the same stall both ways.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons.catalog import Lesson
from loadtest.lessons.charts import (
    BAR,
    NOISE,
    Column,
    joined,
    legend_line,
    log_durations,
    ms_number,
)
from loadtest.lessons.rig import IO_POOL_WORKERS, Planned, Run, Work, server_args
from loadtest.lessons.verdict import INCONCLUSIVE, Problems, Verdict, decide_with_noise, ms_text

ID = "closed-loop"
DATABASE = False
# Checked here, not a Locust scenario (a stall is no knob preset).
LESSON = Lesson(
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

# The server stopped for STALL_S inside a STALL_WINDOW_S window (rig.STALL_AT of the way in);
# the open loop offers STALL_RATE requests/s over STALL_CONNECTIONS connections.
STALL_CONNECTIONS, STALL_RATE, STALL_S, STALL_WINDOW_S = 10, 1000, 0.5, 3.0
OPEN_LOOP, CLOSED_LOOP = "open loop", "closed loop"
# The open loop's p99 reaches at least this share of the stall; the closed loop's stays below
# this one.
STALL_OPEN_SHARE = 0.25
STALL_CLOSED_SHARE = 0.1

HYPOTHESIS = (
    "With the server stopped (SIGSTOP) for {stall_ms:g} ms in the middle of a run on "
    "{connections} connections: on a timetable of {rate:,} requests/s (open loop, each "
    "timed from when it was due) the p99 reaches >= {STALL_OPEN_SHARE:.0%} of the stall; "
    "the same stall under a closed loop leaves the p99 below {STALL_CLOSED_SHARE:.0%} of it "
    "(each connection waits once)."
)


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """The same stall inside an open loop's window and a closed loop's."""
    setup = {
        "connections": STALL_CONNECTIONS,
        "rate": STALL_RATE,
        "stall_ms": STALL_S * 1000,
        "echo_bytes": 64,
        "cores": 1,
    }
    scenario = Scenario(ID, "echo 64 B, a stall", STALL_CONNECTIONS, (bench_scenarios.echo(64),))
    runs = [
        Run(
            m,
            variant,
            server_args(m, IO_POOL_WORKERS),
            scenario,
            min_window=STALL_WINDOW_S,
            rate=rate,
            stall_s=STALL_S,
        )
        for m in models
        for variant, rate in ((OPEN_LOOP, STALL_RATE), (CLOSED_LOOP, 0.0))
    ]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The open loop's or the closed loop's latency, both runs in one figure."""
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


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Per model: open-loop p99 >= STALL_OPEN_SHARE x the stall, closed-loop p99 below
    STALL_CLOSED_SHARE x the stall."""
    if not figures:
        return Verdict(INCONCLUSIVE, "not checked: no model measured")
    stall = setup["stall_ms"]
    problems = Problems()
    for name, figure in figures.items():
        if figure["open_p99_ms"] < STALL_OPEN_SHARE * stall:
            problems.add(
                f"{name}'s open-loop p99 {ms_text(figure['open_p99_ms'])} is below "
                f"{STALL_OPEN_SHARE:.0%} of the {ms_text(stall)} stall",
                name,
                # Others' CPU can only add waiting: it never hides a stall.
                miss=math.inf,
            )
        if figure["closed_p99_ms"] > STALL_CLOSED_SHARE * stall:
            problems.add(
                f"{name}'s closed-loop p99 {ms_text(figure['closed_p99_ms'])} is above "
                f"{STALL_CLOSED_SHARE:.0%} of the {ms_text(stall)} stall",
                name,
            )
    ok = "; ".join(
        f"{name}: p99 {ms_text(f['open_p99_ms'])} open loop, "
        f"{ms_text(f['closed_p99_ms'])} closed loop (its max {ms_text(f['closed_max_ms'])})"
        for name, f in figures.items()
    )
    return decide_with_noise(problems, f"{ok}; the stall {ms_text(stall)}", figures, list(figures))


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """Every request due during the stall timed, against once per connection."""
    stall = setup["stall_ms"]
    return (
        f"Each server stopped for {stall:.0f} ms. On the timetable "
        f"({setup['rate']:,} requests/s) about {setup['rate'] * stall / 1000:,.0f} requests "
        "fell due during the stall and each waited from when it was due: "
        + joined([f"{name} p99 {ms_number(f['open_p99_ms'])} ms" for name, f in figures.items()])
        + ". The closed loop sent nothing while its "
        f"{setup['connections']} connections waited, so only {setup['connections']} requests "
        "saw the stall: "
        + joined(
            [
                f"{name} p99 {ms_number(f['closed_p99_ms'])} ms "
                f"(max {ms_number(f['closed_max_ms'])} ms)"
                for name, f in figures.items()
            ]
        )
        + "."
    )


COLUMNS: list[Column] = [
    ("p99 ms, open loop", lambda f: ms_number(f["open_p99_ms"])),
    ("p99 ms, closed loop", lambda f: ms_number(f["closed_p99_ms"])),
    ("max ms, open loop", lambda f: ms_number(f["open_max_ms"])),
    ("max ms, closed loop", lambda f: ms_number(f["closed_max_ms"])),
    ("req/s open (offered)", lambda f: f"{f['open_rps']:,.0f} ({f['offered_rps']:,.0f})"),
    ("req/s closed", lambda f: f"{f['closed_rps']:,.0f}"),
    NOISE,
]


def chart(axes, entry: Mapping) -> None:
    """The p99 of one stall per model, closed loop and open loop, against the stall."""
    figures, setup = entry["figures"], entry["setup"]
    names = list(figures)
    positions = range(len(names))
    closed = [max(f["closed_p99_ms"], 0.001) * 1e3 for f in figures.values()]
    opened = [max(f["open_p99_ms"], 0.001) * 1e3 for f in figures.values()]
    axis = axes[0]
    axis.barh(
        [p - 0.2 for p in positions], closed, height=0.4, color="#9ecae1", label="closed loop"
    )
    axis.barh([p + 0.2 for p in positions], opened, height=0.4, color=BAR, label="open loop")
    for position, value in zip(positions, opened, strict=True):
        axis.text(value, position + 0.2, f" {ms_number(value / 1e3)} ms", va="center", fontsize=8)
    for position, value in zip(positions, closed, strict=True):
        axis.text(value, position - 0.2, f" {ms_number(value / 1e3)} ms", va="center", fontsize=8)
    axis.set_yticks(list(positions), names)
    axis.invert_yaxis()
    log_durations(axis)
    stall_us = setup["stall_ms"] * 1e3
    legend_line(axis, stall_us, f"the stall, {setup['stall_ms']:g} ms")
    axis.set_xlim(min([*closed, *opened]) / 3, max([*opened, stall_us]) * 40)
    axis.set_xlabel("p99 (log scale)")
    axis.set_title(
        f"p99 of one stall, {setup['connections']} connections; open loop at "
        f"{setup['rate']:,} requests/s",
        fontsize=9,
    )
    axis.legend(fontsize=7, loc="upper right")

"""many-clients: every model serves a thousand connections, none starved; the cost differs.

Measured with echo on MANY_CONNECTIONS connections sending without pause over MANY_WINDOW_S,
each model alone on one core: the connections answered in the window, the longest wait of any
request, replies per connection, threads and memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog
from loadtest.lessons.charts import (
    BAR,
    LIMIT,
    NOISE,
    P99,
    RPS,
    Column,
    joined,
    log_durations,
    ms_number,
)
from loadtest.lessons.rig import Planned, Run, Work, server_args
from loadtest.lessons.verdict import INCONCLUSIVE, Problems, Verdict, decide_with_noise, ms_text

ID = "many-clients"
DATABASE = False
LESSON = catalog.LESSONS_BY_ID[ID]

MANY_CONNECTIONS = 1000
# The threaded server takes 1-2.4 s just to accept 1000 connections (see
# services/servers/threaded.py); a window of 5 s asks "is everyone served", not "how fast".
MANY_WINDOW_S = 5.0

HYPOTHESIS = (
    "With {connections} connections sending echo without pause, every connection of every "
    "model gets a reply within the {window_s:g} s window (none starved); the longest wait is "
    "reported per model."
)


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """Echo on MANY_CONNECTIONS connections over a long window."""
    setup: dict[str, Any] = {"connections": MANY_CONNECTIONS, "echo_bytes": 64, "cores": 1}
    scenario = Scenario(
        ID,
        f"echo 64 B, {MANY_CONNECTIONS} conns",
        MANY_CONNECTIONS,
        (bench_scenarios.echo(64),),
    )
    return setup, [
        Run(m, "", server_args(m, cpus), scenario, min_window=MANY_WINDOW_S) for m in models
    ]


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """Who was answered, the longest wait, replies per connection, the cost."""
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


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
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
                # Noise slows every connection alike; it explains a few late ones, not many.
                miss=figure["connections"] / max(figure["answered"], 1),
            )
    ok = (
        f"every connection answered in the {setup['window_s']:g} s window; longest wait: "
        + ", ".join(
            f"{name} {ms_text(figure['longest_wait_s'] * 1000)}" for name, figure in figures.items()
        )
    )
    return decide_with_noise(problems, ok, figures, list(figures))


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """Who was answered, the longest wait, threads and memory per model."""
    return (
        f"{setup['connections']} connections send echo without pause. "
        + joined(
            [
                f"{name}: {f['answered']}/{f['connections']} answered, longest wait "
                f"{ms_number(f['longest_wait_s'] * 1000)} ms, {f['threads']:,} threads, "
                f"{f['peak_rss_mib']:.0f} MiB"
                for name, f in figures.items()
            ]
        )
        + ". A thread per connection costs a thread and its stack each, and the GIL must "
        "hand over between them; a greenlet or a reactor slot costs almost nothing."
    )


COLUMNS: list[Column] = [
    (
        "answered",
        lambda f: f"{f['answered']}/{f['connections']}" + (" ⚠" if f["starved"] else ""),
    ),
    (
        "longest wait",
        lambda f: (
            ("still waiting after " if f["longest_wait_unanswered"] else "")
            + f"{ms_number(f['longest_wait_s'] * 1000)} ms"
        ),
    ),
    (
        "replies per connection",
        lambda f: "{min:,}\u2013{max:,}".format(**f["requests_per_connection"]),
    ),
    RPS,
    P99,
    ("threads", lambda f: f"{f['threads']:,}"),
    ("peak RSS MiB", lambda f: f"{f['peak_rss_mib']:.0f}"),
    NOISE,
]
PANELS = 2  # the chart's panels, side by side


def chart(axes, entry: Mapping) -> None:
    """The connections answered per model, and the longest wait of any request."""
    figures, setup = entry["figures"], entry["setup"]
    names = list(figures)
    shares = [100 * f["answered"] / max(1, f["connections"]) for f in figures.values()]
    colors = [LIMIT if f["starved"] else BAR for f in figures.values()]
    axes[0].barh(names, shares, color=colors)
    axes[0].invert_yaxis()
    for index, figure in enumerate(figures.values()):
        axes[0].text(
            2,
            index,
            f"{figure['answered']}/{figure['connections']}",
            va="center",
            fontsize=8,
            color="white",
        )
    axes[0].set_xlim(0, 100)
    axes[0].set_xlabel("connections answered in the window (%)")
    axes[0].set_title(f"echo, {setup['connections']} connections, server on one core", fontsize=9)
    waits = [f["longest_wait_s"] * 1e6 for f in figures.values()]
    axes[1].scatter(waits, range(len(names)), color=colors, s=40)
    for index, figure in enumerate(figures.values()):
        still = "still waiting " if figure["longest_wait_unanswered"] else ""
        axes[1].text(
            waits[index],
            index,
            f"  {still}{ms_number(figure['longest_wait_s'] * 1e3)} ms",
            va="center",
            fontsize=8,
        )
    axes[1].set_yticks(range(len(names)), names)
    axes[1].set_ylim(len(names) - 0.5, -0.5)
    log_durations(axes[1])
    axes[1].set_xlim(min(waits) / 3, max(waits) * 10)
    axes[1].set_xlabel("longest wait of any request (log scale)")
    axes[1].set_title("longest wait per model", fontsize=9)
    axes[1].grid(axis="x", alpha=0.3)

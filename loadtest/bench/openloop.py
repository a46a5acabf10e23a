"""`python -m loadtest.bench --open-loop`: latency against offered load, per model.

The closed-loop benchmark finds each model's top rate, but a closed loop slows down with the
server, so it never shows how latency grows on the way there. Here the C load generator runs
open loop (`loadgen --rate R`, requests due on a fixed timetable, each timed from when it was
due): for each model a closed-loop run first measures its top rate, then the same server is
offered rising fractions of it (10 % steps to 130 % by default, and on while a step still keeps
up, to 250 % at most: past saturation). A step measured while other work took the server's CPU
is measured again (`--noisy-retries`), as in the closed-loop benchmark. Latency stays
flat, then turns up sharply near capacity -- the "hockey stick" -- and the **knee** is the
highest offered rate the model sustains with p99 <= 10 ms (every step up to it also within the
bound, the achieved rate within 10 % of the offered one, no errors).

Writes results/bench-open-loop.json and results/open-loop.png (every model on one chart: p99
solid, p50 dashed, log latency); the README's figures come from the JSON
(loadtest.tools.docfigures).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from loadtest.bench import harness, loadgen
from loadtest.bench.scenarios import Scenario, Target
from loadtest.tools import cli

KNEE_P99_US = 10_000.0
# Achieved below this share of the offered rate: the server did not keep up (a backlog grew).
KEPT_UP = 0.9
STEPS = tuple(range(10, 140, 10))  # per cent of the closed-loop rate
QUICK_STEPS = (25, 50, 100, 125)
MAX_PERCENT = 250  # how far past the planned steps a sweep may go to find saturation
RESULT = "bench-open-loop.json"
CHART = "open-loop.png"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def point(percent: int, offered: float, record: dict) -> dict:
    """One step of the sweep: what was offered, what came back."""
    open_loop = record.get("open_loop", {})
    return {
        "percent": percent,
        "offered_rps": round(offered, 1),
        "achieved_rps": record["rps"],
        "latency_us": record["latency_us"],
        "errors": record["errors"],
        "backlog_end": open_loop.get("backlog_end", 0),
        "loadgen_saturated": record["loadgen_saturated"],
        "other_cpu_fraction": record["other_cpu_fraction"],
    }


def sustained(step: dict) -> bool:
    """The step kept up with its offered rate within the latency bound."""
    return (
        step["errors"] == 0
        and step["achieved_rps"] >= KEPT_UP * step["offered_rps"]
        and step["latency_us"]["p99"] <= KNEE_P99_US
    )


def knee(points: list[dict]) -> dict | None:
    """The highest offered rate sustained, every lower step sustained too (None: not even the
    first)."""
    best = None
    for step in points:
        if not sustained(step):
            break
        best = step
    if best is None:
        return None
    return {
        "offered_rps": best["offered_rps"],
        "percent": best["percent"],
        "p99_us": best["latency_us"]["p99"],
    }


def planned_steps(steps: tuple[int, ...], points: list[dict]) -> Iterator[int]:
    """The steps, then further ones of the same size while the last step was still sustained.

    The closed-loop run that sets the scale can itself be slowed by a busy moment; the sweep
    then goes on past the planned top (up to MAX_PERCENT) until a step no longer keeps up, so
    every curve shows its saturation.
    """
    yield from steps
    size = steps[-1] - steps[-2] if len(steps) >= 2 else 10
    percent = steps[-1]
    while points and sustained(points[-1]) and percent + size <= MAX_PERCENT:
        percent += size
        yield percent


@dataclass(frozen=True)
class Sweep:
    """How every model is swept: the load, the generator, the CPUs, the steps and their length."""

    scenario: Scenario
    binary: Path  # the C load generator
    pinning: harness.Pinning
    steps: tuple[int, ...]  # per cent of each model's closed-loop rate
    duration: float  # measured seconds per step
    warmup: float  # seconds of load before each step is measured
    noisy_retries: int = 0  # a step measured while others used the server CPU is measured again


def sweep_target(target: Target, sweep: Sweep, progress: harness.Progress) -> dict:
    """One model: its closed-loop rate, then every step of offered load on the same server."""
    scenario, binary, pinning = sweep.scenario, sweep.binary, sweep.pinning
    duration, warmup = sweep.duration, sweep.warmup
    retries = sweep.noisy_retries if pinning.server else 0  # unpinned, loadgen is "other"
    server = harness.ServerProcess(target.name, list(target.command), pinning.server)
    try:
        measure = partial(harness.measure_once, server, scenario, binary, duration, warmup, pinning)
        closed = harness.quietest(measure, retries)
        progress.step(
            f"{target.name:<14} closed loop: {closed['rps']:>9,.0f} req/s  "
            f"p99 {closed['latency_us']['p99']:>9,.0f} µs"
        )
        points: list[dict] = []
        for percent in planned_steps(sweep.steps, points):
            offered = closed["rps"] * percent / 100
            record = harness.quietest(partial(measure, rate=offered), retries)
            points.append(point(percent, offered, record))
            progress.step(
                f"{target.name:<14} offered {offered:>9,.0f} req/s ({percent:>3} %): achieved "
                f"{record['rps']:>9,.0f}  p50 {record['latency_us']['p50']:>10,.0f} µs  "
                f"p99 {record['latency_us']['p99']:>11,.0f} µs"
            )
    finally:
        server.stop()
    return {
        "family": target.family,
        "command": target.description,
        "closed_loop": {"rps": closed["rps"], "latency_us": closed["latency_us"]},
        "points": points,
        "knee": knee(points),
    }


def run(targets: list[Target], sweep: Sweep, meta: dict, out: Path, quiet: bool = False) -> dict:
    """Sweep every target, write the JSON and the chart into `out`; the results."""
    scenario, steps = sweep.scenario, sweep.steps
    progress = harness.Progress(len(targets) * (1 + len(steps)), enabled=not quiet)
    per_run = sweep.duration + sweep.warmup + 0.6
    progress.note(
        f"bench --open-loop: {len(targets)} models x (1 closed-loop run + {len(steps)} offered "
        f"rates) on {scenario.title}, about {harness.duration_text(progress.total * per_run)} plus "
        f"start-ups; {sweep.pinning.describe()}"
    )
    with harness.measuring("bench --open-loop"):
        swept = [sweep_target(target, sweep, progress) for target in targets]
    results = {
        "meta": {
            **meta,
            "scenario": scenario.name,
            "scenario_title": scenario.title,
            "connections": scenario.connections,
            "steps_percent": list(steps),
            "knee_p99_us": KNEE_P99_US,
            "kept_up_share": KEPT_UP,
        },
        "models": swept,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).write_text(_json(results))
    write_chart(results, out / CHART)
    for model in swept:
        found = model["knee"]
        progress.note(
            f"bench --open-loop: {model['family']}: knee "
            + (
                f"{found['offered_rps']:,.0f} req/s ({found['percent']} % of closed loop), "
                f"p99 {found['p99_us']:,.0f} µs"
                if found
                else f"none: p99 over {KNEE_P99_US / 1000:g} ms from the first step"
            )
        )
    progress.note(f"bench --open-loop: wrote {out / RESULT} and {out / CHART}")
    return results


def _json(results: dict) -> str:
    import json

    return json.dumps(results, indent=1) + "\n"


def write_chart(results: dict, path: Path) -> None:
    """The hockey stick: latency against offered load, every model, p99 solid and p50 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(10, 6))
    for index, model in enumerate(results["models"]):
        color = COLORS[index % len(COLORS)]
        offered = [step["offered_rps"] for step in model["points"]]
        for key, style, label in (("p99", "-", "p99"), ("p50", "--", "p50")):
            latency_ms = [max(step["latency_us"][key], 1.0) / 1000 for step in model["points"]]
            axis.plot(
                offered,
                latency_ms,
                style,
                color=color,
                marker="o" if key == "p99" else None,
                markersize=3,
                label=f"{model['family']} {label}",
            )
        found = model["knee"]
        if found:
            axis.plot(
                [found["offered_rps"]], [found["p99_us"] / 1000], "*", color=color, markersize=12
            )
    axis.axhline(KNEE_P99_US / 1000, color="grey", linestyle=":", linewidth=1)
    axis.text(0, KNEE_P99_US / 1000, f" p99 = {KNEE_P99_US / 1000:g} ms", color="grey", va="bottom")
    axis.set_yscale("log")
    axis.set_xlim(left=0)
    axis.set_xlabel("offered load (requests per second, open loop)")
    axis.set_ylabel("latency from the intended send time (ms, log)")
    meta = results["meta"]
    axis.set_title(
        f"Latency against offered load, {meta['scenario_title']}: p99 solid, p50 dashed, ★ the knee"
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.text(
        0.01,
        0.01,
        f"{meta['date']} · {meta['machine']['cores']} CPUs · {meta['pinning']} · "
        f"{meta['duration_s']:g} s per step",
        fontsize=7,
        color="grey",
    )
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def meta_for(args: Any, pinning: harness.Pinning) -> dict:
    """When, where and how the sweep ran."""
    from loadtest.bench import report

    return {
        "date": cli.timestamp(),
        "machine": report.machine_info(),
        "pinning": pinning.describe(),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "workers": args.workers,
        "loadgen_saturation_threshold": loadgen.SATURATION_CPU_FRACTION,
    }

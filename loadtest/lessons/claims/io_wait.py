"""io-wait: while requests wait, a thread or greenlet per connection overlaps them; a pool does not.

Measured with /sleep of IO_SLEEP_MS on IO_CONNECTIONS connections, each model alone on one core,
the pool with rig.IO_POOL_WORKERS workers: the rate of each model against connections / sleep
(the ideal) and against the pool's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog
from loadtest.lessons.charts import (
    NOISE,
    P99,
    RPS,
    Column,
    joined,
    limit,
    model_rates,
    ms_number,
    percent,
)
from loadtest.lessons.rig import IO_POOL_WORKERS, Planned, Run, Work, server_args
from loadtest.lessons.verdict import (
    INCONCLUSIVE,
    POOL,
    Problems,
    Verdict,
    decide_with_noise,
    missing_models,
    rate_text,
    switching_figures,
    switching_models,
)

ID = "io-wait"
DATABASE = False
LESSON = catalog.LESSONS_BY_ID[ID]

IO_SLEEP_MS, IO_CONNECTIONS = 20, 100
# The switching models against a pool of IO_POOL_WORKERS on /sleep.
IO_SPEEDUP = 10.0
IO_IDEAL_SHARE = 0.70

HYPOTHESIS = (
    "On /sleep {sleep_ms} with {connections} connections, every model but the pool answers "
    ">= {IO_SPEEDUP:g}x a pool of {pool_workers} workers, and each >= {IO_IDEAL_SHARE:.0%} "
    "of the ideal {ideal} (connections / sleep)."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """The ideal rate: connections / sleep."""
    if setup.get("sleep_ms") and setup.get("connections"):
        return {"ideal": rate_text(setup["connections"] / (setup["sleep_ms"] / 1000))}
    return {}


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """/sleep on IO_CONNECTIONS connections, the pool with IO_POOL_WORKERS workers."""
    setup = {
        "connections": IO_CONNECTIONS,
        "sleep_ms": IO_SLEEP_MS,
        "pool_workers": IO_POOL_WORKERS,
        "cores": 1,
    }
    scenario = Scenario(
        ID, f"/sleep {IO_SLEEP_MS}", IO_CONNECTIONS, (bench_scenarios.sleep(IO_SLEEP_MS),)
    )
    return setup, [Run(m, "", server_args(m, IO_POOL_WORKERS), scenario) for m in models]


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The rate and its share of connections / sleep; the pool's workers."""
    ideal = setup["connections"] / (setup["sleep_ms"] / 1000)
    figure.update(base, of_ideal=round(summary["rps"] / ideal, 3))
    if run.model == POOL:
        figure["workers"] = setup["pool_workers"]


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Switching models >= IO_SPEEDUP x the pool and each >= IO_IDEAL_SHARE of the ideal."""
    switching = switching_models(figures)
    missing = missing_models(figures, [POOL]) or (
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
                f"{name} {rate_text(rps)} is {rps / ideal:.0%} of the ideal "
                f"{rate_text(ideal)} (needs {IO_IDEAL_SHARE:.0%})",
                name,
                miss=IO_IDEAL_SHARE * ideal / max(rps, 1e-9),
            )
        if rps < IO_SPEEDUP * pool:
            problems.add(
                f"{name} is {rps / max(pool, 1e-9):.1f}x the pool's {rate_text(pool)} "
                f"(needs {IO_SPEEDUP:g}x)",
                name,
                POOL,
                miss=IO_SPEEDUP * pool / max(rps, 1e-9),
            )
    shares = ", ".join(
        f"{name} {figures[name]['rps'] / ideal:.0%} of the ideal and "
        f"{figures[name]['rps'] / max(pool, 1e-9):.0f}x the pool"
        for name in switching
    )
    ok = (
        f"{shares} ({rate_text(pool)} with {setup['pool_workers']} workers; ideal "
        f"{rate_text(ideal)} = {setup['connections']} connections / {setup['sleep_ms']} ms)"
    )
    return decide_with_noise(problems, ok, figures, [POOL, *switching])


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The switching models overlap the waits, the pool waits a few at a time."""
    text = (
        f"Every /sleep holds what runs it for {setup['sleep_ms']} ms. A thread or "
        f"greenlet per connection overlaps the {setup['connections']} waits: "
        + joined(
            [
                f"{name} {f['rps']:,.0f} req/s ({percent(f['of_ideal'])} of the ideal)"
                for name, f in switching_figures(figures).items()
            ]
        )
        + "."
    )
    pool = figures.get(POOL)
    if pool:
        text += (
            f" The pool runs each request on one of its {setup['pool_workers']} "
            f"workers, so only {setup['pool_workers']} wait at a time: "
            f"{pool['rps']:,.0f} req/s, and a p99 of {ms_number(pool['p99_ms'])} ms spent "
            "queueing for a worker."
        )
    return text


COLUMNS: list[Column] = [RPS, ("of ideal", lambda f: percent(f["of_ideal"])), P99, NOISE]


def chart(axes, entry: Mapping) -> None:
    """Each model's rate against the ideal (connections / sleep) and its share."""
    figures, setup = entry["figures"], entry["setup"]
    model_rates(axes[0], figures)
    ideal = setup["connections"] / (setup["sleep_ms"] / 1000)
    limit(axes[0], ideal, f"ideal {ideal:,.0f}", "grey")
    limit(axes[0], IO_IDEAL_SHARE * ideal, f"{IO_IDEAL_SHARE:.0%} of ideal")
    axes[0].set_title(
        f"/sleep {setup['sleep_ms']} ms, {setup['connections']} connections, server on one core",
        fontsize=9,
    )

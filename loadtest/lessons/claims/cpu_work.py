"""cpu-work: computing, threads and greenlets only take turns on one core: none beats a core.

Measured with /work of about 1 ms (calibrated here) on rig.CPU_CONNECTIONS connections, each
model alone with every CPU of the run (the load generator shares them, its CPU reported): the
cores each server used and its rate in cores' worth of /work. A limit of one core only shows
where a second core was free to take: with fewer free cores (measured before the run,
loadtest.lessons.machine) the lesson is inconclusive, whatever the figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from loadtest.lessons import catalog
from loadtest.lessons.charts import (
    CPU_PER_REQUEST,
    NOISE,
    P99,
    RPS,
    SERVER_CORES,
    Column,
    joined,
    limit,
    model_rates,
)
from loadtest.lessons.rig import (
    Planned,
    Run,
    Work,
    cpu_figures,
    server_args,
    work_1ms,
)
from loadtest.lessons.verdict import (
    INCONCLUSIVE,
    POOL,
    Problems,
    Verdict,
    cores_verdict,
    decide_with_noise,
    drift_verdict,
    rate_text,
    switching_models,
)

ID = "cpu-work"
DATABASE = False
LESSON = catalog.LESSONS_BY_ID[ID]

# A model that switches between connections uses at most ONE_CORE cores (one core, plus the
# kernel's share of its sockets outside the GIL), and answers at most one core's worth of /work
# (+RATE_SLACK: the calibration's own error).
ONE_CORE = 1.25
RATE_SLACK = 0.15
# The free cores a limit of one core needs to show: a second one, mostly free.
FREE_CORES_NEEDED = 1.5
# The pool's workers: one per CPU of the run, so that processes can take every core.
POOL_WORKERS = 2

HYPOTHESIS = (
    "With the server given {cores} CPUs ({free_cores:.2f} free cores measured before the run), "
    "/work of {work_ms:.2f} ms and {connections} connections: no model that switches between "
    "connections uses more than {ONE_CORE:g} cores or answers more than one core's worth "
    "({worth}, +{RATE_SLACK:.0%} for the calibration); a pool of {pool_workers} worker "
    "processes may. Needs >= {FREE_CORES_NEEDED:g} free cores: a limit of one core shows only "
    "where a second one was free."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """One core's worth of /work: 1 / its time."""
    return {"worth": rate_text(1000 / setup["work_ms"])} if setup.get("work_ms") else {}


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """/work of about 1 ms, server and load generator on every CPU."""
    setup, scenario = work_1ms(ID, "/work ~1 ms, all cores", work, POOL_WORKERS, cores=cpus)
    setup["cpus"] = cpus
    runs = [Run(m, "", server_args(m, POOL_WORKERS), scenario, two_cores=True) for m in models]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The rate in cores' worth of /work, the server's CPU, the others' share of the CPUs."""
    figure.update(
        base,
        cores_worth=round(summary["rps"] * setup["work_ms"] / 1000, 3),
        **cpu_figures(summary),
        loadgen_cores=round(summary["loadgen_cpu_fraction"], 3),
        other_cores=round(summary["other_cores"], 3),
        # The noise rule reads a share of the server's CPUs: here, of all of them.
        other_cpu=round(summary["other_cores"] / max(setup["cores"], 1), 3),
    )


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """No switching model above ONE_CORE cores or one core's worth of /work."""
    switching = switching_models(figures)
    if not switching:
        return Verdict(INCONCLUSIVE, "not checked: no model that switches was measured")
    worth = 1000 / setup["work_ms"]
    problems = Problems()
    for name in switching:
        figure = figures[name]
        if figure["server_cores"] > ONE_CORE:
            problems.add(
                f"{name} used {figure['server_cores']:.2f} cores (needs <= {ONE_CORE:g})",
                name,
                miss=math.inf,  # others' CPU cannot make a server use more
                speed_free=True,  # nor can a core's speed
            )
        if figure["rps"] > (1 + RATE_SLACK) * worth:
            problems.add(
                f"{name} {rate_text(figure['rps'])} is {figure['rps'] / worth:.2f} cores' "
                f"worth of /work (one core: {rate_text(worth)})",
                name,
                miss=math.inf,
            )
    text = _summary(figures, switching, worth, setup)
    # Without a second free core staying on one proves nothing; passing it is shown anyway.
    unshowable = cores_verdict(setup, FREE_CORES_NEEDED, f"{text}; not decided")
    if unshowable and not problems:
        return unshowable
    drifted = drift_verdict(setup, problems)
    if drifted:
        return drifted
    return decide_with_noise(problems, text, figures, switching)


def _summary(figures: Mapping[str, Mapping], switching: list[str], worth: float, setup) -> str:
    """The figures that decide: cores used and cores' worth per switching model, the pool's."""
    parts = [
        f"{name} used {figures[name]['server_cores']:.2f} cores for "
        f"{rate_text(figures[name]['rps'])} ({figures[name]['rps'] / worth:.2f} of a core's worth)"
        for name in switching
    ]
    if POOL in figures:
        pool = figures[POOL]
        parts.append(
            f"the pool of {setup['pool_workers']} processes {pool['server_cores']:.2f} cores "
            f"for {rate_text(pool['rps'])} ({pool['rps'] / worth:.2f})"
        )
    return (
        ", ".join(parts) + f" (one core's worth: {rate_text(worth)} of {setup['work_ms']:.2f} ms)"
    )


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """No switching model uses more than one core; processes do."""
    switching = switching_models(figures)
    text = (
        f"The server had {setup['cores']} CPUs; each /work computes {setup['work_ms']:.2f} ms "
        "holding the GIL, so threads, greenlets and coroutines take turns on one core whatever "
        "the CPUs: "
        + joined(
            [
                f"{name} used {figures[name]['server_cores']:.2f} cores for "
                f"{figures[name]['rps']:,.0f} req/s ({figures[name]['cores_worth']:.2f} of a "
                "core's worth)"
                for name in switching
            ]
        )
        + "."
    )
    if POOL in figures:
        pool = figures[POOL]
        text += (
            f" The pool's {setup['pool_workers']} worker processes each hold their own GIL: "
            f"{pool['server_cores']:.2f} cores, {pool['cores_worth']:.2f} cores' worth."
        )
    return text + (
        " What is left between the switching models is each one's cost per request (the "
        "server CPU per request): the gil-tax lesson shows where a thread per connection's "
        "extra CPU goes."
    )


COLUMNS: list[Column] = [
    RPS,
    ("of one core's worth", lambda f: f"{f['cores_worth']:.2f}"),
    SERVER_CORES,
    CPU_PER_REQUEST,
    P99,
    ("load generator (cores)", lambda f: f"{f['loadgen_cores']:.2f}"),
    NOISE,
]


def chart(axes, entry: Mapping) -> None:
    """Each model's rate against one core's worth of /work."""
    figures, setup = entry["figures"], entry["setup"]
    model_rates(axes[0], figures)
    worth = 1000 / setup["work_ms"]
    limit(axes[0], worth, f"one core's worth {worth:,.0f}", "grey")
    axes[0].set_title(
        f"/work {setup['work_ms']:.2f} ms, {setup['connections']} connections, server on "
        f"{setup['cores']} CPUs (load generator shares them)",
        fontsize=9,
    )

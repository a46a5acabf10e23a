"""cpu-work: computing, threads and greenlets only take turns on one core: none beats a core.

Measured with /work of about 1 ms (calibrated here) on rig.CPU_CONNECTIONS connections, each
model alone on one core: its rate in cores' worth of /work, and the server CPU per request.
"""

from __future__ import annotations

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
    IO_POOL_WORKERS,
    Planned,
    Run,
    Work,
    cpu_figures,
    server_args,
    work_1ms,
)
from loadtest.lessons.verdict import (
    INCONCLUSIVE,
    Problems,
    Verdict,
    decide_with_noise,
    rate_text,
    switching_models,
)

ID = "cpu-work"
DATABASE = False
LESSON = catalog.LESSONS_BY_ID[ID]

# The switching models within CPU_SPREAD of each other; none above one core's worth
# (rate x /work time) by more than CORE_SLACK, the calibration's own error.
CPU_SPREAD = 0.25
CORE_SLACK = 0.15

HYPOTHESIS = (
    "On one core, /work of {work_ms:.2f} ms with {connections} connections: the models that "
    "switch between connections are within {CPU_SPREAD:.0%} of each other, and no model "
    "goes above one core's worth ({worth}, +{CORE_SLACK:.0%} for the calibration)."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """One core's worth of /work: 1 / its time."""
    return {"worth": rate_text(1000 / setup["work_ms"])} if setup.get("work_ms") else {}


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """/work of about 1 ms on one core."""
    setup, scenario = work_1ms(ID, "/work ~1 ms", work, IO_POOL_WORKERS, cores=1)
    return setup, [Run(m, "", server_args(m, IO_POOL_WORKERS), scenario) for m in models]


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The rate in cores' worth of /work, and the server's CPU."""
    figure.update(
        base, cores_worth=round(summary["rps"] * setup["work_ms"] / 1000, 3), **cpu_figures(summary)
    )


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
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
                    f"{name} {rate_text(rate)}" + _cpu_per_request(figures[name])
                    for name, rate in rates.items()
                ),
                *rates,
            )
    for name, figure in figures.items():
        if figure["rps"] > (1 + CORE_SLACK) * worth:
            problems.add(
                f"{name} {rate_text(figure['rps'])} is {figure['rps'] / worth:.2f} cores' "
                f"worth of /work (one core: {rate_text(worth)})",
                name,
            )
    spread = (
        f"within {max(rates.values()) / max(min(rates.values()), 1e-9) - 1:.0%} of each other, "
        if len(rates) >= 2
        else ""
    )
    ok = (
        ", ".join(
            f"{name} {rate_text(figure['rps'])} ({figure['rps'] / worth:.2f} of a core's worth)"
            for name, figure in figures.items()
        )
        + f": {spread}none above one core's worth ({rate_text(worth)} of {setup['work_ms']:.2f} ms "
        "/work)"
    )
    return decide_with_noise(problems, ok, figures, list(figures))


def _cpu_per_request(figure: Mapping) -> str:
    """` (1.45 ms of server CPU per request)` when measured: where a slower model's core went."""
    cpu = figure.get("cpu_ms_per_request")
    return f" ({cpu:.2f} ms of server CPU per request)" if cpu else ""


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """No model does more than one core's worth; what is left is cost per request."""
    return (
        f"Each /work computes {setup['work_ms']:.2f} ms holding the GIL; on one core, "
        "threads and greenlets only take turns, so no model does more than one core's "
        "worth: "
        + joined(
            [
                f"{name} {f['rps']:,.0f} req/s ({f['cores_worth']:.2f} of a core's worth)"
                for name, f in figures.items()
            ]
        )
        + ". What is left between them is each model's cost per request, not "
        "concurrency: the server CPU per request shows it (with many threads waiting "
        "for the GIL, hand-overs cost a share of the core)."
    )


COLUMNS: list[Column] = [
    RPS,
    ("of one core's worth", lambda f: f"{f['cores_worth']:.2f}"),
    SERVER_CORES,
    CPU_PER_REQUEST,
    P99,
    NOISE,
]


def chart(axes, entry: Mapping) -> None:
    """Each model's rate against one core's worth of /work."""
    figures, setup = entry["figures"], entry["setup"]
    model_rates(axes[0], figures)
    worth = 1000 / setup["work_ms"]
    limit(axes[0], worth, f"one core's worth {worth:,.0f}", "grey")
    axes[0].set_title(
        f"/work {setup['work_ms']:.2f} ms, {setup['connections']} connections, server on one core",
        fontsize=9,
    )

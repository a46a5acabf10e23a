"""pool-bound: a pool of N workers answers N requests at a time: its rate follows N.

Measured with a long /sleep (POOL_SLEEP_MS) on POOL_CONNECTIONS connections, each model alone on
one core, the pool once per size of POOL_SIZES: each rate against workers (or connections) /
sleep, and twice the workers against twice the rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog
from loadtest.lessons.charts import (
    EXPECTED,
    NOISE,
    OF_EXPECTED,
    P99,
    RPS,
    Column,
    Rows,
    against_expected,
    joined,
    one_row_per_run,
)
from loadtest.lessons.rig import (
    MIN_WINDOW_S,
    Planned,
    Run,
    Work,
    against,
    noise_of_parts,
    server_args,
)
from loadtest.lessons.verdict import (
    POOL,
    Problems,
    Proportional,
    Verdict,
    decide_with_noise,
    follows_size,
    missing_models,
    switching_figures,
)

ID = "pool-bound"
DATABASE = False
LESSON = catalog.LESSONS_BY_ID[ID]

POOL_SLEEP_MS, POOL_CONNECTIONS, POOL_SIZES = 50, 20, (2, 4)
# The rate within POOL_TOLERANCE of workers / sleep; doubling the workers doubles it.
POOL_TOLERANCE = 0.25
BY_WORKERS = Proportional(
    size="workers",
    wait_ms="sleep_ms",
    label="{} workers",
    rule="workers / sleep",
    grown="the workers",
    grown_ok="the workers",
    tolerance=POOL_TOLERANCE,
)

HYPOTHESIS = (
    "On /sleep {sleep_ms} with {connections} connections, a pool of {sizes} workers answers "
    "workers / sleep (within {POOL_TOLERANCE:.0%}), so doubling the workers doubles the "
    "rate; the switching models serve every connection."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """The pool's sizes: `2 and 4`."""
    workers = setup.get("pool_workers")
    if isinstance(workers, list | tuple):
        return {"sizes": " and ".join(str(size) for size in workers)}
    return {}


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """Long /sleep on few connections, the pool once per size of POOL_SIZES."""
    setup = {
        "connections": POOL_CONNECTIONS,
        "sleep_ms": POOL_SLEEP_MS,
        "pool_workers": list(POOL_SIZES),
        "cores": 1,
    }
    scenario = Scenario(
        ID,
        f"/sleep {POOL_SLEEP_MS}",
        POOL_CONNECTIONS,
        (bench_scenarios.sleep(POOL_SLEEP_MS),),
    )
    runs = [
        Run(
            m,
            f"workers {size}" if size else "",
            server_args(m, size),
            scenario,
            min_window=MIN_WINDOW_S,
        )
        for m in models
        for size in (POOL_SIZES if m == POOL else (0,))
    ]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """Per pool size (or the one run of a switching model), the rate against workers (or
    connections) / sleep."""
    if run.model == POOL:
        workers = int(run.variant.split()[-1])
        expected = workers / (setup["sleep_ms"] / 1000)
        figure.setdefault("runs", []).append(
            {"workers": workers, **base, **against(expected, summary)}
        )
    else:
        expected = setup["connections"] / (setup["sleep_ms"] / 1000)
        figure.update(base, **against(expected, summary))


settle = noise_of_parts  # the pool's figure joins one run per size


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """The pool's rate ~ workers / sleep for each size; twice the workers, twice the rate."""
    missing = missing_models(figures, [POOL])
    if missing:
        return missing
    runs = sorted(figures[POOL]["runs"], key=lambda run: run["workers"])
    problems = Problems()
    ok = follows_size(problems, POOL, runs, BY_WORKERS, setup)
    noisy_pool = any(run.get("noisy") for run in runs)
    pool_noise = {
        POOL: {"noisy": noisy_pool, "other_cpu": max(run.get("other_cpu", 0) for run in runs)}
    }
    return decide_with_noise(problems, ok, pool_noise, [POOL])


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The pool's rate follows its size; the switching models serve everyone."""
    text = f"{setup['connections']} connections each ask for a {setup['sleep_ms']} ms wait. "
    pool = figures.get(POOL)
    if pool:
        text += (
            "The pool's rate follows its size: "
            + joined(
                [
                    f"{run['workers']} workers {run['rps']:,.0f} req/s (expected "
                    f"{run['expected_rps']:,.0f})"
                    for run in pool["runs"]
                ]
            )
            + "; the other requests queue. "
        )
    switching = switching_figures(figures)
    if switching:
        text += (
            "A thread or greenlet per connection serves every connection at once: "
            + joined(
                [
                    f"{name} {f['rps']:,.0f} req/s of {f['expected_rps']:,.0f}"
                    for name, f in switching.items()
                ]
            )
            + "."
        )
    return text.strip()


COLUMNS: list[Column] = [RPS, EXPECTED, OF_EXPECTED, P99, NOISE]


def rows(figures: Mapping[str, Mapping]) -> Rows:
    """A row per model, the pool's one per size."""
    return one_row_per_run(figures, lambda model, run: f"{model}, {run['workers']} workers")


def chart(axes, entry: Mapping) -> None:
    """Each rate against its expected rate, workers (or connections) / sleep."""
    setup = entry["setup"]
    against_expected(
        axes[0],
        rows(entry["figures"]),
        "red: expected, workers (or connections) / sleep",
        f"/sleep {setup['sleep_ms']} ms, {setup['connections']} connections, server on one core",
    )

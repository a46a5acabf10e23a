"""db-pool-bound: a database pool of N connections bounds the rate, whatever the model.

Measured with /db of rig.DB_MS on POOL_BOUND_CONNECTIONS connections through one switching model
alone on one core, once per database pool size of DB_POOL_SIZES: each rate against pool / query
time, and twice the pool against twice the rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog
from loadtest.lessons.charts import (
    ERRORS,
    EXPECTED,
    NOISE,
    OF_EXPECTED,
    P99,
    RPS,
    Column,
    Rows,
    against_expected,
    joined,
    ms_number,
    one_row_per_run,
)
from loadtest.lessons.rig import (
    DB_MS,
    MIN_WINDOW_S,
    Planned,
    Run,
    Work,
    against,
    db_args,
    noise_of_parts,
)
from loadtest.lessons.verdict import (
    INCONCLUSIVE,
    Problems,
    Proportional,
    Verdict,
    add_errors,
    decide_with_noise,
    follows_size,
    no_database,
    switching_models,
)

ID = "db-pool-bound"
DATABASE = True  # its servers query the run's PostgreSQL
LESSON = catalog.get(ID, {entry.id: entry for entry in catalog.DB_CHECKED})

# At a pool of 5 a query queues about 50 / 5 x 20 ms = 200 ms for a connection, well inside the
# 2 s --db-timeout, past which it would answer ERR backend-busy.
DB_POOL_SIZES = (5, 10)
POOL_BOUND_CONNECTIONS = 50
# The rate within DB_POOL_TOLERANCE of pool / query time for each pool size.
DB_POOL_TOLERANCE = 0.25
BY_DB_POOL = Proportional(
    size="db_pool",
    wait_ms="db_ms",
    label="pool of {}",
    rule="pool / query time",
    grown="the database pool",
    grown_ok="the pool",
    tolerance=DB_POOL_TOLERANCE,
)

HYPOTHESIS = (
    "On /db {db_ms} with {connections} connections, {db_model} with a database pool of "
    "{db_sizes} connections answers pool / query time for each (within "
    "{DB_POOL_TOLERANCE:.0%}), so doubling the pool doubles the rate."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """The database pool's sizes: `5 and 10`."""
    if setup.get("db_ms") and isinstance(setup.get("db_pool"), list | tuple):
        return {"db_sizes": " and ".join(str(size) for size in setup["db_pool"])}
    return {}


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """/db through one switching model, once per database pool size."""
    chosen = next(iter(switching_models(models)), "")
    setup = {
        "connections": POOL_BOUND_CONNECTIONS,
        "db_ms": DB_MS,
        "db_pool": list(DB_POOL_SIZES),
        "db_model": chosen,
        "cores": 1,
    }
    scenario = Scenario(ID, f"/db {DB_MS}", POOL_BOUND_CONNECTIONS, (bench_scenarios.db(DB_MS),))
    runs = [
        Run(
            chosen,
            f"db pool {size}",
            db_args(size),
            scenario,
            min_window=MIN_WINDOW_S,
            database=True,
        )
        for size in (DB_POOL_SIZES if chosen else ())
    ]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """Per database pool size, the rate against pool / query time."""
    size = int(run.variant.split()[-1])
    expected = size / (setup["db_ms"] / 1000)
    figure.setdefault("runs", []).append({"db_pool": size, **base, **against(expected, summary)})


settle = noise_of_parts  # the model's figure joins one run per pool size


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """The rate ~ database pool / query time for each pool size; twice the pool, twice the
    rate."""
    unavailable = no_database(setup)
    if unavailable:
        return unavailable
    name = setup.get("db_model", "")
    if name not in figures:
        return Verdict(INCONCLUSIVE, "not checked: needs a switching model (narrowed by --models)")
    runs = sorted(figures[name]["runs"], key=lambda run: run["db_pool"])
    problems = Problems()
    ok = follows_size(
        problems,
        name,
        runs,
        BY_DB_POOL,
        setup,
        lambda run: add_errors(problems, name, run, f" with a pool of {run['db_pool']}"),
    )
    return decide_with_noise(problems, f"{name}: {ok}", figures, [name])


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The rate per database pool size."""
    name = setup.get("db_model", "")
    figure = figures.get(name)
    if not figure:
        return "(no model measured)"
    return (
        f"{setup['connections']} connections each send /db {setup['db_ms']} to {name}, whose "
        "database pool lets only so many queries run at once; the others wait for a "
        "connection: "
        + joined(
            [
                f"a pool of {run['db_pool']} {run['rps']:,.0f} req/s (expected "
                f"{run['expected_rps']:,.0f}, p99 {ms_number(run['p99_ms'])} ms)"
                for run in figure["runs"]
            ]
        )
        + ". However cheaply the model switches, the pool's size sets the rate."
    )


COLUMNS: list[Column] = [RPS, EXPECTED, OF_EXPECTED, P99, ERRORS, NOISE]


def rows(figures: Mapping[str, Mapping]) -> Rows:
    """A row per database pool size."""
    return one_row_per_run(figures, lambda model, run: f"{model}, db pool {run['db_pool']}")


def chart(axes, entry: Mapping) -> None:
    """Each pool size's rate against its expected rate, pool / query time."""
    setup = entry["setup"]
    against_expected(
        axes[0],
        rows(entry["figures"]),
        "red: expected, database pool / query time",
        f"/db {setup['db_ms']} ms, {setup['connections']} connections, server on one core",
    )

"""db-wait: a database wait is waiting too: switching models overlap queries up to the pool.

Measured with /db of rig.DB_MS (pg_sleep in a throwaway PostgreSQL) on DB_CONNECTIONS
connections, a database pool of rig.DB_POOL per server, each model alone on one core: each rate
against database pool / query time, the worker pool's against workers / query time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons import catalog
from loadtest.lessons.charts import (
    ERRORS,
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
from loadtest.lessons.rig import (
    DB_MS,
    DB_POOL,
    IO_POOL_WORKERS,
    Planned,
    Run,
    Work,
    db_args,
    server_args,
)
from loadtest.lessons.verdict import (
    DB_IDEAL_SHARE,
    INCONCLUSIVE,
    POOL,
    Problems,
    Verdict,
    add_errors,
    db_bound,
    decide_with_noise,
    no_database,
    rate_text,
    switching_figures,
    switching_models,
)

ID = "db-wait"
DATABASE = True  # its servers query the run's PostgreSQL
LESSON = catalog.get(ID, {entry.id: entry for entry in catalog.DB_CHECKED})

DB_CONNECTIONS = 100
# Each switching model >= DB_IDEAL_SHARE of database pool / query time; the worker pool at most
# workers / query time (+DB_POOL_SLACK: the window's edges).
DB_POOL_SLACK = 0.10

HYPOTHESIS = (
    "On /db {db_ms} with {connections} connections and a database pool of {db_pool} "
    "connections per server, every model but the pool answers >= {DB_IDEAL_SHARE:.0%} of "
    "database pool / query time ({db_bound}); a pool of {pool_workers} workers at most "
    "workers / query time ({workers_bound}, +{DB_POOL_SLACK:.0%})."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """What the pool's workers allow: workers / query time."""
    if setup.get("db_ms") and isinstance(setup.get("pool_workers"), int):
        return {"workers_bound": rate_text(setup["pool_workers"] / (setup["db_ms"] / 1000))}
    return {}


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """/db on DB_CONNECTIONS connections, a database pool of DB_POOL per server."""
    setup = {
        "connections": DB_CONNECTIONS,
        "db_ms": DB_MS,
        "db_pool": DB_POOL,
        "pool_workers": IO_POOL_WORKERS,
        "cores": 1,
    }
    scenario = Scenario(ID, f"/db {DB_MS}", DB_CONNECTIONS, (bench_scenarios.db(DB_MS),))
    runs = [
        Run(m, "", (*server_args(m, IO_POOL_WORKERS), *db_args(DB_POOL)), scenario, database=True)
        for m in models
    ]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The rate against what bounds it, the pool's workers or the database pool."""
    workers = setup["pool_workers"] if run.model == POOL else 0
    bound = (workers or setup["db_pool"]) / (setup["db_ms"] / 1000)
    figure.update(base, bound_rps=bound, of_bound=round(summary["rps"] / bound, 3))
    if workers:
        figure["workers"] = workers
    else:
        figure["db_pool"] = setup["db_pool"]


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Switching models >= DB_IDEAL_SHARE x pool / query time; the worker pool at most
    workers / query time."""
    unavailable = no_database(setup)
    if unavailable:
        return unavailable
    switching = switching_models(figures)
    if not figures:
        return Verdict(INCONCLUSIVE, "not checked: no model measured")
    bound = db_bound(setup)
    problems = Problems()
    for name in switching:
        rps = figures[name]["rps"]
        if rps < DB_IDEAL_SHARE * bound:
            problems.add(
                f"{name} {rate_text(rps)} is {rps / bound:.0%} of database pool / query time "
                f"{rate_text(bound)} (needs {DB_IDEAL_SHARE:.0%})",
                name,
                miss=DB_IDEAL_SHARE * bound / max(rps, 1e-9),
            )
        add_errors(problems, name, figures[name])
    parts = [
        f"{name} {rate_text(figures[name]['rps'])} ({figures[name]['rps'] / bound:.0%})"
        for name in switching
    ]
    ok = (", ".join(parts) + f" of database pool / query time {rate_text(bound)}") if parts else ""
    if POOL in figures:
        workers = setup["pool_workers"] / (setup["db_ms"] / 1000)
        rps = figures[POOL]["rps"]
        if rps > (1 + DB_POOL_SLACK) * workers:
            problems.add(
                f"the pool's {rate_text(rps)} is above workers / query time {rate_text(workers)} "
                f"(+{DB_POOL_SLACK:.0%})",
                POOL,
                miss=math.inf,  # others' CPU cannot make a pool faster
            )
        add_errors(problems, POOL, figures[POOL])
        ok += ("; " if ok else "") + (
            f"the pool {rate_text(rps)} with {setup['pool_workers']} workers "
            f"(workers / query time {rate_text(workers)})"
        )
    return decide_with_noise(problems, ok, figures, list(figures))


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The switching models wait for their queries without holding the core; the pool's
    workers wait one query each."""
    text = (
        f"Every /db holds one of the server's {setup['db_pool']} database connections for "
        f"{setup['db_ms']} ms, so {setup['connections']} connections can get at most "
        f"{db_bound(setup):,.0f} answers a second. A thread, greenlet or coroutine per "
        "connection waits for its query without holding the core: "
        + joined(
            [
                f"{name} {f['rps']:,.0f} req/s ({percent(f['of_bound'])} of it)"
                for name, f in switching_figures(figures).items()
            ]
        )
        + "."
    )
    pool = figures.get(POOL)
    if pool:
        text += (
            f" The pool's {setup['pool_workers']} workers each wait for one query at a "
            f"time: {pool['rps']:,.0f} req/s of at most {pool['bound_rps']:,.0f}, the other "
            f"connections queueing for a worker (p99 {ms_number(pool['p99_ms'])} ms)."
        )
    return text


COLUMNS: list[Column] = [
    RPS,
    (
        "bound",
        lambda f: (
            f"{f['bound_rps']:,.0f} ("
            + (f"{f['workers']} workers" if "workers" in f else f"pool {f['db_pool']}")
            + ")"
        ),
    ),
    ("of bound", lambda f: percent(f["of_bound"])),
    P99,
    ERRORS,
    NOISE,
]


def chart(axes, entry: Mapping) -> None:
    """Each model's rate against database pool / query time and its share."""
    figures, setup = entry["figures"], entry["setup"]
    model_rates(axes[0], figures)
    bound = db_bound(setup)
    limit(axes[0], bound, f"database pool / query time {bound:,.0f}", "grey")
    limit(axes[0], DB_IDEAL_SHARE * bound, f"{DB_IDEAL_SHARE:.0%} of it")
    axes[0].set_title(
        f"/db {setup['db_ms']} ms, {setup['connections']} connections, database pool "
        f"{setup['db_pool']}, server on one core",
        fontsize=9,
    )

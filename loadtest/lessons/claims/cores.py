"""cores: processes compute on every core; threads and an event loop on one at a time.

Measured with /work of about 1 ms on rig.CPU_CONNECTIONS connections, the server given every CPU
(the load generator shares them, its CPU reported): the pool of CORES_POOL_WORKERS processes'
rate against the threaded server's, and the cores each used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loadtest.lessons.catalog import Lesson
from loadtest.lessons.charts import (
    CPU_PER_REQUEST,
    RPS,
    SERVER_CORES,
    Column,
    joined,
    limit,
    model_rates,
)
from loadtest.lessons.rig import Planned, Run, Work, cpu_figures, server_args, work_1ms
from loadtest.lessons.verdict import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    OS_THREADS,
    POOL,
    Verdict,
    missing_models,
    rate_text,
)

ID = "cores"
DATABASE = False
# Checked here, not a Locust scenario (a server alone on every core is no knob preset).
LESSON = Lesson(
    "cores",
    "cores: /work on two cores",
    "Processes use cores, threads and greenlets do not: under the GIL a thread per connection and "
    "an event loop compute on one core at a time, a pool of worker processes on all of them.",
    "requests/s and the cores each server used.",
    "the process pool near two cores' worth of /work; threaded, gevent and asyncio near one.",
)

CORES_POOL_WORKERS = 2
# The process pool on two cores against the threaded server.
CORES_RATIO = 1.6
# Below this many cores of the server's allotment actually available (others took the rest),
# the cores lesson cannot be decided.
CORES_AVAILABLE = 1.6

HYPOTHESIS = (
    "With the server given {cpus} cores, /work of {work_ms:.2f} ms and {connections} "
    "connections: a pool of {pool_workers} worker processes answers >= {CORES_RATIO:g}x the "
    "threaded server."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """The server's cores (2 unless the setup says)."""
    return {"cpus": setup.get("cpus", 2)}


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """/work of about 1 ms, server and load generator on every CPU."""
    setup, scenario = work_1ms(ID, "/work ~1 ms, all cores", work, CORES_POOL_WORKERS, cores=cpus)
    setup["cpus"] = cpus
    runs = [
        Run(m, "", server_args(m, CORES_POOL_WORKERS), scenario, two_cores=True) for m in models
    ]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The server's CPU, the load generator's and the others' on the shared cores."""
    figure.update(
        base,
        **cpu_figures(summary),
        loadgen_cores=round(summary["loadgen_cpu_fraction"], 3),
        other_cores=round(summary["other_cores"], 3),
    )


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """The process pool on two cores >= CORES_RATIO x the threaded server on /work."""
    if setup.get("cpus", 0) < 2:
        return Verdict(
            INCONCLUSIVE,
            f"not checked: this machine gives {setup.get('cpus', 0)} "
            "CPU(s) to the server, the lesson needs 2",
        )
    missing = missing_models(figures, [POOL, OS_THREADS])
    if missing:
        return missing
    pool, threaded = figures[POOL], figures[OS_THREADS]
    ratio = pool["rps"] / max(threaded["rps"], 1e-9)
    used = ", ".join(f"{name} {figure['server_cores']:.2f}" for name, figure in figures.items())
    text = (
        f"the process pool answered {ratio:.2f}x the threaded server ({rate_text(pool['rps'])} vs "
        f"{rate_text(threaded['rps'])}); cores used: {used}; the load generator shared the cores "
        f"and took {pool['loadgen_cores']:.2f} of a core"
    )
    if threaded["other_cores"] > setup["cpus"] - 1:
        # Others took more than the one core threads can use: the threaded figure is too low.
        return Verdict(
            INCONCLUSIVE,
            f"{text}; but other processes took "
            f"{threaded['other_cores']:.2f} cores during the threaded run, so its one "
            "core was not free",
        )
    if ratio >= CORES_RATIO:
        return Verdict(HOLDS, text)
    # Not enough: was there a second core to use? Cores the server could have had = its
    # allotment minus what others (load generator excluded) took.
    available = setup["cpus"] - pool["other_cores"]
    if available < CORES_AVAILABLE:
        return Verdict(
            INCONCLUSIVE,
            f"{text}; the machine could not give 2 quiet cores: other "
            f"processes took {pool['other_cores']:.2f} cores during the pool's run",
        )
    return Verdict(FAILS, f"{text} (needs {CORES_RATIO:g}x)")


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The cores each model used for its rate."""
    return (
        f"The server got {setup['cores']} cores. "
        + joined(
            [
                f"{name} used {f['server_cores']:.2f} cores for {f['rps']:,.0f} req/s"
                for name, f in figures.items()
            ]
        )
        + ". Worker processes each hold their own GIL and compute in parallel; a thread "
        "per connection or one event loop computes on one core at a time, whatever the "
        "cores. The load generator shared the cores and its CPU is reported separately."
    )


COLUMNS: list[Column] = [
    RPS,
    SERVER_CORES,
    CPU_PER_REQUEST,
    ("load generator (cores)", lambda f: f"{f['loadgen_cores']:.2f}"),
    ("others (cores)", lambda f: f"{f['other_cores']:.2f}" + (" ⚠" if f.get("noisy") else "")),
]


def chart(axes, entry: Mapping) -> None:
    """Each model's rate and the cores it used, against one core's worth and every core's."""
    figures, setup = entry["figures"], entry["setup"]
    cores = iter([f["server_cores"] for f in figures.values()])
    model_rates(axes[0], figures, lambda v: f"{v:,.0f}, {next(cores):.2f} cores used")
    worth = 1000 / setup["work_ms"]
    limit(axes[0], worth, "one core", "grey")
    limit(axes[0], setup["cores"] * worth, f"{setup['cores']} cores", "grey")
    axes[0].set_title(
        f"/work {setup['work_ms']:.2f} ms, {setup['connections']} connections, "
        f"server on {setup['cores']} cores (load generator shares them)",
        fontsize=9,
    )

"""cores: processes compute on every core; threads and an event loop on one at a time.

Measured with /work of about 1 ms on rig.CPU_CONNECTIONS connections, the server given every CPU
of the run (the load generator shares them, its CPU reported). Each model that takes
`--processes` runs with 1 and with N processes (N = the run's CPUs, services/supervisor.py), the
pool with N worker processes: the rate of N processes against 1 (the pool: the cores it used)
should follow the cores the server could actually get, measured before the run
(loadtest.lessons.machine) less what the load generator and other processes took during the
run; a thread per connection with 100 threads stays on one core. The CPU a request may rise from
1 to N processes (the load generator and the processes share the cores' caches, and a core's
speed drifts between two runs of a few seconds on a shared host): a rise up to CREDITED_RISE is
credited, and a shortfall a larger rise accounts for, with the cores used, is inconclusive, as is
a /work calibration that drifted during the lesson.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from loadtest.lessons.catalog import Lesson
from loadtest.lessons.charts import (
    CPU_PER_REQUEST,
    RPS,
    SERVER_CORES,
    Column,
    Rows,
    joined,
    limit,
    one_row_per_run,
    row_bars,
)
from loadtest.lessons.claims.cpu_work import ONE_CORE
from loadtest.lessons.machine import DRIFT_BOUND
from loadtest.lessons.rig import (
    Planned,
    Run,
    Work,
    cpu_figures,
    noise_of_parts,
    server_args,
    work_1ms,
)
from loadtest.lessons.verdict import (
    INCONCLUSIVE,
    OS_THREADS,
    POOL,
    Problems,
    Verdict,
    cores_verdict,
    decide_with_noise,
    drift_verdict,
    missing_models,
    rate_text,
)
from services import models as registry

ID = "cores"
DATABASE = False
# Checked here, not a Locust scenario (a server alone on every core is no knob preset).
LESSON = Lesson(
    "cores",
    "cores: /work with 1 and with N processes",
    "Processes use cores, threads and greenlets do not: under the GIL a thread per connection and "
    "an event loop compute on one core at a time; N processes of the same model (or a pool of "
    "worker processes) on N cores.",
    "requests/s and the cores each server used, with 1 and with N processes.",
    "each model with N processes near N times its rate with one, as far as the free cores "
    "allow; the threaded server with its 100 threads on one core.",
)

# The models whose servers take --processes (the registry's `processes`), the pool aside.
PROCESS_MODELS: tuple[str, ...] = tuple(
    model.name for model in registry.MODELS if model.processes and model.name != POOL
)
# N processes reach at least this share of the cores the server could get (the free cores,
# less the load generator's, at most N) times the rate of one.
SCALE_SHARE = 0.75
# Two cores, mostly free: below it there is nothing for a second process to take.
FREE_CORES_NEEDED = 1.5
# The CPU a request of N processes against one process's of the same model: measured here over
# ten quick runs, 0.65x to 1.48x (the core's speed moved between two runs a few seconds apart:
# one process's CPU a request alone ranged 0.8-2.0 ms across runs for the same /work). A rise
# up to 1 + DRIFT_BOUND is credited (the expectation is divided by it: the cores are what the
# lesson counts); beyond it, a shortfall the rise accounts for is inconclusive when the cores
# were used, since the CPU a request does not depend on the number of processes.
CREDITED_RISE = 1 + DRIFT_BOUND

HYPOTHESIS = (
    "With the server given {cpus} CPUs ({free_cores:.2f} free cores measured before the run), "
    "/work of {work_ms:.2f} ms and {connections} connections: each of {process_models} with "
    "{cpus} processes answers >= {SCALE_SHARE:.0%} of the cores it can get (the free cores less "
    "the load generator's, at most {cpus}) times its rate with one process; a pool of {cpus} "
    "worker processes uses >= {SCALE_SHARE:.0%} of those cores and answers more than the "
    "threaded server with one process; each expectation divided by the rise of the CPU a "
    "request from one process to {cpus} (credited up to {CREDITED_RISE:.2f}x; beyond, a "
    "shortfall it accounts for is inconclusive); the threaded server with one process "
    "uses at most {ONE_CORE:g} cores, whatever its {connections} threads. Needs >= "
    "{FREE_CORES_NEEDED:g} free cores."
)


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """The models that take --processes."""
    return {"process_models": ", ".join(PROCESS_MODELS)}


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """/work of about 1 ms on every CPU: 1 and `cpus` processes per model, the pool's workers."""
    setup, scenario = work_1ms(ID, "/work ~1 ms, all cores", work, cpus, cores=cpus)
    setup.update(cpus=cpus, processes=cpus)
    runs = []
    for model in models:
        if model in PROCESS_MODELS:
            runs += [
                Run(model, f"processes {count}", ("--processes", str(count)), scenario, True)
                for count in sorted({1, cpus})
            ]
        else:
            runs.append(Run(model, "", server_args(model, cpus), scenario, two_cores=True))
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """The rate, the server's CPU, the load generator's and the others' (a share of the CPUs);
    one part per process count."""
    part = {
        **base,
        **cpu_figures(summary),
        "loadgen_cores": round(summary["loadgen_cpu_fraction"], 3),
        "other_cores": round(summary["other_cores"], 3),
        "other_cpu": round(summary["other_cores"] / max(setup["cores"], 1), 3),
    }
    if run.variant:
        figure.setdefault("runs", []).append({"processes": int(run.variant.split()[-1]), **part})
    else:
        figure.update(part, workers=setup["pool_workers"] if run.model == POOL else None)


settle = noise_of_parts


def _by_processes(figure: Mapping) -> dict[int, Mapping]:
    return {part["processes"]: part for part in figure.get("runs", ())}


def gettable(setup: Mapping, many: Mapping) -> float:
    """The cores a server of N processes could get during its run: the free cores measured
    before the run (at most what the others left it then), less the load generator's, at most
    N."""
    free = setup.get("free_cores", setup["cpus"])
    left = min(free, setup["cpus"] - many.get("other_cores", 0.0))
    return max(0.0, min(setup["processes"], left - many.get("loadgen_cores", 0.0)))


def cost_rise(many: Mapping, one: Mapping) -> float:
    """How many times the CPU a request of N processes is one process's of the same model (1
    when either is unknown or it fell)."""
    if not one.get("cpu_ms_per_request") or not many.get("cpu_ms_per_request"):
        return 1.0
    return max(1.0, many["cpu_ms_per_request"] / one["cpu_ms_per_request"])


def rise_text(rise: float) -> str:
    """The rise of the CPU a request, when there is one worth saying."""
    return f" / its CPU a request {rise:.2f}x one process's" if rise > 1.005 else ""


def rise_accounts(rise: float, shortfall: float, many: Mapping, cores: float) -> bool:
    """Whether a rise of the CPU a request beyond the credited one accounts for a shortfall of
    N processes that did use the cores: then the core's speed moved between the runs."""
    return (
        rise > CREDITED_RISE and shortfall <= rise / CREDITED_RISE and not idle_cores(many, cores)
    )


def idle_cores(many: Mapping, cores: float) -> bool:
    """Whether N processes left the cores they could get idle: no core's speed explains that."""
    return many["server_cores"] < SCALE_SHARE * cores


def _scaling(
    problems: Problems, moved: list[str], name: str, one: Mapping, many: Mapping, setup: Mapping
) -> str:
    """N processes against one: the ratio, and a problem when it falls short (in `moved` too
    when a rise of the CPU a request beyond the credited one accounts for it)."""
    cores = gettable(setup, many)
    rise = cost_rise(many, one)
    needed = max(1.0, SCALE_SHARE * cores) / min(CREDITED_RISE, rise)
    ratio = many["rps"] / max(one["rps"], 1e-9)
    text = (
        f"{name} {ratio:.2f}x ({rate_text(many['rps'])} on {many['server_cores']:.2f} cores "
        f"vs {rate_text(one['rps'])} on {one['server_cores']:.2f}; needs >= {needed:.2f}x: "
        f"{SCALE_SHARE:.0%} x {cores:.2f} gettable cores{rise_text(rise)})"
    )
    if ratio < needed:
        shortfall = needed / max(ratio, 1e-9)
        problems.add(text, name, miss=shortfall, speed_free=idle_cores(many, cores))
        if rise_accounts(rise, shortfall, many, cores):
            moved.append(text)
    return text


def _pool_cores(problems: Problems, threads: Mapping, pool: Mapping, setup: Mapping) -> str:
    """The pool's processes on the gettable cores, and a rate above one process's.

    Its cores, not its rate against threaded's: every request also crosses from the reactor to
    a worker and back (pickled), so its CPU per request is its own; a full run here had the
    pool on 1.58 cores at 1.33x threaded's rate, more cores and a higher cost per request.
    """
    cores = gettable(setup, pool)
    needed = SCALE_SHARE * cores
    text = (
        f"the pool of {pool.get('workers')} processes on {pool['server_cores']:.2f} cores (needs "
        f">= {needed:.2f} of {cores:.2f} gettable), {rate_text(pool['rps'])}: "
        f"{pool['rps'] / max(threads['rps'], 1e-9):.2f}x {OS_THREADS} x 1"
    )
    if pool["server_cores"] < needed:
        problems.add(text, POOL, miss=needed / max(pool["server_cores"], 1e-9), speed_free=True)
    elif pool["rps"] < threads["rps"]:
        problems.add(
            f"{text}: below one process's rate", POOL, miss=threads["rps"] / max(pool["rps"], 1e-9)
        )
    return text


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """N processes >= SCALE_SHARE x the gettable cores x one; threaded x1 on one core."""
    missing = missing_models(figures, [OS_THREADS])
    if missing:
        return missing
    problems = Problems()
    moved: list[str] = []
    parts = []
    for name in (m for m in PROCESS_MODELS if m in figures):
        runs = _by_processes(figures[name])
        if 1 in runs and setup["processes"] in runs and setup["processes"] > 1:
            parts.append(_scaling(problems, moved, name, runs[1], runs[setup["processes"]], setup))
    threads_alone = _by_processes(figures[OS_THREADS]).get(1, figures[OS_THREADS])
    if POOL in figures:
        parts.append(_pool_cores(problems, threads_alone, figures[POOL], setup))
    if threads_alone["server_cores"] > ONE_CORE:
        problems.add(
            f"{OS_THREADS} with one process used {threads_alone['server_cores']:.2f} cores "
            f"(needs <= {ONE_CORE:g})",
            OS_THREADS,
            miss=math.inf,
            speed_free=True,
        )
    text = "N processes against one: " + "; ".join(parts)
    unshowable = cores_verdict(setup, FREE_CORES_NEEDED, f"{text}; not decided")
    if unshowable:
        return unshowable
    text += f"; {OS_THREADS} with one process on {threads_alone['server_cores']:.2f} cores"
    return moved_or_decided(problems, moved, text, figures, setup, list(figures))


def moved_or_decided(
    problems: Problems,
    moved: list[str],
    text: str,
    figures: Mapping[str, Mapping],
    setup: Mapping,
    used: list[str],
) -> Verdict:
    """Inconclusive when the core's speed moved under the problems (the /work calibration
    drifted, or a rise of the CPU a request accounts for each); else decided with the noise."""
    drifted = drift_verdict(setup, problems)
    if drifted:
        return drifted
    if problems and len(moved) == len(problems):
        return Verdict(
            INCONCLUSIVE,
            f"{text}; but each shortfall is within the rise of the CPU a request beyond the "
            f"credited {CREDITED_RISE:.2f}x, the cores used: the core's speed moved between the "
            "runs",
        )
    return decide_with_noise(problems, text, figures, used)


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The rate and the cores of each model with 1 and N processes."""
    lines = []
    for name, figure in figures.items():
        runs = _by_processes(figure)
        if runs:
            lines.append(
                f"{name} "
                + " and ".join(
                    f"{rate_text(run['rps'])} on {run['server_cores']:.2f} cores with {count} "
                    f"process{'es' if count > 1 else ''}"
                    for count, run in sorted(runs.items())
                )
            )
        else:
            lines.append(
                f"{name} ({figure.get('workers')} worker processes) {rate_text(figure['rps'])} "
                f"on {figure['server_cores']:.2f} cores"
            )
    return (
        f"The server got {setup['cores']} CPUs ({setup.get('free_cores', setup['cores']):.2f} "
        "free before the run). "
        + joined(lines)
        + ". Each process holds its own GIL, so N processes compute on N cores, whichever "
        "model each runs; one process computes on one core at a time, however many threads "
        "or greenlets it has. The load generator shared the cores; its CPU is in the table."
    )


def rows(figures: Mapping[str, Mapping]) -> Rows:
    """A row per process count, the pool's one."""
    return one_row_per_run(
        figures,
        lambda model, run: (
            f"{model} x {run['processes']} process" + ("es" if run["processes"] > 1 else "")
        ),
    )


COLUMNS: list[Column] = [
    RPS,
    SERVER_CORES,
    CPU_PER_REQUEST,
    ("load generator (cores)", lambda f: f"{f['loadgen_cores']:.2f}"),
    ("others (cores)", lambda f: f"{f['other_cores']:.2f}" + (" ⚠" if f.get("noisy") else "")),
]


def chart(axes, entry: Mapping) -> None:
    """Each run's rate with the cores it used, against one core's worth and every core's."""
    figures, setup = entry["figures"], entry["setup"]
    row_bars(axes[0], rows(figures))
    worth = 1000 / setup["work_ms"]
    limit(axes[0], worth, "one core", "grey")
    limit(axes[0], setup["cores"] * worth, f"{setup['cores']} cores", "grey")
    axes[0].set_title(
        f"/work {setup['work_ms']:.2f} ms, {setup['connections']} connections, server on "
        f"{setup['cores']} CPUs (load generator shares them)",
        fontsize=9,
    )

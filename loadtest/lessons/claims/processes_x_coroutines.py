"""processes-x-coroutines: coroutines overlap the waits, processes add the cores; together they win.

Production Python servers combine the two: gunicorn with N gevent workers, `uvicorn --workers
N`. Measured with a mix of mostly /sleep and some /work on CONNECTIONS_PER_CPU connections per
CPU, the server given every CPU of the run (the load generator shares them, its CPU reported, as
in `cores`): each event loop with 1 and with N processes (N = the run's CPUs,
services/supervisor.py) and the thread per connection with one. Every model overlaps the
waits, so one process runs out of CPU (the /work share and each request's own cost) long before
the waits bound it; N processes of an event loop get N cores' worth, and the thread per
connection, however many threads, computes on one core under the GIL. The rate of N processes
should follow the cores the server could actually get (the free cores measured before the run,
less what the load generator took), times the rate of the same loop with one process and of
threaded with one, capped by what the waits allow (connections / the mix's mean request time).
A rise of the CPU a request from 1 to N processes (each loop serving fewer connections a
wake-up, or the core's speed drifting) is credited up to CREDITED_RISE; a shortfall a larger
rise accounts for, or a /work calibration that drifted, is inconclusive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.scenarios import Scenario
from loadtest.lessons.catalog import Lesson
from loadtest.lessons.charts import (
    CPU_PER_REQUEST,
    LIMIT,
    P99,
    RPS,
    SERVER_CORES,
    Column,
    Rows,
    joined,
    limit,
    one_row_per_run,
    row_bars,
)
from loadtest.lessons.claims.cores import (
    CREDITED_RISE,
    FREE_CORES_NEEDED,
    SCALE_SHARE,
    cost_rise,
    gettable,
    idle_cores,
    moved_or_decided,
    rise_accounts,
    rise_text,
)
from loadtest.lessons.rig import Planned, Run, Work, cpu_figures, noise_of_parts
from loadtest.lessons.verdict import (
    EVENT_LOOPS,
    OS_THREADS,
    Problems,
    Verdict,
    cores_verdict,
    missing_models,
    rate_text,
)
from services import models as registry

ID = "processes-x-coroutines"
DATABASE = False
# Checked here, not a Locust scenario (a server alone on every core is no knob preset).
LESSON = Lesson(
    ID,
    "processes-x-coroutines: mostly /sleep, some /work, 1 and N processes",
    "Real Python servers run processes x coroutines (gunicorn with N gevent workers, uvicorn "
    "--workers N): coroutines overlap every connection's waits, processes add the cores the GIL "
    "keeps one process from; on mostly waiting with some computing, an event loop with N "
    "processes beats the same loop with one and a thread per connection.",
    "requests/s and the cores used by each event loop with 1 and N processes and by the "
    "threaded server with one.",
    "each event loop with N processes near N times its rate with one and threaded's, as far as "
    "the free cores allow; every single process on about one core.",
)

# The mix, measured by hand on 2 CPUs (docs/LESSONS.md): 9 of 10 requests /sleep, 1 of 10
# /work of WORK_MS_TIMES x the ~1 ms calibration. A process then needs 0.6-0.9 ms of CPU a
# request (0.5 ms of /work, the rest its own handling), so one core answers 1,100-1,800 req/s
# while the waits would allow about 10,800: the CPU, not the waits, bounds one process, and N
# cores' worth stays far under the waits' ceiling, so N processes keep every core busy (1.82-1.87
# of 2 cores here; with /work of 2 ms, 1.60-1.78: nearer the ceiling, the cores idle at times).
SLEEP_MS, SLEEP_WEIGHT = 20, 9
WORK_MS_TIMES, WORK_WEIGHT = 5, 1
# Connections grow with the CPUs so that the waits' ceiling stays above N cores' worth.
CONNECTIONS_PER_CPU = 100
# The CPU a request of N processes of a loop against one process's rises too as each process
# serves 1/N of the connections, so each wake-up of its loop serves fewer (measured here:
# asyncio 1.1-1.2x): credited as in `cores` (CREDITED_RISE).
# The event loops run with 1 and N processes (those that take --processes: all of them today).
LOOPS: tuple[str, ...] = tuple(name for name in EVENT_LOOPS if registry.get(name).processes)

HYPOTHESIS = (
    "With the server given {cpus} CPUs ({free_cores:.2f} free cores measured before the run) "
    "and {connections} connections each sending {mix}: each of {loops} with {cpus} processes "
    "answers >= {SCALE_SHARE:.0%} of the cores it can get (the free cores less the load "
    "generator's, at most {cpus}) times its own rate with one process, and as much times the "
    "rate of {threads} with one process, each divided by the rise of its CPU a request from "
    "one process to {cpus} (credited up to {CREDITED_RISE:.2f}x; beyond, a shortfall it "
    "accounts for is inconclusive); either capped at {SCALE_SHARE:.0%} of what the waits "
    "allow, {connections} connections / {mean_ms:.2f} ms mean request time = {ceiling}. "
    "Needs >= {FREE_CORES_NEEDED:g} free cores."
)


def _mean_ms(setup: Mapping) -> float:
    """The mix's mean request time if nothing queued: its waits and its /work."""
    total = setup["sleep_weight"] + setup["work_weight"]
    return (
        setup["sleep_weight"] * setup["sleep_ms"] + setup["work_weight"] * setup["work_ms"]
    ) / total


def ceiling(setup: Mapping) -> float:
    """What the waits allow, in requests/s: connections / the mean request time."""
    return setup["connections"] / (_mean_ms(setup) / 1000)


def _mix(setup: Mapping) -> str:
    total = setup["sleep_weight"] + setup["work_weight"]
    return (
        f"{setup['sleep_weight'] / total:.0%} /sleep {setup['sleep_ms']} and "
        f"{setup['work_weight'] / total:.0%} /work of {setup['work_ms']:.2f} ms"
    )


def hypothesis_values(setup: Mapping) -> dict[str, object]:
    """The mix in words, the event loops, and the waits' ceiling."""
    return {
        "mix": _mix(setup),
        "loops": ", ".join(LOOPS),
        "threads": OS_THREADS,
        "mean_ms": _mean_ms(setup),
        "ceiling": rate_text(ceiling(setup)),
    }


def plan(models: Sequence[str], work: Work, cpus: int) -> Planned:
    """The mix on every CPU: each event loop with 1 and `cpus` processes, threaded with one."""
    rounds = WORK_MS_TIMES * work.rounds_1ms
    connections = CONNECTIONS_PER_CPU * cpus
    setup = {
        "connections": connections,
        "sleep_ms": SLEEP_MS,
        "sleep_weight": SLEEP_WEIGHT,
        "work_ms": rounds * work.round_ns / 1e6,
        "work_rounds": rounds,  # recalibrated before the lesson (rig.recalibrate)
        "work_weight": WORK_WEIGHT,
        "cpus": cpus,
        "cores": cpus,
        "processes": cpus,
    }
    scenario = Scenario(
        ID,
        f"mostly /sleep, some /work, {connections} conns",
        connections,
        (
            bench_scenarios.sleep(SLEEP_MS, SLEEP_WEIGHT),
            bench_scenarios.work(rounds, WORK_WEIGHT),
        ),
    )
    runs = []
    for model in models:
        counts = sorted({1, cpus}) if model in LOOPS else [1] if model == OS_THREADS else []
        runs += [
            Run(model, f"processes {count}", ("--processes", str(count)), scenario, True)
            for count in counts
        ]
    return setup, runs


def add_figures(figure: dict, run: Run, summary: Mapping, base: dict, setup: Mapping) -> None:
    """Per process count: the rate, p99, the server's CPU, the load generator's and the
    others' (a share of the CPUs)."""
    figure.setdefault("runs", []).append(
        {
            "processes": int(run.variant.split()[-1]),
            **base,
            **cpu_figures(summary),
            "loadgen_cores": round(summary["loadgen_cpu_fraction"], 3),
            "other_cores": round(summary["other_cores"], 3),
            "other_cpu": round(summary["other_cores"] / max(setup["cores"], 1), 3),
        }
    )


settle = noise_of_parts


def _by_processes(figure: Mapping) -> dict[int, Mapping]:
    return {part["processes"]: part for part in figure.get("runs", ())}


def needed(setup: Mapping, many: Mapping, base: Mapping, one: Mapping) -> tuple[float, float, bool]:
    """The rate N processes must reach against `base` (a run with one process; `one`: the same
    loop's): SCALE_SHARE x the cores they could get (the free cores less the load generator's,
    at most N, and at least once the rate of one) x its rate, divided by the credited rise of
    the CPU a request, capped at SCALE_SHARE x what the waits allow; with the gettable cores
    and whether the cap decided."""
    cores = gettable(setup, many)
    credit = min(CREDITED_RISE, cost_rise(many, one))
    scaled = max(1.0, SCALE_SHARE * cores) * base["rps"] / credit
    capped = SCALE_SHARE * ceiling(setup)
    return min(scaled, capped), cores, capped < scaled


def _against(
    problems: Problems,
    moved: list[str],
    label: str,
    many: Mapping,
    base: Mapping,
    one: Mapping,
    setup: Mapping,
    *names: str,
) -> str:
    """N processes against one (`label`; `one`: the same loop's run with one process): the
    ratio, and a problem when it falls short (in `moved` too when the rise of the CPU a
    request beyond the credited one accounts for it)."""
    need, cores, capped = needed(setup, many, base, one)
    ratio = many["rps"] / max(base["rps"], 1e-9)
    rise = cost_rise(many, one)
    text = (
        f"{ratio:.2f}x {label} ({rate_text(base['rps'])} on {base['server_cores']:.2f} cores; "
        f"needs >= {rate_text(need)}: "
        + (
            f"{SCALE_SHARE:.0%} of what the waits allow"
            if capped
            else f"{SCALE_SHARE:.0%} x {cores:.2f} gettable cores" + rise_text(rise)
        )
        + ")"
    )
    if many["rps"] < need:
        shortfall = need / max(many["rps"], 1e-9)
        problem = f"{names[0]} x {setup['processes']}: {text}"
        problems.add(problem, *names, miss=shortfall, speed_free=idle_cores(many, cores))
        if rise_accounts(rise, shortfall, many, cores):
            moved.append(problem)
    return text


def check(figures: Mapping[str, Mapping], setup: Mapping) -> Verdict:
    """Each loop x N >= SCALE_SHARE x the gettable cores x its own x 1 and threaded x 1."""
    loops = [name for name in LOOPS if name in figures]
    missing = missing_models(figures, [OS_THREADS, *([] if loops else LOOPS)])
    if missing:
        return missing
    count = setup["processes"]
    threads = _by_processes(figures[OS_THREADS])[1]
    problems = Problems()
    moved: list[str] = []
    parts = []
    for name in loops:
        runs = _by_processes(figures[name])
        if count > 1 and {1, count} <= set(runs):
            many = runs[count]
            parts.append(
                f"{name} x {count} {rate_text(many['rps'])} on {many['server_cores']:.2f} cores: "
                + _against(
                    problems, moved, "its own with one process", many, runs[1], runs[1], setup, name
                )
                + " and "
                + _against(
                    problems,
                    moved,
                    f"{OS_THREADS} x 1",
                    many,
                    threads,
                    runs[1],
                    setup,
                    name,
                    OS_THREADS,
                )
            )
    text = "; ".join(parts or ["no event loop ran with 1 and N processes"])
    text += f"; the waits allow {rate_text(ceiling(setup))}"
    unshowable = cores_verdict(setup, FREE_CORES_NEEDED, f"{text}; not decided")
    if unshowable:
        return unshowable
    return moved_or_decided(problems, moved, text, figures, setup, [*loops, OS_THREADS])


def reading(figures: Mapping[str, Mapping], setup: Mapping) -> str:
    """The rate and the cores of each run; why N processes of an event loop win."""
    lines = [
        f"{label} {rate_text(run['rps'])} on {run['server_cores']:.2f} cores "
        f"({run['cpu_ms_per_request']:.2f} ms CPU a request, p99 {run['p99_ms']:.0f} ms)"
        for label, run in rows(figures)
    ]
    return (
        f"The server got {setup['cores']} CPUs ({setup.get('free_cores', setup['cores']):.2f} "
        f"free before the run) for {setup['connections']} connections sending {_mix(setup)}. "
        + joined(lines)
        + f". Every model overlaps the waits, which would allow {rate_text(ceiling(setup))}; "
        "what bounds one process is its CPU (the /work share and each request's own cost), "
        "on one core however many threads or greenlets it runs, since each process holds "
        "one GIL. N processes of an event loop compute on N cores while each still overlaps "
        "its connections' waits: the way gunicorn's gevent workers and uvicorn --workers "
        "serve. The load generator shared the cores; its CPU is in the table."
    )


def _label(model: str, run: Mapping) -> str:
    return f"{model} x {run['processes']} process" + ("es" if run["processes"] > 1 else "")


def rows(figures: Mapping[str, Mapping]) -> Rows:
    """A row per run: `gevent x 2 processes`."""
    return one_row_per_run(figures, _label)


COLUMNS: list[Column] = [
    RPS,
    SERVER_CORES,
    CPU_PER_REQUEST,
    P99,
    ("load generator (cores)", lambda f: f"{f['loadgen_cores']:.2f}"),
    ("others (cores)", lambda f: f"{f['other_cores']:.2f}" + (" ⚠" if f.get("noisy") else "")),
]


def _marks(figures: Mapping[str, Mapping], setup: Mapping) -> list[float | None]:
    """Per row, the rate N processes of a loop had to reach (the higher of its two bars)."""
    out: list[float | None] = []
    threads = _by_processes(figures.get(OS_THREADS, {})).get(1)
    for model, figure in figures.items():  # in the order of `rows`
        one = _by_processes(figure).get(1)
        for run in figure.get("runs", ()):
            if model not in LOOPS or run["processes"] == 1 or one is None:
                out.append(None)
                continue
            bases = [one] + ([threads] if threads else [])
            out.append(max(needed(setup, run, base, one)[0] for base in bases))
    return out


def chart(axes, entry: Mapping) -> None:
    """Each run's rate, what N processes had to reach (red marks) and what the waits allow."""
    figures, setup = entry["figures"], entry["setup"]
    pairs = rows(figures)
    marks = _marks(figures, setup)
    row_bars(
        axes[0],
        pairs,
        reach=[mark or run["rps"] for mark, (_, run) in zip(marks, pairs, strict=True)],
    )
    for index, mark in enumerate(marks):
        if mark is not None:
            axes[0].plot([mark] * 2, [index - 0.4, index + 0.4], color=LIMIT, linewidth=2)
    limit(axes[0], ceiling(setup), "what the waits allow", "grey")
    axes[0].set_title(
        f"{_mix(setup).replace(' and ', ', ').replace(' of ', ' ')}; {setup['connections']} "
        f"conns; {setup['cores']} CPUs shared with the load generator; red: needed",
        fontsize=9,
    )

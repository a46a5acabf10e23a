"""`python -m loadtest.lessons`: check each lesson's claim against each model alone.

Prints progress, then per lesson the claim, the hypothesis in numbers, the figures per model and
a verdict with its reason; writes lessons.json, lessons.md and one chart per lesson (default
results/lessons/, which also refreshes the Lessons section of the README). Exit code 1 when a
claim fails, 2 on bad arguments; an inconclusive lesson (a busy machine, a narrowed --models)
is said, not failed. The database lessons (db-wait, db-pool-bound, undetected-io) query one
throwaway PostgreSQL (loadtest/tools/postgres.py) started for the run and deleted at its end;
without
PostgreSQL binaries here they are inconclusive, with how to install them. See docs/LESSONS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from loadtest.bench import harness, loadgen
from loadtest.bench import scenarios as bench_scenarios
from loadtest.bench.report import machine_info
from loadtest.lessons import claims, machine, report
from loadtest.lessons.rig import (
    FULL,
    QUICK,
    Pace,
    Plan,
    Rig,
    Run,
    Work,
    calibrate,
    estimate_seconds,
    make_rig,
    run_plans,
)
from loadtest.lessons.verdict import FAILS, INCONCLUSIVE
from loadtest.tools import cli, postgres
from services import models

DEFAULT_OUT = harness.ROOT / "results" / "lessons"
# Above this share of the whole machine busy before the run, say the figures will be noisy.
BUSY_MACHINE = 0.15


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = cli.parser(
        "loadtest.lessons",
        "Check each lesson's claim against each server model alone, with the same CPU "
        "allotment, and write verdicts, figures and charts.",
    )
    cli.add_names(parser, "--lessons", claims.CHECKED_IDS, "lesson", canonical=True)
    cli.add_names(parser, "--models", models.NAMES, "model", canonical=True)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one short run per figure ({QUICK.duration:g} s; CI), "
        f"instead of the median of {FULL.reps} x "
        f"{FULL.duration:g} s",
    )
    cli.add_path(parser, "--out", DEFAULT_OUT, "output directory")
    return parser


def _background_text(before: float, after: float) -> str:
    busiest = max(before, after)
    text = (
        f"Other processes kept {before:.0%} of the machine's CPU busy before the run and "
        f"{after:.0%} after"
    )
    if busiest > BUSY_MACHINE:
        return text + " — a busy machine: figures flagged ⚠ are noisy."
    return text + " — quiet."


def start_database(
    plans: list[Plan],
    rig: Rig,
    stack: contextlib.ExitStack,
    progress: harness.Progress,
) -> None:
    """One throwaway PostgreSQL for every lesson that queries one, closed with `stack`.

    It runs beside the load generator, off the server's core, so its CPU is not taken for
    noise. Without PostgreSQL here (or when it fails to start), those lessons lose their runs
    and are inconclusive with the reason; the others run as ever.
    """
    needing = [item for item in plans if item.needs_database]
    if not needing:
        return
    problem = ""
    try:
        # Its 200 connections hold every server of a lesson at once (measure_in_turn): at most
        # 6 servers x a pool of 20 (undetected-io).
        database = stack.enter_context(postgres.Postgres())
    except postgres.PostgresUnavailable as error:
        problem = f"no PostgreSQL here: {error}"
    except postgres.PostgresError as error:
        problem = f"PostgreSQL did not start: {str(error).splitlines()[0]}"
    if problem:
        progress.note(
            f"lessons: {', '.join(item.lesson for item in needing)} not checked: {problem}"
        )
        for item in needing:
            item.setup["database_unavailable"] = problem
            item.runs = []
        return
    rig.database_env = database.env()
    if rig.one_core.loadgen:
        pin_tree(database.pid, rig.one_core.loadgen)
    names = ", ".join(item.lesson for item in needing)
    progress.note(f"lessons: a throwaway PostgreSQL on port {database.port} for {names}")


def pin_tree(pid: int | None, cpus: frozenset[int]) -> None:
    """Pin a process and its children (those it forks later inherit it)."""
    import psutil

    if pid is None:
        return
    with contextlib.suppress(psutil.Error, OSError):
        parent = psutil.Process(pid)
        for process in (parent, *parent.children(recursive=True)):
            with contextlib.suppress(psutil.Error, OSError):
                process.cpu_affinity(sorted(cpus))


def main(argv: list[str] | None = None) -> int:
    """Run the chosen lessons and write the results; returns the exit code (a failed or
    interrupted measurement exits: harness.measuring)."""
    args = build_parser().parse_args(argv)
    pace = QUICK if args.quick else FULL
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"lessons: cannot write to {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        rig = make_rig(pace, harness.Progress(0))
    except loadgen.LoadgenError as error:
        print(f"lessons: {error}", file=sys.stderr)
        return 2
    if rig.one_core.loadgen:
        os.sched_setaffinity(0, rig.one_core.loadgen)  # our own sampling stays off the server
    cpus = len(os.sched_getaffinity(0) | (rig.all_cores.server or frozenset()))
    found = measure_machine(rig)
    work = calibrate()
    rig.round_ns = work.round_ns
    plans = [claims.plan(lesson, args.models, work, cpus) for lesson in args.lessons]
    for item in plans:
        # What each lesson's expectation is derived from (loadtest.lessons.machine).
        item.setup.update(
            free_cores=found.free_cores, loadgen_ceiling_rps=found.loadgen_ceiling_rps
        )
    rig.machine = found
    with contextlib.ExitStack() as stack:
        start_database(plans, rig, stack, rig.progress)
        return _run(args, pace, rig, work, plans)


def measure_machine(rig: Rig) -> machine.Machine:
    """What this machine can give the lessons, measured now: the free cores of the run's CPUs
    and the load generator's ceiling (echo against its own C server, one core each)."""
    rig.progress.note("lessons: measuring the machine (free cores, the load generator's ceiling)")
    scenario = bench_scenarios.Scenario("ceiling", "echo 64 B", 100, (bench_scenarios.echo(64),))
    ceiling = harness.measure_ceiling(rig.binary, scenario, rig.one_core, 1.0, 0.3)["rps"]
    found = machine.measure(rig.all_cores.server, loadgen_ceiling_rps=round(ceiling))
    rig.progress.note(
        f"lessons: {found.cpus} CPUs, {found.free_cores:.2f} free cores ("
        + ", ".join(f"CPU {cpu} {share:.0%}" for cpu, share in found.free_by_cpu.items())
        + f"); the load generator's ceiling {ceiling:,.0f} req/s"
    )
    return found


def _run(
    args: argparse.Namespace,
    pace: Pace,
    rig: Rig,
    work: Work,
    plans: list[Plan],
) -> int:
    """Measure the plans, print and write the results; the exit code."""
    background = _announce(args, pace, rig, work, plans)
    entries: list[dict] = []

    def on_lesson(item: Plan, results: dict[Run, dict]) -> None:
        entry = _lesson_entry(item, claims.figures(item, results))
        entries.append(entry)
        print("\n" + report.console_block(entry) + "\n", flush=True)  # results: stdout

    with harness.measuring("lessons"):
        run_plans(plans, rig, on_lesson)
    after = harness.background_load()
    results = _results(pace, rig, work, entries, background, after)
    _write(results, args, rig.progress)
    undecided = [entry["id"] for entry in entries if entry["verdict"] == INCONCLUSIVE]
    if undecided:
        rig.progress.note(
            f"lessons: warning: {', '.join(undecided)} inconclusive: this machine could not "
            "show the claim (each reason says why); not a failure"
        )
    return 1 if any(entry["verdict"] == FAILS for entry in entries) else 0


def _announce(
    args: argparse.Namespace,
    pace: Pace,
    rig: Rig,
    work: Work,
    plans: list[Plan],
) -> float:
    """Set each plan's window and the rig's progress, say what will run (and whether the
    machine is busy); the machine's background load before the run."""
    for item in plans:
        item.setup["window_s"] = max((rig.window(run) for run in item.runs), default=0.0)
    progress = rig.progress = harness.Progress(sum(len(item.runs) for item in plans) * pace.reps)
    background = harness.background_load()
    progress.note(
        f"lessons: {len(plans)} lessons x {', '.join(args.models)}: {progress.total} "
        f"measurements, about {harness.duration_text(estimate_seconds(plans, pace))}; "
        f"{rig.one_core.describe()} (cores: server on CPU "
        f"{','.join(map(str, sorted(rig.all_cores.server or ())))}, load generator too); "
        f"/work ~1 ms = {work.rounds_1ms:,} rounds"
    )
    if background > BUSY_MACHINE:
        progress.note(
            f"lessons: warning: other processes keep {background:.0%} of the CPU "
            "busy; figures will be noisy and failing checks inconclusive"
        )
    return background


def _lesson_entry(item: Plan, figures: dict[str, dict]) -> dict:
    """One lesson's result: claim, hypothesis, verdict with its reason, figures, reading."""
    lesson = claims.lesson(item.lesson)
    verdict = claims.decide(item.lesson, figures, item.setup)
    return {
        "id": item.lesson,
        "title": lesson.title,
        "claim": lesson.claim,
        "hypothesis": claims.hypothesis(item.lesson, item.setup),
        "verdict": verdict.verdict,
        "reason": verdict.reason,
        "setup": item.setup,
        "figures": figures,
        "reading": claims.reading(item.lesson, figures, item.setup),
    }


def _method(rig: Rig) -> str:
    """How the lessons were measured, in a sentence or two."""
    return (
        f"each model alone; {rig.one_core.describe()} (cpu-work, cores and "
        "processes-x-coroutines: server and load generator on every CPU); the C load "
        "generator of the benchmark, "
        "closed loop, every reply checked; a figure is flagged noisy (⚠) when other "
        f"processes took more than {harness.NOISY_OTHER_FRACTION:.0%} of the "
        "server's CPU, and a check that fails on noisy figures is inconclusive when the "
        "noise could account for the miss (others taking a share s of the core explain at "
        "most 1 / (1 - s)); a larger miss fails."
        + (
            " The database lessons query a throwaway PostgreSQL pinned beside the load "
            "generator, off the server's core."
            if rig.database_env
            else ""
        )
    )


def _results(
    pace: Pace,
    rig: Rig,
    work: Work,
    entries: list[dict],
    background: float,
    after: float,
) -> dict[str, Any]:
    """lessons.json's content: when, where, how, the machine's load and every lesson."""
    return {
        "when": cli.timestamp(),
        "machine": machine_info(),
        "pace": {
            "quick": pace.quick,
            "reps": pace.reps,
            "duration_s": pace.duration,
            "warmup_s": pace.warmup,
            "noisy_retries": pace.noisy_retries,
        },
        "method": _method(rig),
        "resources": rig.machine.as_json() if rig.machine else None,
        "background": {
            "before": round(background, 3),
            "after": round(after, 3),
            "text": _background_text(background, after),
        },
        "work": {
            "rounds_1ms": work.rounds_1ms,
            "rounds_100ms": work.rounds_100ms,
            "round_ns": round(work.round_ns, 2),
        },
        "lessons": entries,
    }


def _write(results: dict[str, Any], args: argparse.Namespace, progress: harness.Progress) -> None:
    """Write the charts, lessons.json and lessons.md, print the summary and say what was
    written."""
    entries = results["lessons"]
    for entry in entries:
        entry["chart"] = report.write_chart(entry, results, args.out)
    report.write_json(results, args.out)
    markdown = report.write_markdown(results, args.out)
    print(report.summary_table(results))
    progress.note(
        f"lessons: wrote {args.out}/lessons.json, {markdown.name} and "
        + ", ".join(entry["chart"] for entry in entries if entry["chart"])
    )
    progress.note("lessons: " + results["background"]["text"])
    cli.docs_hint(args.out, DEFAULT_OUT, lambda text: progress.note(f"lessons: {text}"))


if __name__ == "__main__":
    sys.exit(main())

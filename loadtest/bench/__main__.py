"""`python -m loadtest.bench`: measure every model alone, next to its textbook version.

Writes results/bench.json, results/bench.md and PNG charts. The `/db` scenarios run against one
throwaway PostgreSQL (loadtest/tools/postgres.py), started for them and closed at the end; without
PostgreSQL's binaries they are skipped, with the install hint in the report. With
`--open-loop`: latency against rising offered load per model instead (loadtest/bench/openloop.py),
results/bench-open-loop.json and results/open-loop.png. See docs/BENCHMARK.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

from loadtest.bench import harness, loadgen, openloop, report
from loadtest.bench.scenarios import (
    FAMILIES,
    KINDS,
    MIX_DESCRIPTION,
    PROCESSES,
    Scenario,
    Target,
    build_scenarios,
    build_targets,
    calibrate_work_rounds,
)
from loadtest.tools import cli
from loadtest.tools.postgres import Postgres, PostgresError, PostgresUnavailable
from services.config import Settings

DEFAULT_OUT = harness.ROOT / "results"


def build_parser(scenario_names: list[str]) -> argparse.ArgumentParser:
    """The command line."""
    parser = cli.parser(
        "loadtest.bench",
        "Benchmark each server model alone, with metrics on and off, next to a textbook "
        "implementation of the same model.",
    )
    cli.add_names(parser, "--scenarios", scenario_names, "scenario")
    cli.add_names(parser, "--models", list(FAMILIES), "model")
    cli.add_names(parser, "--kinds", KINDS, "kind", help="which servers per model")
    cli.add_number(parser, "--duration", 1.0, "measured seconds per run")
    cli.add_number(parser, "--warmup", 0.5, "seconds of load before measuring, per run")
    cli.add_number(parser, "--reps", 3, "runs per server and scenario; figures are medians")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="pool workers, ours and textbook (default: CPU count)",
    )
    cli.add_path(parser, "--out", DEFAULT_OUT, "output directory")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the server and the load generator to separate CPUs",
    )
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip measuring the load generator against its C echo server",
    )
    cli.add_number(
        parser,
        "--noisy-retries",
        2,
        "measure a run again when other work took more than "
        f"{harness.NOISY_OTHER_FRACTION:.0%}% of the server CPU",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument(
        "--open-loop",
        action="store_true",
        help="instead: offer each model (ours, metrics on) rising rates on a fixed timetable, "
        f"{openloop.STEPS[0]} %% to {openloop.STEPS[-1]} %% of its closed-loop rate, and chart "
        "latency against offered load; measures the first of --scenarios",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="with --open-loop: only the steps "
        + ", ".join(f"{step} %%" for step in openloop.QUICK_STEPS),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results; returns the exit code (a failed or interrupted
    measurement exits: harness.measuring)."""
    work_rounds = 20_000  # replaced by a measurement below
    scenario_names = list(build_scenarios(work_rounds))
    args = build_parser(scenario_names).parse_args(argv)
    if not _numbers_valid(args):
        return 2
    binary = loadgen.built_for("bench")
    if binary is None:
        return 2
    if not _mode_valid(args, work_rounds):
        return 2

    harness.raise_open_file_limit()
    pinning = harness.Pinning.choose(args.pin)
    if pinning.loadgen:
        os.sched_setaffinity(0, pinning.loadgen)  # the harness's own sampling stays off the server
    work_rounds, work_round_ns = calibrate_work_rounds()
    if args.open_loop:
        return _run_open_loop(args, binary, pinning, work_rounds)
    scenarios = {name: build_scenarios(work_rounds)[name] for name in args.scenarios}
    targets = build_targets(args.models, args.kinds, args.workers)
    postgres, skipped = _database_for(scenarios)
    for name in skipped:
        del scenarios[name]
        if not args.quiet:
            print(f"bench: {name}: {skipped[name]}", file=sys.stderr)

    total = sum(len(_targets_for(scenario, targets)) for scenario in scenarios.values()) * args.reps
    progress = harness.Progress(total, enabled=not args.quiet)
    _announce_plan(progress, args, scenarios, targets, pinning, work_rounds)
    background = _warn_background_load(progress)
    meta = _meta(args, pinning, work_rounds, work_round_ns, background)
    several = sorted({target.family for target in targets if target.every_cpu})
    if several:
        meta["several_processes"] = {
            "families": several,
            "processes": PROCESSES,
            "pinning": pinning.every_cpu().describe(),
        }
    runs = _measure(
        args, scenarios, targets, postgres, _Rig(binary, pinning, progress, work_rounds), meta
    )
    results = _results(args, meta, scenarios, skipped, targets, runs)
    _write_results(results, args.out, progress)
    return 0


def _numbers_valid(args: argparse.Namespace) -> bool:
    """Whether the durations and counts make sense; says what is wrong when they do not."""
    if (
        args.duration <= 0
        or args.warmup < 0
        or args.reps < 1
        or args.workers < 1
        or args.noisy_retries < 0
    ):
        print(
            "--duration must be > 0, --warmup and --noisy-retries >= 0, --reps and --workers >= 1",
            file=sys.stderr,
        )
        return False
    return True


def _mode_valid(args: argparse.Namespace, work_rounds: int) -> bool:
    """Whether --quick and --open-loop go together with the rest; says why when they do not."""
    if args.quick and not args.open_loop:
        print("--quick goes with --open-loop", file=sys.stderr)
        return False
    if args.open_loop and build_scenarios(work_rounds)[args.scenarios[0]].database:
        print("--open-loop does not measure the /db scenarios", file=sys.stderr)
        return False
    return True


def _run_open_loop(
    args: argparse.Namespace, binary: Path, pinning: harness.Pinning, work_rounds: int
) -> int:
    """`--open-loop`: sweep each model's offered load on the first scenario instead."""
    sweep = openloop.Sweep(
        build_scenarios(work_rounds)[args.scenarios[0]],
        binary,
        pinning,
        openloop.QUICK_STEPS if args.quick else openloop.STEPS,
        args.duration,
        args.warmup,
        args.noisy_retries,
    )
    openloop.run(
        build_targets(args.models, ["ours"], args.workers),
        sweep,
        {**openloop.meta_for(args, pinning), "work_rounds": work_rounds},
        args.out,
        args.quiet,
    )
    cli.docs_hint(args.out, DEFAULT_OUT, print)
    return 0


def _announce_plan(
    progress: harness.Progress,
    args: argparse.Namespace,
    scenarios: dict[str, Scenario],
    targets: list[Target],
    pinning: harness.Pinning,
    work_rounds: int,
) -> None:
    """Say how many runs are coming, about how long they take, and how the CPUs are pinned."""
    per_run = args.duration + args.warmup + 0.6
    several = sorted({target.family for target in targets if target.every_cpu})
    progress.note(
        f"bench: {len(targets)} servers x {len(scenarios)} scenarios x {args.reps} reps"
        + (" (/db: no textbooks)" if any(s.database for s in scenarios.values()) else "")
        + f" = {progress.total} runs, about {harness.duration_text(progress.total * per_run)} "
        f"plus server start-ups; {pinning.describe()}"
        + (f" ({', '.join(several)}: {pinning.every_cpu().describe()})" if several else "")
        + f"; /work {work_rounds} rounds ≈ 1 ms"
    )


def _warn_background_load(progress: harness.Progress) -> float:
    """The share of this machine's CPU other processes keep busy, with a warning when high."""
    background = harness.background_load()
    if background > 0.15:
        progress.note(
            f"bench: warning: other processes keep {background:.0%} of this machine's CPU busy; "
            "the figures will be noisy (see the 'other on server CPU' column)"
        )
    return background


def _meta(
    args: argparse.Namespace,
    pinning: harness.Pinning,
    work_rounds: int,
    work_round_ns: float,
    background: float,
) -> dict:
    """bench.json's "meta": how, where and when; "ceiling" and "postgres" filled in later."""
    return {
        "date": cli.timestamp(),
        "machine": report.machine_info(),
        "pinning": pinning.describe(),
        "reps": args.reps,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "workers": args.workers,
        "work_rounds": work_rounds,
        "work_round_ns": round(work_round_ns, 2),
        "mix": MIX_DESCRIPTION,
        "loadgen_saturation_threshold": loadgen.SATURATION_CPU_FRACTION,
        "noisy_threshold": harness.NOISY_OTHER_FRACTION,
        "noisy_retries": args.noisy_retries,
        "ceiling": None,
        "background_cpu_fraction_at_start": round(background, 3),
        "postgres": None,
    }


@dataclasses.dataclass(frozen=True)
class _Rig:
    """What every measurement uses: the load generator, the CPU pinning, the progress lines
    and the /work size."""

    binary: Path
    pinning: harness.Pinning
    progress: harness.Progress
    work_rounds: int


def _measure(
    args: argparse.Namespace,
    scenarios: dict[str, Scenario],
    targets: list[Target],
    postgres: Postgres | None,
    rig: _Rig,
    meta: dict,
) -> list[dict]:
    """The load generator's ceiling (into meta), then every scenario's runs, one family at a
    time; PostgreSQL started for the first `/db` scenario (into meta) and closed at the end."""
    # The database closes before `measuring` turns an error into the exit.
    with harness.measuring("bench"), contextlib.ExitStack() as stack:
        if args.ceiling:
            _measure_ceiling(args, rig, meta)
        runs = []
        database: harness.Database | None = None
        for scenario in scenarios.values():
            scenario_targets = _targets_for(scenario, targets)
            if scenario.database and database is None and postgres is not None:
                database, meta["postgres"] = _start_database(postgres, stack, rig.pinning)
                rig.progress.note(f"bench: PostgreSQL {meta['postgres']['version']} for /db")
            families = list(dict.fromkeys(target.family for target in scenario_targets))
            for family in families:
                family_targets = [target for target in scenario_targets if target.family == family]
                runs += harness.run_targets(
                    family_targets,
                    scenario,
                    rig.binary,
                    # Several processes on one CPU would measure one core: every CPU, shared.
                    rig.pinning.every_cpu() if family_targets[0].every_cpu else rig.pinning,
                    args.reps,
                    args.duration,
                    args.warmup,
                    rig.progress,
                    args.noisy_retries,
                    database if scenario.database else None,
                )
    return runs


def _measure_ceiling(args: argparse.Namespace, rig: _Rig, meta: dict) -> None:
    """Measure the load generator against its C echo server into meta["ceiling"], and say it."""
    echo_scenario = build_scenarios(rig.work_rounds)["echo64"]
    meta["ceiling"] = harness.measure_ceiling(
        rig.binary, echo_scenario, rig.pinning, args.duration, args.warmup
    )
    rig.progress.note(
        f"load generator ceiling (C epoll echo server, echo 64 B): "
        f"{meta['ceiling']['rps']:,.0f} req/s, load generator at "
        f"{meta['ceiling']['loadgen_cpu_fraction']:.0%} of its core"
    )


def _results(
    args: argparse.Namespace,
    meta: dict,
    scenarios: dict[str, Scenario],
    skipped: dict[str, str],
    targets: list[Target],
    runs: list[dict],
) -> dict:
    """bench.json's content, the comparisons included (the charts are added on writing)."""
    results = {
        "meta": meta,
        "scenarios": {name: _scenario_record(scenario) for name, scenario in scenarios.items()},
        # Scenarios asked for but not measured, with why (no PostgreSQL here).
        "skipped_scenarios": skipped,
        "families": args.models,
        "targets": [
            {
                "name": t.name,
                "family": t.family,
                "kind": t.kind,
                "command": t.description,
                "every_cpu": t.every_cpu,
            }
            for t in targets
        ],
        "runs": runs,
    }
    results["comparisons"] = report.comparisons(results)
    return results


def _scenario_record(scenario: Scenario) -> dict:
    """A scenario as bench.json describes it, request lines over 80 bytes shortened."""
    return {
        "title": scenario.title,
        "connections": scenario.connections,
        "echo_size": scenario.echo_size,
        "database": scenario.database,
        "requests": [
            {
                "weight": r.weight,
                "line": r.line if len(r.line) <= 80 else f"{r.line[:40]}... ({len(r.line)} bytes)",
            }
            for r in scenario.requests
        ],
    }


def _write_results(results: dict, out: Path, progress: harness.Progress) -> None:
    """Write the charts, bench.json and bench.md into `out`, then say what was written and
    repeat the starved warnings."""
    out.mkdir(parents=True, exist_ok=True)
    results["charts"] = report.write_charts(results, out)
    report.write_json(results, out)
    markdown = report.write_markdown(results, out)
    progress.note(
        f"bench: wrote {out}/bench.json, {markdown.name} and " + ", ".join(results["charts"])
    )
    for line in report.starved_lines(results):  # repeated last, where nobody can miss it
        progress.note(f"bench: {line}")
    cli.docs_hint(out, DEFAULT_OUT, lambda text: progress.note(f"bench: {text}"))


def _targets_for(scenario: Scenario, targets: list[Target]) -> list[Target]:
    """The targets a scenario measures: the textbook servers have no database."""
    if scenario.database:
        return [target for target in targets if target.kind != "textbook"]
    return targets


def _database_for(scenarios: dict[str, Scenario]) -> tuple[Postgres | None, dict[str, str]]:
    """A PostgreSQL for the run when a `/db` scenario is selected (not started yet), and the
    scenarios skipped with why: all the `/db` ones when this machine has no PostgreSQL."""
    names = [name for name, scenario in scenarios.items() if scenario.database]
    if not names:
        return None, {}
    try:
        return Postgres(), {}
    except PostgresUnavailable as error:
        return None, {name: f"skipped: {error}" for name in names}


def _start_database(
    postgres: Postgres, stack: contextlib.ExitStack, pinning: harness.Pinning
) -> tuple[harness.Database, dict]:
    """Start the run's PostgreSQL (closed when `stack` closes), pinned to the server's CPUs so
    that its CPU is neither the load generator's nor "other" work; the harness's handle and
    what the report says about it."""
    try:
        stack.enter_context(postgres)
        [(version,)] = postgres.admin_query("SHOW server_version")
    except PostgresError as error:
        raise harness.HarnessError(f"PostgreSQL for the /db scenarios: {error}") from None
    pid = postgres.pid
    if pid is None:
        raise harness.HarnessError(
            "PostgreSQL for the /db scenarios exited:\n" + postgres.log_text()
        )
    harness.pin_tree(pid, pinning.server)
    pool = os.environ.get("ARENA_DB_POOL") or str(Settings.db_pool)
    return harness.Database(postgres.env(), pid), {
        "version": version,
        "bindir": str(postgres.bindir),
        "max_connections": postgres.max_connections,
        "pinning": "with the server" if pinning.server else "not pinned",
        "db_pool": pool,
    }


if __name__ == "__main__":
    sys.exit(main())

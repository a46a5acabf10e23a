"""`python -m loadtest.bench`: measure every model alone, next to its textbook version.

Writes results/bench.json, results/bench.md and PNG charts. With `--open-loop`: latency against
rising offered load per model instead (loadtest/bench/openloop.py), results/bench-open-loop.json
and results/open-loop.png. See docs/BENCHMARK.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from loadtest import cli
from loadtest.bench import harness, loadgen, openloop, report
from loadtest.bench.scenarios import (
    FAMILIES,
    KINDS,
    MIX_DESCRIPTION,
    build_scenarios,
    build_targets,
    calibrate_work_rounds,
)

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
    work_rounds, work_round_ns = 20_000, 50.0  # replaced by a measurement below
    scenario_names = list(build_scenarios(work_rounds))
    args = build_parser(scenario_names).parse_args(argv)
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
        return 2
    try:
        binary = loadgen.build()
    except loadgen.LoadgenError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2

    if args.quick and not args.open_loop:
        print("--quick goes with --open-loop", file=sys.stderr)
        return 2

    harness.raise_open_file_limit()
    pinning = harness.Pinning.choose(args.pin)
    if pinning.loadgen:
        os.sched_setaffinity(0, pinning.loadgen)  # the harness's own sampling stays off the server
    work_rounds, work_round_ns = calibrate_work_rounds()
    if args.open_loop:
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
        cli.refresh_docs_if_committed(args.out, DEFAULT_OUT, print)
        return 0
    scenarios = {name: build_scenarios(work_rounds)[name] for name in args.scenarios}
    targets = build_targets(args.models, args.kinds, args.workers)

    total = len(scenarios) * len(targets) * args.reps
    progress = harness.Progress(total, enabled=not args.quiet)
    per_run = args.duration + args.warmup + 0.6
    progress.note(
        f"bench: {len(targets)} servers x {len(scenarios)} scenarios x {args.reps} reps = {total}"
        f" runs, about {harness._clock(total * per_run)} plus server start-ups; "
        f"{pinning.describe()}; /work {work_rounds} rounds ≈ 1 ms"
    )
    background = harness.background_load()
    if background > 0.15:
        progress.note(
            f"bench: warning: other processes keep {background:.0%} of this machine's CPU busy; "
            "the figures will be noisy (see the 'other on server CPU' column)"
        )
    meta = {
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
    }
    with harness.measuring("bench"):
        if args.ceiling:
            echo_scenario = build_scenarios(work_rounds)["echo64"]
            meta["ceiling"] = harness.measure_ceiling(
                binary, echo_scenario, pinning, args.duration, args.warmup
            )
            progress.note(
                f"load generator ceiling (C epoll echo server, echo 64 B): "
                f"{meta['ceiling']['rps']:,.0f} req/s, load generator at "
                f"{meta['ceiling']['loadgen_cpu_fraction']:.0%} of its core"
            )
        runs = []
        families = list(dict.fromkeys(target.family for target in targets))
        for scenario in scenarios.values():
            for family in families:
                runs += harness.run_targets(
                    [target for target in targets if target.family == family],
                    scenario,
                    binary,
                    pinning,
                    args.reps,
                    args.duration,
                    args.warmup,
                    progress,
                    args.noisy_retries,
                )

    results = {
        "meta": meta,
        "scenarios": {
            name: {
                "title": scenario.title,
                "connections": scenario.connections,
                "echo_size": scenario.echo_size,
                "requests": [
                    {
                        "weight": r.weight,
                        "line": r.line
                        if len(r.line) <= 80
                        else f"{r.line[:40]}... ({len(r.line)} bytes)",
                    }
                    for r in scenario.requests
                ],
            }
            for name, scenario in scenarios.items()
        },
        "families": args.models,
        "targets": [
            {"name": t.name, "family": t.family, "kind": t.kind, "command": t.description}
            for t in targets
        ],
        "runs": runs,
    }
    results["comparisons"] = report.comparisons(results)
    args.out.mkdir(parents=True, exist_ok=True)
    results["charts"] = report.write_charts(results, args.out)
    report.write_json(results, args.out)
    markdown = report.write_markdown(results, args.out)
    progress.note(
        f"bench: wrote {args.out}/bench.json, {markdown.name} and " + ", ".join(results["charts"])
    )
    for line in report.starved_lines(results):  # repeated last, where nobody can miss it
        progress.note(f"bench: {line}")
    cli.refresh_docs_if_committed(
        args.out, DEFAULT_OUT, lambda text: progress.note(f"bench: {text}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

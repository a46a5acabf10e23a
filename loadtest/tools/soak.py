"""`python -m loadtest.tools.soak --duration 24h`: the arena under the default load for long.

Starts the four servers (free loopback ports) and a headless Locust with its default load (100
users per server), samples every few seconds each server's RSS (the pool's workers included),
open descriptors, threads and its /metrics (threads or greenlets, connections, requests, errors),
and Locust's running totals, then writes `report.json`, `report.md` and PNG charts.

It fails (exit 1) when a server's RSS or descriptors grew beyond the stated bounds, comparing the
median of the last third of the samples after the warm-up with the median of the first third
(a median, so one garbage-collection spike decides nothing), when any request failed (client or
server side), or when a server died or did not stop cleanly. Bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from loadtest.tools import cli, procs
from services import models

ROOT = Path(__file__).resolve().parents[2]
MODELS = models.NAMES
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0  # a server's grace (10 s) plus its workers, with room for a loaded box
MIB = 1024 * 1024
# Default bounds: growth between the first and the last third after the warm-up. A server that
# holds 100 steady connections should grow neither; these leave room for allocator noise only.
DEFAULT_MAX_RSS_GROWTH_MIB = 32.0
DEFAULT_MAX_FD_GROWTH = 16
DEFAULT_REPORT_DIR = ROOT / "results" / "soak"
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")


class SoakError(Exception):
    """The soak could not run at all (a server or Locust did not start)."""


def parse_duration(text: str) -> float:
    """Seconds from `90`, `45s`, `2m`, `1h30m` or `24h`."""
    text = text.strip().lower()
    with contextlib.suppress(ValueError):
        seconds = float(text)
        if seconds > 0:
            return seconds
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    parts = DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise argparse.ArgumentTypeError(f"use a duration like 45s, 2m, 1h30m or 24h; got {text!r}")
    seconds = sum(float(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive, got {text!r}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = cli.parser(
        "loadtest.tools.soak",
        "Soak every server under the default Locust load; write a report; exit 1 if memory or "
        "descriptors grow beyond the bounds or any request fails.",
    )
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=parse_duration("10m"),
        help="how long Locust runs: 45s, 2m, 1h30m, 24h (default 10m)",
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=Path("results/soak"),
        help="where report.json, report.md, the charts and logs go (default "
        "results/soak, which also writes results/soak.json and the docs' soak "
        "figures)",
    )
    parser.add_argument(
        "--interval", type=parse_duration, default=5.0, help="seconds between samples (default 5)"
    )
    parser.add_argument(
        "--warmup",
        type=parse_duration,
        default=None,
        help="samples ignored by the verdict at the start (default: a sixth of "
        "the duration, at least 10 s and at most 10 min)",
    )
    cli.add_number(
        parser,
        "--max-rss-growth-mib",
        DEFAULT_MAX_RSS_GROWTH_MIB,
        "largest allowed RSS growth per server, MiB",
    )
    cli.add_number(
        parser,
        "--max-fd-growth",
        DEFAULT_MAX_FD_GROWTH,
        "largest allowed growth of open descriptors per server",
    )
    parser.add_argument(
        "--users-per-target",
        type=int,
        default=100,
        help="Locust users per server (default 100, the default load)",
    )
    parser.add_argument(
        "--locust-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra Locust argument, repeatable (e.g. --locust-arg=--think-ms=50)",
    )
    return parser


# -- processes -------------------------------------------------------------------------------


def start_server(model: str, log_path: Path) -> procs.Server:
    """Start `python -m services MODEL` on free loopback ports; wait for its ready line."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ARENA_")}
    try:
        return procs.start_server(
            model, *models.get(model).small_flags, env=env, log_path=log_path, timeout=READY_TIMEOUT
        )
    except procs.StartError as error:
        raise SoakError(f"{model} server did not start: {error}") from None


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL to its whole session if it does not exit; returns the exit code."""
    return procs.stop(proc, timeout)


def start_locust(
    servers: dict[str, procs.Server],
    duration: float,
    report_dir: Path,
    users_per_target: int,
    extra: list[str],
) -> subprocess.Popen[bytes]:
    """A headless Locust with the default load on every server, writing CSV files."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "plugin" / "locustfile.py"),
        "--headless",
        "--only-summary",
        "-t",
        f"{round(duration)}s",
        "-u",
        str(users_per_target * len(servers)),
        "--users-per-target",
        str(users_per_target),
        "--csv",
        str(report_dir / "locust"),
        "--stop-timeout",
        "10",
        *[f"--{model}-target=tcp://127.0.0.1:{server.port}" for model, server in servers.items()],
        *extra,
    ]
    with open(report_dir / "locust.log", "wb") as log:
        # Its own working directory: a stray ./locust.conf must not change the load.
        return subprocess.Popen(
            command, cwd=report_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


# -- sampling --------------------------------------------------------------------------------


TASK_METRICS = ("arena_threads", "arena_greenlets", "arena_asyncio_transports")


@dataclass
class ServerSample:
    """One look at one server."""

    t: float  # seconds since the load started
    rss: int  # bytes, the server and its worker processes
    fds: int  # open descriptors of the server process
    threads: int  # OS threads of the server process
    tasks: float | None  # arena_threads, arena_greenlets or arena_asyncio_transports
    connections: float
    requests: float
    request_errors: float
    protocol_errors: float
    resets: float


@dataclass
class LocustSample:
    """Locust's running totals from its stats history."""

    t: float
    users: int
    requests: int
    failures: int
    rss: int


@dataclass
class Samples:
    """Everything sampled during the run."""

    servers: dict[str, list[ServerSample]] = field(default_factory=dict)
    locust: list[LocustSample] = field(default_factory=list)


def sample_server(server: procs.Server, elapsed: float) -> ServerSample:
    """Measure one server now."""
    process = procs.proc_sample(server.pid)
    metrics = server.metrics()
    # What serves one connection: arena_threads (threaded), arena_greenlets (gevent),
    # arena_asyncio_transports (asyncio); the pool exports none.
    task_metric = next((n for n in TASK_METRICS if metrics.has(n)), None)
    return ServerSample(
        t=round(elapsed, 2),
        rss=procs.tree_rss(server.pid),
        fds=process.fds,
        threads=process.threads,
        tasks=metrics.sum(task_metric) if task_metric else None,
        connections=metrics.sum("arena_connections_active"),
        requests=metrics.sum("arena_requests_total"),
        request_errors=metrics.sum("arena_requests_total", outcome="error"),
        protocol_errors=metrics.sum("arena_protocol_errors_total"),
        resets=metrics.sum("arena_connections_closed_total", reason="reset"),
    )


def read_locust_history(path: Path) -> tuple[int, int, int] | None:
    """(users, requests, failures) from the last complete Aggregated row of the history CSV."""
    try:
        with open(path, "rb") as history:
            header = history.readline().decode(errors="replace").strip().split(",")
            # Only the tail: after a day the file holds 86,400 rows.
            history.seek(max(history.tell(), os.fstat(history.fileno()).st_size - 16384))
            lines = history.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        cells = line.split(",")
        if len(cells) != len(header) or "Aggregated" not in cells:
            continue  # a row Locust is still writing
        row = dict(zip(header, cells, strict=True))
        return (
            int(row["User Count"]),
            int(row["Total Request Count"]),
            int(row["Total Failure Count"]),
        )
    return None


def sample_locust(proc: subprocess.Popen[bytes], history: Path, elapsed: float) -> LocustSample:
    """Locust's totals so far (zeros before its first history row)."""
    users, requests, failures = read_locust_history(history) or (0, 0, 0)
    return LocustSample(round(elapsed, 2), users, requests, failures, procs.tree_rss(proc.pid))


# -- the verdict -----------------------------------------------------------------------------


def growth(values: list[float]) -> float:
    """Median of the last third minus median of the first third."""
    third = len(values) // 3
    return statistics.median(values[-third:]) - statistics.median(values[:third])


def judge(
    samples: Samples, warmup: float, duration: float, max_rss_growth: float, max_fd_growth: int
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Growth per server after the warm-up, and every broken bound or error as a sentence."""
    problems: list[str] = []
    figures: dict[str, dict[str, float]] = {}
    for model, series in samples.servers.items():
        # Under load only: after `duration` Locust stops and its connections close.
        steady = [sample for sample in series if warmup <= sample.t <= duration]
        if len(steady) < 6:
            problems.append(
                f"{model}: only {len(steady)} samples after the warm-up; run longer "
                "or sample more often (--interval)"
            )
            continue
        rss_growth = growth([sample.rss for sample in steady])
        fd_growth = growth([sample.fds for sample in steady])
        figures[model] = {
            "rss_first_third_mib": statistics.median(s.rss for s in steady[: len(steady) // 3])
            / MIB,
            "rss_growth_mib": rss_growth / MIB,
            "fd_growth": fd_growth,
            "fds_max": max(sample.fds for sample in series),
            "threads_max": max(sample.threads for sample in series),
            "requests": series[-1].requests,
            "request_errors": series[-1].request_errors,
            "protocol_errors": series[-1].protocol_errors,
        }
        if rss_growth > max_rss_growth * MIB:
            problems.append(
                f"{model}: RSS grew by {rss_growth / MIB:.1f} MiB (bound {max_rss_growth:g} MiB)"
            )
        if fd_growth > max_fd_growth:
            problems.append(
                f"{model}: open descriptors grew by {fd_growth:g} (bound {max_fd_growth})"
            )
        if series[-1].request_errors or series[-1].protocol_errors:
            problems.append(
                f"{model}: the server answered {series[-1].request_errors:g} "
                f"requests with an error ({series[-1].protocol_errors:g} protocol "
                "errors)"
            )
    return figures, problems


# -- the report ------------------------------------------------------------------------------


def draw_charts(samples: Samples, report_dir: Path, warmup: float) -> list[str]:
    """One PNG per measure, a line per server, the warm-up shaded; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = {
        "rss.png": ("RSS (MiB, server + workers)", lambda s: s.rss / MIB),
        "fds.png": ("open descriptors", lambda s: s.fds),
        "threads.png": (
            "OS threads (solid) and threads/greenlets/transports by metric (dashed)",
            lambda s: s.threads,
        ),
        "requests.png": ("requests answered per second", None),
    }
    written = []
    for name, (title, value) in charts.items():
        figure, axes = plt.subplots(figsize=(9, 4))
        for model, series in samples.servers.items():
            times = [sample.t for sample in series]
            if value is not None:
                axes.plot(times, [value(sample) for sample in series], label=model)
            else:
                rates = [
                    (b.requests - a.requests) / (b.t - a.t) if b.t > a.t else 0.0
                    for a, b in itertools.pairwise(series)
                ]
                axes.plot(times[1:], rates, label=model)
            if name == "threads.png":
                tasks = [sample.tasks for sample in series if sample.tasks is not None]
                if len(tasks) == len(series):
                    axes.plot(times, tasks, linestyle="--", label=f"{model} (metric)")
        if name == "requests.png" and samples.locust:
            failures = [sample.failures for sample in samples.locust]
            if any(failures):
                axes.plot(
                    [s.t for s in samples.locust],
                    failures,
                    color="red",
                    label="Locust failures (total)",
                )
        axes.axvspan(0, warmup, color="grey", alpha=0.12, label="warm-up (not judged)")
        axes.set_title(title)
        axes.set_xlabel("seconds since the load started")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(report_dir / name, dpi=90)
        plt.close(figure)
        written.append(name)
    return written


def write_markdown(report: dict, charts: list[str], path: Path) -> None:
    """A short human summary with the charts."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    settings = report["settings"]
    lines = [
        f"# Soak report — {verdict}",
        "",
        f"- started {report['started']}, finished {report['finished']} (UTC)",
        f"- load: headless Locust, {settings['users_per_target']} users per server, "
        f"{settings['duration_s']:g} s; samples every {settings['interval_s']:g} s; the verdict "
        f"ignores the first {settings['warmup_s']:g} s",
        f"- bounds: RSS growth ≤ {report['bounds']['max_rss_growth_mib']:g} MiB and descriptor "
        f"growth ≤ {report['bounds']['max_fd_growth']} per server (median of the last third "
        "minus median of the first third), no failed request",
        f"- Locust: {report['locust']['requests']} requests, {report['locust']['failures']} "
        f"failures, exit code {report['locust']['exit_code']}",
        "",
        "| server | RSS (MiB) | RSS growth (MiB) | fd growth | fds max | threads max | requests "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, figures in report["figures"].items():
        lines.append(
            f"| {model} | {figures['rss_first_third_mib']:.1f} | {figures['rss_growth_mib']:+.2f} "
            f"| {figures['fd_growth']:+g} | {figures['fds_max']:g} | {figures['threads_max']:g} "
            f"| {figures['requests']:.0f} | {figures['request_errors']:.0f} |"
        )
    lines += ["", "## Problems", ""]
    lines += [f"- {problem}" for problem in report["problems"]] or ["none"]
    lines += ["", "## Charts", ""]
    lines += [f"![{chart}]({chart})" for chart in charts]
    path.write_text("\n".join(lines) + "\n")


# -- the run ---------------------------------------------------------------------------------


HISTORY_CSV = "locust_stats_history.csv"


def run(args: argparse.Namespace) -> int:
    """Run the soak; returns the exit code (0 passed, 1 failed)."""
    report_dir: Path = args.report_dir.resolve()  # Locust runs in it, so no relative paths
    report_dir.mkdir(parents=True, exist_ok=True)
    warmup = args.warmup if args.warmup is not None else min(600.0, max(10.0, args.duration / 6))
    started = datetime.now(UTC)
    samples = Samples()
    problems, locust_exit = run_load(args, report_dir, samples)
    locust_requests, locust_failures = locust_totals(report_dir)
    figures, judged = judge(
        samples, warmup, args.duration, args.max_rss_growth_mib, args.max_fd_growth
    )
    problems += judged
    problems += locust_problems(report_dir, locust_requests, locust_failures, locust_exit)
    locust = {"requests": locust_requests, "failures": locust_failures, "exit_code": locust_exit}
    report = build_report(args, started, warmup, problems, figures, locust, samples)
    write_report(report, samples, report_dir, warmup)
    print(f"soak: {'PASSED' if not problems else 'FAILED'}; report in {report_dir}/report.md")
    for problem in problems:
        print(f"soak: problem: {problem}")
    return 0 if not problems else 1


def run_load(
    args: argparse.Namespace, report_dir: Path, samples: Samples
) -> tuple[list[str], int | None]:
    """Start the servers and Locust, sample, stop them all: (problems, Locust's exit code)."""
    servers: dict[str, procs.Server] = {}
    problems: list[str] = []
    locust = None
    locust_exit: int | None = None
    try:
        start_servers(servers, samples, report_dir)
        locust = start_locust(
            servers, args.duration, report_dir, args.users_per_target, args.locust_arg
        )
        sample_until_locust_ends(locust, servers, samples, problems, report_dir, args)
        if locust.poll() is None:
            problems.append("Locust did not stop after its run time")
        locust_exit = stop_process(locust)
    except SoakError as error:
        if not problems:
            problems.append(str(error))
    finally:
        if locust is not None and locust_exit is None:
            locust_exit = stop_process(locust)
        problems += stop_servers(servers)
    return problems, locust_exit


def start_servers(servers: dict[str, procs.Server], samples: Samples, report_dir: Path) -> None:
    """Start every server into `servers` (the ones started stay there if one fails); say where."""
    for model in MODELS:
        servers[model] = start_server(model, report_dir / f"server-{model}.log")
        samples.servers[model] = []
    for model, server in servers.items():
        print(
            f"soak: {model} on 127.0.0.1:{server.port} (metrics :{server.metrics_port})",
            flush=True,
        )


def sample_until_locust_ends(
    locust: subprocess.Popen[bytes],
    servers: dict[str, procs.Server],
    samples: Samples,
    problems: list[str],
    report_dir: Path,
    args: argparse.Namespace,
) -> None:
    """Sample every server and Locust each --interval, printing a line, until Locust exits."""
    load_started = time.monotonic()
    history = report_dir / HISTORY_CSV
    # Locust ends by itself after --duration; the deadline only catches a hung Locust.
    deadline = load_started + args.duration + 120.0
    next_sample = load_started
    while locust.poll() is None and time.monotonic() < deadline:
        time.sleep(max(0.0, next_sample - time.monotonic()))
        next_sample += args.interval
        elapsed = time.monotonic() - load_started
        line = [f"soak: t={elapsed:6.0f}s"]
        line += sample_servers(servers, samples, problems, elapsed)
        client = sample_locust(locust, history, elapsed)
        samples.locust.append(client)
        line.append(f"locust users={client.users} req={client.requests} fail={client.failures}")
        print("  ".join(line), flush=True)


def sample_servers(
    servers: dict[str, procs.Server], samples: Samples, problems: list[str], elapsed: float
) -> list[str]:
    """Sample each server into `samples`; returns a summary per server; SoakError if one died."""
    line = []
    for model, server in servers.items():
        if server.proc.poll() is not None:
            problems.append(
                f"{model}: the server exited with {server.proc.returncode} at t={elapsed:.0f}s"
            )
            raise SoakError(problems[-1])
        sample = sample_server(server, elapsed)
        samples.servers[model].append(sample)
        line.append(f"{model} rss={sample.rss / MIB:.1f}M fds={sample.fds} thr={sample.threads}")
    return line


def stop_servers(servers: dict[str, procs.Server]) -> list[str]:
    """Stop every server; returns a problem for each that did not exit with 0."""
    problems = []
    for model, server in servers.items():
        code = stop_process(server.proc)
        if code != 0:
            problems.append(f"{model}: stopped with exit code {code} (expected 0)")
    return problems


def locust_totals(report_dir: Path) -> tuple[int, int]:
    """Locust's (requests, failures) at the end: its stats CSV, else its history's last row."""
    final = read_locust_history(report_dir / HISTORY_CSV)
    requests, failures = (final[1], final[2]) if final else (0, 0)
    return final_locust_totals(report_dir / "locust_stats.csv", requests, failures)


def locust_problems(
    report_dir: Path, requests: int, failures: int, exit_code: int | None
) -> list[str]:
    """What went wrong on Locust's side: failed requests, a bad exit, or no request at all."""
    problems = []
    if failures:
        problems.append(
            f"Locust: {failures} of {requests} requests failed "
            f"(see {report_dir / 'locust_failures.csv'})"
        )
    if exit_code not in (0, None) and not failures:
        problems.append(f"Locust exited with {exit_code} (see {report_dir / 'locust.log'})")
    if not requests:
        problems.append("Locust sent no request")
    return problems


def build_report(
    args: argparse.Namespace,
    started: datetime,
    warmup: float,
    problems: list[str],
    figures: dict[str, dict[str, float]],
    locust: dict[str, int | None],
    samples: Samples,
) -> dict:
    """report.json: when, the settings and bounds, the verdict, the figures and every sample."""
    return {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "duration_s": args.duration,
            "interval_s": args.interval,
            "warmup_s": warmup,
            "users_per_target": args.users_per_target,
            "locust_args": args.locust_arg,
        },
        "bounds": {
            "max_rss_growth_mib": args.max_rss_growth_mib,
            "max_fd_growth": args.max_fd_growth,
        },
        "passed": not problems,
        "problems": problems,
        "figures": figures,
        "locust": locust,
        "samples": {
            "servers": {
                model: [asdict(s) for s in series] for model, series in samples.servers.items()
            },
            "locust": [asdict(s) for s in samples.locust],
        },
    }


def write_report(report: dict, samples: Samples, report_dir: Path, warmup: float) -> None:
    """Write report.json, the charts and report.md; for the default report dir, the docs too."""
    (report_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    charts = draw_charts(samples, report_dir, warmup) if any(samples.servers.values()) else []
    write_markdown(report, charts, report_dir / "report.md")
    if report_dir == DEFAULT_REPORT_DIR:
        # The docs quote this run: results/soak.json (committed; the report dir is not) and the
        # sections of README.md and docs/RELIABILITY.md written from it.
        from loadtest.tools import docfigures

        for path in docfigures.publish_soak(report):
            print(f"soak: wrote {path.relative_to(ROOT)}")


def final_locust_totals(stats_csv: Path, requests: int, failures: int) -> tuple[int, int]:
    """Locust's final Aggregated totals from its stats CSV (the history may lag a second)."""
    try:
        lines = stats_csv.read_text(errors="replace").splitlines()
    except OSError:
        return requests, failures
    header = lines[0].split(",") if lines else []
    for line in lines[1:]:
        cells = line.split(",")
        if len(cells) == len(header) and "Aggregated" in cells:
            row = dict(zip(header, cells, strict=True))
            return int(row["Request Count"]), int(row["Failure Count"])
    return requests, failures


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments and run."""
    args = build_parser().parse_args(argv)
    if args.interval <= 0 or args.users_per_target < 1:
        build_parser().error("--interval and --users-per-target must be positive")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

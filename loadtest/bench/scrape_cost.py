"""`python -m loadtest.bench.scrape_cost`: server CPU per /metrics scrape at many idle connections.

For each model: start the server, open `--connections` connections, send one `/ping` on each
(so every connection's tally holds something), let them idle, scrape once (that scrape folds
every tally once), measure the server's idle CPU rate, then scrape `--scrapes` times back to
back. The cost of one scrape is the server process's CPU time over the scrapes (utime + stime
of all its threads, from /proc/PID/stat), minus the idle rate over the same wall time, divided
by the number of scrapes. Prints a table and writes results/scrape_cost.json.

`--root` runs the servers of another checkout (e.g. `git worktree add /tmp/old COMMIT`), to
compare commits with the same tool. Method and figures: docs/METRICS.md.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

from loadtest.tools import cli, procs
from services import models

ROOT = cli.ROOT
DEFAULT_OUT = ROOT / "results" / "scrape_cost.json"
BATCH = 200  # connections opened before their replies are read


def raise_fd_limit(needed: int) -> int:
    """Raise this process's open-file limit (inherited by the server) to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        sys.exit(f"scrape_cost: the open-file hard limit is {hard}; {needed} needed")
    return hard


def start(root: Path, model: str, connections: int) -> procs.Server:
    """`python -m services MODEL` of the checkout in `root`, on free loopback ports."""
    flags = ("--max-connections", str(connections + 100), "--idle-timeout", "3600")
    return procs.start_server(model, *flags, *models.get(model).small_flags, cwd=root)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads, in seconds."""
    return procs.proc_sample(pid).cpu_seconds


def timed_scrape(server: procs.Server) -> float:
    """Scrape /metrics once; returns the wall time in seconds."""
    started = time.perf_counter()
    server.metrics_text(timeout=60)
    return time.perf_counter() - started


def open_idle(port: int, count: int) -> list[socket.socket]:
    """`count` connections that each answered one /ping, then stay open and idle."""
    held: list[socket.socket] = []
    while len(held) < count:
        batch = [
            socket.create_connection(("127.0.0.1", port), timeout=60)
            for _ in range(min(BATCH, count - len(held)))
        ]
        for sock in batch:
            sock.sendall(b"/ping\n")
        for sock in batch:
            with sock.makefile("rb") as replies:
                reply = replies.readline(64)
            if reply != b"PONG\n":
                raise RuntimeError(f"connection {len(held)}: unexpected reply {reply!r}")
        held.extend(batch)
    return held


def measure(root: Path, model: str, connections: int, scrapes: int, idle: float) -> dict:
    """One model's figures."""
    server = start(root, model, connections)
    held: list[socket.socket] = []
    try:
        empty = [timed_scrape(server) for _ in range(3)]
        started = time.perf_counter()
        held = open_idle(server.port, connections)
        opening = time.perf_counter() - started
        time.sleep(1.0)  # let the threads or greenlets settle into their reads
        first = timed_scrape(server)
        cpu0, wall0 = cpu_seconds(server.pid), time.perf_counter()
        time.sleep(idle)
        idle_rate = (cpu_seconds(server.pid) - cpu0) / (time.perf_counter() - wall0)
        cpu0, wall0 = cpu_seconds(server.pid), time.perf_counter()
        walls = [timed_scrape(server) for _ in range(scrapes)]
        wall = time.perf_counter() - wall0
        cpu = cpu_seconds(server.pid) - cpu0
        net = max(0.0, cpu - idle_rate * wall)
        return {
            "connections": connections,
            "scrapes": scrapes,
            "cpu_ms_per_scrape": round(1000 * net / scrapes, 2),
            "raw_cpu_ms_per_scrape": round(1000 * cpu / scrapes, 2),
            "idle_cpu_ms_per_s": round(1000 * idle_rate, 2),
            "wall_ms_median": round(1000 * statistics.median(walls), 2),
            "first_scrape_wall_ms": round(1000 * first, 2),
            "empty_server_wall_ms_median": round(1000 * statistics.median(empty), 2),
            "open_seconds": round(opening, 2),
        }
    finally:
        for sock in held:
            sock.close()
        server.stop(60)


def main(argv: list[str] | None = None) -> int:
    """Measure every model and write the JSON file."""
    parser = cli.parser("loadtest.bench.scrape_cost", __doc__.split("\n\n")[0])
    cli.add_names(parser, "--models", models.NAMES, "model")
    cli.add_number(parser, "--connections", 10_000, "idle connections held during the scrapes")
    cli.add_number(parser, "--scrapes", 50, "scrapes measured per model")
    cli.add_number(parser, "--idle", 3.0, "seconds of idle CPU measured before scraping")
    cli.add_path(parser, "--root", ROOT, "checkout whose servers to run")
    cli.add_path(parser, "--out", DEFAULT_OUT, "JSON output")
    args = parser.parse_args(argv)
    raise_fd_limit(args.connections + 200)
    results: dict[str, dict] = {}
    for model in args.models:
        figures = measure(args.root, model, args.connections, args.scrapes, args.idle)
        results[model] = figures
        print(
            f"{model:9} {figures['connections']} idle connections: "
            f"{figures['cpu_ms_per_scrape']:7.2f} ms CPU per scrape "
            f"(raw {figures['raw_cpu_ms_per_scrape']:.2f}, idle {figures['idle_cpu_ms_per_s']}"
            f" ms/s), wall median {figures['wall_ms_median']:.2f} ms, "
            f"first scrape {figures['first_scrape_wall_ms']:.1f} ms",
            flush=True,
        )
    report = {
        "what": "server CPU per /metrics scrape at idle connections (docs/METRICS.md)",
        "when": cli.timestamp(),
        "commit": cli.commit_of(args.root),
        "cpus": os.cpu_count(),
        "clock_ticks_per_second": procs.TICKS,
        "models": results,
    }
    cli.write_result("scrape_cost", args.out, report, DEFAULT_OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())

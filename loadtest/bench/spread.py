"""`python -m loadtest.bench.spread`: how evenly N worker processes share one port, two ways.

`--processes N` (services/supervisor.py) needs N processes accepting on one port. Two ways:

- **reuseport**: each worker binds the port with `SO_REUSEPORT` and listens on its own socket;
  the kernel hands each new connection to one listener by a hash of its addresses (what the
  supervisor does, as uvicorn and many others do);
- **inherited**: every worker accepts on one listening socket inherited from its parent
  (gunicorn's arbiter): the connection goes to whichever worker is waiting in accept, or whose
  event loop wakes first.

For each model that takes `--processes` and each way, this starts N workers on 127.0.0.1 (the
same `python -m services MODEL` the supervisor starts; `--listen-fd` for the inherited socket),
opens CONNECTIONS connections with the C load generator (echo 64 B, closed loop), and reads
from each worker's own /metrics the connections it holds while the load runs and the requests
it answered, and from /proc the CPU it used. The processes are not pinned: the kernel places
them as it would a supervisor's workers. Writes spread.json, spread.md and spread.png to --out
(default results/spread/); docs/PROCESSES.md quotes the committed run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from loadtest.bench import loadgen
from loadtest.bench.report import machine_info
from loadtest.bench.scenarios import echo
from loadtest.tools import cli, procs
from services import models

WAYS = ("reuseport", "inherited")
DEFAULT_OUT = cli.ROOT / "results" / "spread"
MODELS = [model.name for model in models.MODELS if model.processes]


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = cli.parser(
        "loadtest.bench.spread",
        "How evenly N worker processes of a model share one port's connections and load: each "
        "binding it with SO_REUSEPORT, or all accepting on one inherited listening socket.",
    )
    cli.add_names(parser, "--models", MODELS, "model")
    cli.add_names(parser, "--ways", WAYS, "way", help="how the workers share the port")
    cli.add_number(parser, "--workers", 2, "worker processes per server")
    cli.add_number(parser, "--connections", 1000, "connections opened against each server")
    cli.add_number(parser, "--duration", 3.0, "measured seconds per server")
    cli.add_number(parser, "--warmup", 0.5, "seconds of load before measuring")
    cli.add_path(parser, "--out", DEFAULT_OUT, "output directory")
    return parser


@contextlib.contextmanager
def shared_port(way: str) -> Iterator[tuple[int, list[str], list[int]]]:
    """The port, the flags and the descriptors that put every worker on it (`way`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if way == "reuseport":
            # Held, never listening, as the supervisor reserves it: the workers join it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            yield port, ["--port", str(port), "--reuse-port"], []
        else:
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)
            yield sock.getsockname()[1], ["--listen-fd", str(sock.fileno())], [sock.fileno()]
    finally:
        sock.close()


def requests_answered(server: procs.Server) -> float:
    """The requests a worker answered so far, every command and outcome."""
    return server.metrics().sum("arena_requests_total")


def measure(model: str, way: str, args: argparse.Namespace, binary: Path) -> dict:
    """One server of `args.workers` workers sharing a port `way`: per worker, the connections
    it held mid-run, the requests it answered and the CPU it used; the load generator's
    totals."""
    with shared_port(way) as (port, flags, fds), contextlib.ExitStack() as stack:
        workers = []
        for _ in range(args.workers):
            worker = procs.start_server(model, *flags, pass_fds=fds)
            stack.callback(worker.stop)
            workers.append(worker)
        before = [(requests_answered(w), procs.proc_sample(w.pid).cpu_seconds) for w in workers]
        held: list[float] = []
        scraped = threading.Event()

        def on_marker(marker: str) -> None:
            # Every connection is open from the warm-up on: the start of the window sees them.
            if marker == "measure-start":
                held.extend(w.metrics().sum("arena_connections_active") for w in workers)
                scraped.set()

        result = loadgen.run(
            loadgen.command(binary, port, args.connections, args.duration, args.warmup, [echo(64)]),
            on_marker,
            timeout=args.duration + args.warmup + 60,
        )
        if not scraped.is_set():
            raise RuntimeError("the load generator never started measuring")
        after = [(requests_answered(w), procs.proc_sample(w.pid).cpu_seconds) for w in workers]
    per_worker = [
        {
            "connections": int(connections),
            "requests": int(done - done_before),
            "cpu_s": round(cpu - cpu_before, 3),
        }
        for connections, (done_before, cpu_before), (done, cpu) in zip(
            held, before, after, strict=True
        )
    ]
    return {
        "model": model,
        "way": way,
        "workers": per_worker,
        "rps": result["rps"],
        "errors": sum(result["errors"].values()),
        "connections": args.connections,
        "answered_connections": result["fairness"]["answered_connections"],
        **{f"{key}_imbalance": imbalance(per_worker, key) for key in ("connections", "requests")},
    }


def imbalance(workers: list[dict], key: str) -> float:
    """The busiest worker's share against an even one: 1.0 is perfectly even, N is all on one."""
    values = [worker[key] for worker in workers]
    mean = statistics.fmean(values)
    return round(max(values) / mean, 3) if mean else 0.0


def where(meta: dict) -> str:
    """`2026-12-08 02:00 UTC · AMD EPYC, 2 cores, Linux 6.1, Python 3.12.1`."""
    machine = meta["machine"]
    return (
        f"{meta['date']} · {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['system']}, Python {machine['python']}"
    )


def report(results: dict) -> str:
    """spread.md: how and where, then one row per model and way."""
    meta = results["meta"]
    lines = [
        "# How N workers share one port",
        "",
        f"- **When / where:** {where(meta)}.",
        f"- **Load:** {meta['connections']:,} connections, echo 64 B in a closed loop "
        f"(`loadtest/bench/loadgen.c`), {meta['duration_s']:g} s after {meta['warmup_s']:g} s of "
        f"warm-up, {meta['workers']} workers per server, nothing pinned.",
        "- *connections per worker*: what each worker's `arena_connections_active` showed at the "
        "start of the window (every connection is open by then); *requests* and *CPU*: what "
        "each answered and used in the run. *imbalance*: the busiest worker against an even "
        "share (1.00 = even; 2.00 with 2 workers = all on one).",
        "",
        "| model | way | connections per worker | imbalance | requests per worker | "
        "imbalance | CPU s per worker | req/s | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in results["runs"]:
        workers = run["workers"]
        lines.append(
            f"| {run['model']} | {run['way']} | "
            + " / ".join(f"{w['connections']:,}" for w in workers)
            + f" | {run['connections_imbalance']:.2f} | "
            + " / ".join(f"{w['requests']:,}" for w in workers)
            + f" | {run['requests_imbalance']:.2f} | "
            + " / ".join(f"{w['cpu_s']:.2f}" for w in workers)
            + f" | {run['rps']:,.0f} | {run['errors']} |"
        )
    lines += ["", "![spread.png](spread.png)", ""]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    """spread.png: per model and way, each worker's share of the connections and requests."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    runs = results["runs"]
    figure, axes = pyplot.subplots(1, 2, figsize=(11, 0.5 * len(runs) + 1.6), sharey=True)
    labels = [f"{run['model']}, {run['way']}" for run in runs]
    for axis, key, title in zip(
        axes, ("connections", "requests"), ("connections held", "requests answered"), strict=True
    ):
        for row, run in enumerate(runs):
            total = sum(worker[key] for worker in run["workers"]) or 1
            left = 0.0
            for index, worker in enumerate(run["workers"]):
                share = worker[key] / total
                axis.barh(row, share, left=left, color=f"C{index}", edgecolor="white")
                if share > 0.06:
                    axis.text(left + share / 2, row, f"{share:.0%}", ha="center", va="center")
                left += share
        count = len(runs[0]["workers"])
        for even in range(1, count):  # where the workers' edges fall when shared evenly
            axis.axvline(even / count, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xlim(0, 1)
        axis.set_title(f"each worker's share of the {title}", fontsize=10)
    axes[0].set_yticks(range(len(runs)), labels)
    axes[0].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Measure every model both ways; write the results; 2 on a bad argument or no loadgen."""
    args = build_parser().parse_args(argv)
    if args.workers < 2 or args.connections < args.workers or args.duration <= 0:
        print("spread: --workers >= 2, --connections >= --workers, --duration > 0", file=sys.stderr)
        return 2
    binary = loadgen.built_for("spread")
    if binary is None:
        return 2
    runs = []
    total = len(args.models) * len(args.ways)
    for model in args.models:
        for way in args.ways:
            run = measure(model, way, args, binary)
            runs.append(run)
            print(
                f"[{len(runs)}/{total}] {model:<9} {way:<9}: connections "
                + " / ".join(str(w["connections"]) for w in run["workers"])
                + f" (imbalance {run['connections_imbalance']:.2f}), requests imbalance "
                f"{run['requests_imbalance']:.2f}, {run['rps']:,.0f} req/s, errors {run['errors']}",
                flush=True,
            )
    results = {
        "meta": {
            "date": cli.timestamp(),
            "machine": machine_info(),
            "workers": args.workers,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        },
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spread.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "spread.png")
    (args.out / "spread.md").write_text(report(results))
    print(f"spread: wrote {args.out}/spread.json, spread.md and spread.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

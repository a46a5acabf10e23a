"""The benchmark's scenarios and the servers it measures.

A scenario is a connection count and a weighted list of request lines with their expected
replies (the load generator checks every reply byte for byte). A target is one server command:
each model of ours with metrics on and off, and the textbook server of the same model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from loadtest.bench.loadgen import Request
from loadtest.tools import procs
from services import models

# Lower-case text, so the upper-cased echo proves the server really ran the request.
_ALPHABET = "thequickbrownfoxjumpsoverthelazydog"


def text_of(size: int) -> str:
    """`size` bytes of lower-case request text."""
    return (_ALPHABET * (size // len(_ALPHABET) + 1))[:size]


def echo(size: int, weight: int = 1) -> Request:
    """An echo request of `size` bytes (newline not counted)."""
    text = text_of(size)
    return Request(weight, text, text.upper())


def sleep(milliseconds: int, weight: int = 1) -> Request:
    """A `/sleep` request that echoes a short text."""
    return Request(weight, f"/sleep {milliseconds} zz", "ZZ")


def db(milliseconds: int, weight: int = 1) -> Request:
    """A `/db` request (one PostgreSQL round trip, `pg_sleep(MS/1000)`) that echoes a short
    text."""
    return Request(weight, f"/db {milliseconds} dd", "DD")


def work(rounds: int, weight: int = 1) -> Request:
    """A `/work` request that echoes a short text."""
    return Request(weight, f"/work {rounds} ww", "WW")


def calibrate_work_rounds(target_seconds: float = 0.001) -> tuple[int, float]:
    """Rounds of `/work` that take about target_seconds here; returns (rounds, ns per round)."""
    from services.protocol import burn_cpu

    probe = 20_000
    best = min(_timed(burn_cpu, probe) for _ in range(7))
    per_round_ns = best / probe * 1e9
    return max(1, round(target_seconds * 1e9 / per_round_ns)), per_round_ns


def _timed(function, argument) -> float:
    start = time.perf_counter()
    function(argument)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Scenario:
    """A named load: connections and the request mix each connection sends in a closed loop."""

    name: str
    title: str
    connections: int
    requests: tuple[Request, ...]
    echo_size: int | None = None  # pure echo scenarios, charted for memory vs connections
    # `/db` scenarios: a throwaway PostgreSQL for the run, our models only (textbooks have no
    # database), its CPU reported beside the server's.
    database: bool = False


def build_scenarios(work_rounds: int) -> dict[str, Scenario]:
    """Every scenario by name, in report order."""
    work_request = work(work_rounds)
    scenarios = [
        Scenario("echo64", "echo 64 B, 100 conns", 100, (echo(64),), echo_size=64),
        Scenario("echo1k", "echo 1 KiB, 100 conns", 100, (echo(1024),), echo_size=1024),
        Scenario("echo64-c1000", "echo 64 B, 1000 conns", 1000, (echo(64),), echo_size=64),
        Scenario("sleep20", "/sleep 20, 100 conns", 100, (sleep(20),)),
        Scenario("work1ms", "/work ~1 ms, 100 conns", 100, (work_request,)),
        Scenario(
            "mix",
            "mix, 100 conns",
            100,
            (echo(64, 80), echo(1024, 10), sleep(20, 5), work(work_rounds, 5)),
        ),
        Scenario("db0", "/db 0, 100 conns", 100, (db(0),), database=True),
        Scenario("db5", "/db 5, 100 conns", 100, (db(5),), database=True),
    ]
    return {scenario.name: scenario for scenario in scenarios}


MIX_DESCRIPTION = "80 % echo 64 B, 10 % echo 1 KiB, 5 % /sleep 20, 5 % /work ~1 ms"

# `--processes PROCESSES` rows ("gevent-x2"): each event loop that takes --processes, as its first
# variant runs, with PROCESSES worker processes on one port (services/supervisor.py). One CPU
# would keep them on one core, so the server and the load generator share every CPU for these
# rows (the load generator's CPU in its column); ours only, metrics on: no textbook twin runs
# several processes.
PROCESSES = 2
PROCESS_FAMILIES: dict[str, tuple[models.Model, models.Variant]] = {
    f"{model.name}-x{PROCESSES}": (
        model,
        models.Variant(
            f"{model.name}-x{PROCESSES}", (*model.variants[0].flags, "--processes", str(PROCESSES))
        ),
    )
    for model in models.MODELS
    if model.processes and model.event_loop
}
# Model families: every variant of every registered model (services/models.py), with the
# textbook server it is compared with, then the rows of several processes.
FAMILIES = {**models.VARIANTS, **PROCESS_FAMILIES}
KINDS = ("ours", "no-metrics", "textbook")
KIND_LABELS = {"ours": "", "no-metrics": " (metrics off)", "textbook": " textbook"}
TEXTBOOK_NAMES = {
    "socketserver": "socketserver.ThreadingTCPServer",
    "processpool": "selectors + ProcessPoolExecutor",
    "threadpool": "selectors + ThreadPoolExecutor",
    "streamserver": "gevent.server.StreamServer",
    "asyncio-streams": "asyncio.start_server streams, standard loop",
    "uvloop-protocol": "asyncio.Protocol on uvloop",
}


@dataclass(frozen=True)
class Target:
    """One server command the harness starts, measures and stops."""

    family: str
    kind: str
    command: tuple[str, ...]
    description: str  # what exactly runs, for the report
    every_cpu: bool = False  # several processes: the server shares every CPU with the loadgen

    @property
    def name(self) -> str:
        """A short unique label, e.g. `pool-process (metrics off)`."""
        return self.family + KIND_LABELS[self.kind]


def build_targets(families: list[str], kinds: list[str], workers: int) -> list[Target]:
    """Targets in report order: for each family, ours, ours without metrics, textbook."""
    targets = []
    for family in families:
        model, variant = FAMILIES[family]
        model_args = [model.name, *variant.flags]
        textbook_model = variant.textbook
        pool_args = ["--workers", str(workers)] if model.sized else []
        several = family in PROCESS_FAMILIES
        for kind in kinds:
            if several and kind != "ours":
                continue
            if kind == "textbook":
                if textbook_model is None:
                    continue  # no textbook twin for this variant
                command = [
                    sys.executable,
                    "-m",
                    "loadtest.bench.textbook",
                    textbook_model,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--workers",
                    str(workers),
                ]
                description = TEXTBOOK_NAMES[textbook_model]
            else:
                server_args = [*model_args, *pool_args]
                if kind == "no-metrics":
                    server_args.append("--no-metrics")
                command = procs.server_command(*server_args)
                description = "python -m services " + " ".join(server_args)
            targets.append(Target(family, kind, tuple(command), description, several))
    return targets

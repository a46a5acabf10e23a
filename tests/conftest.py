"""Shared fixtures: start real servers as subprocesses on free loopback ports.

Starting, stopping and waiting are loadtest/tools/procs.py's, the same the stack, soak and
bench use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.tools import procs
from loadtest.tools.postgres import Postgres, PostgresUnavailable
from services import models

ROOT = Path(__file__).resolve().parent.parent
# What the server suites run: every model, and the variants the registry marks `suites` (the
# asyncio model on each event loop) under their own names.
MODELS = models.SUITE_TARGETS
# The suite targets with one event loop for every connection, and its lag probe.
EVENT_LOOPS = [
    name for name in MODELS if "arena_event_loop_blocks" in models.target(name)[0].own_metrics
]
START_TIMEOUT = 30.0
STOP_GRACE = 30.0

# A started server: .proc, .port, .metrics_port, .address, .log_text(), .metrics_text().
RunningServer = procs.Server


def run_module(
    module: str, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m MODULE ARGS` from the repository to its end, its output captured as text.

    `env` replaces this process's environment; the exit code is the caller's to check.
    """
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def launch_server(name: str, *args: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start `python -m services MODEL ARGS` on 127.0.0.1 (port 0) and wait for its ready line.

    `name` is a model or a variant (`asyncio-stock`: its model, its flags before ARGS); the
    server's `.model` is that name. `env` adds to this process's environment.
    """
    model, variant_flags = models.target(name)
    return launch(procs.server_command(model.name, *variant_flags, *args), name, env)


def small_flags(name: str) -> tuple[str, ...]:
    """The flags of a small run of a model or variant (the pool: 2 workers, as on 2 cores)."""
    return models.target(name)[0].small_flags


def launch(command: list[str], name: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start any command that prints the servers' ready line; fail the test if it does not."""
    try:
        return procs.start_server(command, name=name, env=env_with(env), timeout=START_TIMEOUT)
    except procs.StartError as error:
        pytest.fail(str(error))


def env_with(extra: dict[str, str] | None) -> dict[str, str] | None:
    """This process's environment plus `extra` (None: unchanged)."""
    return None if extra is None else {**os.environ, **extra}


def stop_server(server: RunningServer) -> None:
    """Stop a server for good: SIGTERM, then SIGKILL of its whole session if it hangs."""
    server.stop(STOP_GRACE)


@pytest.fixture
def server_factory() -> Iterator:
    """Start servers with custom flags; every one is stopped at the end of the test."""
    started: list[RunningServer] = []

    def start(model: str, *args: str, env: dict[str, str] | None = None) -> RunningServer:
        server = launch_server(model, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)


@pytest.fixture(params=MODELS)
def server(request) -> Iterator[RunningServer]:
    """One default server per model (pool with 2 workers, as on a 2-core machine)."""
    running = launch_server(request.param, *small_flags(request.param))
    yield running
    stop_server(running)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Whether a condition holds within the bounded timeout (for `assert wait_until(...), why`)."""
    try:
        return bool(procs.poll_until("a condition", predicate, timeout, interval))
    except procs.PollTimeout:
        return False


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL for the whole session (loadtest/tools/postgres.py), closed at its end.

    Without the server binaries the tests that use it are skipped, with the install command,
    unless CI or ARENA_REQUIRE_POSTGRES is set: there a missing database is a failure.
    """
    try:
        cluster = Postgres()
    except PostgresUnavailable as error:
        if os.environ.get("CI") or os.environ.get("ARENA_REQUIRE_POSTGRES", "0") != "0":
            pytest.fail(f"PostgreSQL is required here (CI or ARENA_REQUIRE_POSTGRES): {error}")
        pytest.skip(str(error))
    with cluster:
        yield cluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Docker tests last: a compose or Swarm stack going down keeps the engine busy for
    a while after its test ends, and the fairness and fault tests that follow measure waits (a
    1.2 s wait was seen right after the compose tests once)."""
    items.sort(key=lambda item: item.get_closest_marker("docker") is not None)

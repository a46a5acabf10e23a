"""Shared fixtures: start real servers as subprocesses on free loopback ports.

Starting, stopping and waiting are loadtest/procs.py's, the same the stack, soak and bench use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import procs
from services import models

ROOT = Path(__file__).resolve().parent.parent
MODELS = models.NAMES
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


def launch_server(model: str, *args: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start `python -m services MODEL ARGS` on 127.0.0.1 (port 0) and wait for its ready line.

    `env` adds to this process's environment.
    """
    return launch(procs.server_command(model, *args), model, env)


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
    running = launch_server(request.param, *models.get(request.param).small_flags)
    yield running
    stop_server(running)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Whether a condition holds within the bounded timeout (for `assert wait_until(...), why`)."""
    try:
        return bool(procs.poll_until("a condition", predicate, timeout, interval))
    except procs.PollTimeout:
        return False

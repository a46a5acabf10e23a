"""The local stack (`python -m loadtest.stack`): everything answers, a signal stops everything."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import psutil
import pytest

from loadtest import procs
from loadtest.stack import PORTS
from services import models
from tests.conftest import ROOT, run_module, wait_until

STARTUP_TIMEOUT = 90.0
HAS_PROMETHEUS = shutil.which("prometheus") is not None


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: all bound to port 0 at once, then released."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class RunningStack:
    """The stack subprocess, its ports, and its output collected by a thread."""

    def __init__(self, ports: dict[str, int], *extra: str) -> None:
        self.ports = ports
        args = [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.stack", "--grace", "5", *args, *extra],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.lines.append(raw.decode(errors="replace").rstrip())

    def output(self) -> str:
        """Everything the stack printed so far."""
        return "\n".join(self.lines)

    def kill(self) -> None:
        """Last resort after a failed test: SIGKILL the stack and everything below it."""
        if self.proc.poll() is None:
            for pid in procs.descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def stack_ports() -> dict[str, int]:
    """A free port for every service of the stack."""
    return dict(zip(PORTS, free_ports(len(PORTS)), strict=True))


@pytest.fixture
def running_stack(stack_ports: dict[str, int]) -> Iterator[RunningStack]:
    """The whole stack on free ports; killed at the end whatever the test did."""
    running = RunningStack(stack_ports)
    yield running
    running.kill()


def all_answer(stack: RunningStack) -> bool:
    """Every service of the stack answers."""
    ports = stack.ports
    checks = [procs.ping("127.0.0.1", ports[f"{model}_port"], 2.0) for model in models.NAMES]
    checks += [
        procs.http_ok(f"http://127.0.0.1:{ports[f'{model}_metrics_port']}/metrics")
        for model in models.NAMES
    ]
    checks.append(procs.http_ok(f"http://127.0.0.1:{ports['locust_port']}/"))
    if HAS_PROMETHEUS:
        checks.append(procs.http_ok(f"http://127.0.0.1:{ports['prometheus_port']}/-/ready"))
    return all(checks)


@pytest.mark.slow
@pytest.mark.locust
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stack_serves_everything_then_a_signal_stops_every_process_and_frees_every_port(
    running_stack: RunningStack, signum: int
) -> None:
    stack = running_stack
    assert wait_until(
        lambda: all_answer(stack) or stack.proc.poll() is not None,
        timeout=STARTUP_TIMEOUT,
        interval=0.25,
    ), stack.output()
    assert stack.proc.poll() is None, stack.output()
    assert all_answer(stack), stack.output()
    children = psutil.Process(stack.proc.pid).children(recursive=True)
    names = " ".join(" ".join(child.cmdline()) for child in children)
    for expected in (*(f"services {name}" for name in models.NAMES), "locust"):
        assert expected in names
    if HAS_PROMETHEUS:
        assert "prometheus" in names

    stack.proc.send_signal(signum)
    assert stack.proc.wait(timeout=60) == 0, stack.output()

    def gone(process: psutil.Process) -> bool:
        try:
            return process.status() == psutil.STATUS_ZOMBIE  # dead, only not yet reaped
        except psutil.NoSuchProcess:
            return True

    assert wait_until(lambda: all(gone(child) for child in children), timeout=10), [
        child.pid for child in children if not gone(child)
    ]
    assert wait_until(
        lambda: all(procs.port_is_free("127.0.0.1", port) for port in stack.ports.values()),
        timeout=10,
    ), [p for p in stack.ports.values() if not procs.port_is_free("127.0.0.1", p)]
    assert "stopped" in stack.lines[-1]


def run_stack(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the stack to its end (a bad setting ends it at once), its output captured."""
    return run_module("loadtest.stack", *args, env=env)


def test_a_port_in_use_is_named_with_the_knob_that_moves_it(stack_ports: dict[str, int]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = {**stack_ports, "pool_metrics_port": taken}
        args = [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
        result = run_stack(*args)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert str(taken) in message
    assert "--pool-metrics-port" in message and "ARENA_STACK_POOL_METRICS_PORT" in message
    assert result.stdout == ""  # nothing was started


def test_the_port_knob_also_works_as_an_environment_variable(stack_ports: dict[str, int]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        env = {
            **os.environ,
            **{f"ARENA_STACK_{name.upper()}": str(port) for name, port in stack_ports.items()},
        }
        env["ARENA_STACK_LOCUST_PORT"] = str(taken)
        result = run_stack(env=env)
    assert result.returncode == 2
    assert str(taken) in result.stderr and "ARENA_STACK_LOCUST_PORT" in result.stderr

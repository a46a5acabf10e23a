"""The local stack (`python -m loadtest.tools.stack`): everything answers, a signal stops it."""

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
from pathlib import Path

import psutil
import psycopg
import pytest

from loadtest.tools import procs
from loadtest.tools.postgres import Postgres
from loadtest.tools.stack import PORTS, StackError, parse_settings, plan
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

    def __init__(
        self, ports: dict[str, int], *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.ports = ports
        args = [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.tools.stack", "--grace", "5", *args, *extra],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
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
    return run_module("loadtest.tools.stack", *args, env=env)


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


# ---- PostgreSQL for /db -------------------------------------------------------------------


def without_database_settings() -> dict[str, str]:
    """This environment without ARENA_DB_* (a user's own ARENA_DB_URL turns the stack's off)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ARENA_DB_")}


def servers_up(stack: RunningStack) -> bool:
    """The stack said every service is up, or it ended (the caller checks which)."""
    return "all services are up" in stack.output() or stack.proc.poll() is not None


def server_environments(stack: RunningStack) -> dict[str, dict[str, str]]:
    """Each server process's environment, by model."""
    found = {}
    for child in psutil.Process(stack.proc.pid).children(recursive=True):
        command = child.cmdline()
        for model in models.NAMES:
            if command[1:4] == ["-m", "services", model]:
                found[model] = child.environ()
    return found


def test_the_database_knob_is_a_flag_and_a_variable() -> None:
    assert parse_settings([], {}).postgres is True
    assert parse_settings(["--no-postgres"], {}).postgres is False
    assert parse_settings([], {"ARENA_STACK_POSTGRES": "0"}).postgres is False
    assert parse_settings(["--postgres"], {"ARENA_STACK_POSTGRES": "0"}).postgres is True
    with pytest.raises(StackError, match="ARENA_STACK_POSTGRES"):
        parse_settings([], {"ARENA_STACK_POSTGRES": "maybe"})


def test_every_server_of_the_plan_gets_the_database_settings(
    postgres: Postgres, tmp_path: Path
) -> None:
    settings = parse_settings(["--prometheus", "off"], {})
    services = {service.name: service for service in plan(settings, tmp_path, {}, postgres.env())}
    for model in models.NAMES:
        assert services[model].env == postgres.env()
        assert services[model].env["ARENA_DB_URL"] == postgres.url
    assert "ARENA_DB_URL" not in services["locust"].env  # the load needs no database
    without = plan(settings, tmp_path, {})
    assert all(service.env == {} for service in without)


def test_the_processes_knob_reaches_every_server_whose_model_takes_it(tmp_path: Path) -> None:
    assert parse_settings([], {}).processes == 1
    assert parse_settings([], {"ARENA_STACK_PROCESSES": "3"}).processes == 3
    assert parse_settings(["--processes", "2"], {"ARENA_STACK_PROCESSES": "3"}).processes == 2
    with pytest.raises(StackError, match="ARENA_STACK_PROCESSES"):
        parse_settings([], {"ARENA_STACK_PROCESSES": "0"})
    settings = parse_settings(["--processes", "2", "--prometheus", "off"], {})
    commands = {service.name: service.command for service in plan(settings, tmp_path, {})}
    for model in models.MODELS:
        command = commands[model.name]
        if model.processes:
            assert command[command.index("--processes") + 1] == "2", command
        else:  # the pool model refuses it: its workers are --workers
            assert "--processes" not in command, command


@pytest.mark.slow
def test_the_stack_starts_postgres_first_hands_it_to_every_server_and_stops_it_last(
    postgres: Postgres, stack_ports: dict[str, int]
) -> None:
    # `postgres` only for its verdict: without the binaries this test skips (or fails in CI).
    stack = RunningStack(
        stack_ports, "--no-locust", "--prometheus=off", env=without_database_settings()
    )
    try:
        assert wait_until(lambda: servers_up(stack), timeout=STARTUP_TIMEOUT), stack.output()
        assert stack.proc.poll() is None, stack.output()
        output = stack.output()
        assert output.index("postgres is up") < output.index("starting threaded")
        environments = server_environments(stack)
        assert environments.keys() == set(models.NAMES)
        urls = {env["ARENA_DB_URL"] for env in environments.values()}
        passwords = {env["ARENA_DB_PASSWORD"] for env in environments.values()}
        assert len(urls) == len(passwords) == 1, urls
        (url,), (password,) = urls, passwords
        assert password not in output  # printed: the URL, never the password
        with psycopg.connect(url, password=password, connect_timeout=5) as conn:
            conn.execute("SELECT pg_sleep(0)")
        postmasters = [
            child
            for child in psutil.Process(stack.proc.pid).children()
            if child.name() == "postgres"
        ]
        assert len(postmasters) == 1
        directory = postmasters[0].cmdline()[postmasters[0].cmdline().index("-D") + 1]

        stack.proc.send_signal(signal.SIGTERM)
        assert stack.proc.wait(timeout=60) == 0, stack.output()
        assert "postgres stopped" in stack.output()
        assert not os.path.exists(directory)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, password=password, connect_timeout=5)
    finally:
        stack.kill()


@pytest.mark.slow
def test_without_postgresql_binaries_the_stack_says_so_once_and_starts_the_rest(
    stack_ports: dict[str, int], tmp_path: Path
) -> None:
    env = {**without_database_settings(), "ARENA_PG_BINDIR": str(tmp_path)}  # no binaries there
    stack = RunningStack(stack_ports, "--no-locust", "--prometheus=off", env=env)
    try:
        assert wait_until(lambda: servers_up(stack), timeout=STARTUP_TIMEOUT), stack.output()
        assert stack.proc.poll() is None, stack.output()
        said = [line for line in stack.lines if "PostgreSQL" in line]
        assert len(said) == 1, stack.output()
        assert "ERR backend-unavailable" in said[0] and "apt-get install postgresql" in said[0]
        environments = server_environments(stack)
        assert environments.keys() == set(models.NAMES)
        assert all("ARENA_DB_URL" not in env for env in environments.values())
        assert all(procs.ping("127.0.0.1", stack_ports[f"{m}_port"]) for m in models.NAMES)
        stack.proc.send_signal(signal.SIGTERM)
        assert stack.proc.wait(timeout=60) == 0, stack.output()
    finally:
        stack.kill()

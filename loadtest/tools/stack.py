"""`python -m loadtest.tools.stack`: the whole arena as local processes, without Docker.

Starts a throwaway PostgreSQL for the servers' `/db` (loadtest/tools/postgres.py, when the
machine has the server binaries), the four servers on their own ports, the Locust web UI loading
them (100 users per server), and a Prometheus scraping all four when a `prometheus` binary is on
the PATH.
Every child's output is printed with a `[name]` prefix. Ctrl-C or SIGTERM stops everything: each
child gets SIGTERM, then, after the grace period, its whole process group gets SIGKILL, and
any orphan left below the stack (it registers as a child subreaper) is killed and reaped, so no
process and no bound port outlives the stack.

`--processes N` (`ARENA_STACK_PROCESSES`) runs every server whose model takes it as N worker
processes on its one port (services/supervisor.py); the registry's `processes` field decides which.
Every port has a flag and an `ARENA_STACK_*` variable (flags win); a port already in use is
reported once, naming the port and the knob that moves it. Probing, stopping and finding the
processes below it are loadtest/tools/procs.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from loadtest.tools import procs
from loadtest.tools.postgres import Postgres, PostgresError, PostgresUnavailable, find_bindir
from services import models
from services.options import boolean as parse_boolean
from services.options import positive_int as parse_positive_int

ROOT = Path(__file__).resolve().parents[2]
MODELS = models.NAMES
ENV_PREFIX = "ARENA_STACK_"
READY_TIMEOUT = 60.0  # seconds for every service to answer after start
KILL_WAIT = 5.0  # seconds to wait for a SIGKILLed process group to vanish
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# The models --processes reaches, for its help (the registry's `processes` field decides).
PROCESS_MODELS = ", ".join(model.name for model in models.MODELS if model.processes)
_T = TypeVar("_T")

# (setting, default, help). The flag is --setting-with-dashes, the variable ARENA_STACK_SETTING.
PORTS: dict[str, tuple[int, str]] = {
    **{
        f"{model.name}_port": (model.port, f"protocol port of the {model.name} server")
        for model in models.MODELS
    },
    **{
        f"{model.name}_metrics_port": (
            model.metrics_port,
            f"/metrics port of the {model.name} server",
        )
        for model in models.MODELS
    },
    "locust_port": (8089, "Locust web UI (and its /metrics)"),
    "prometheus_port": (9090, "Prometheus web UI and API"),
}


class StackError(Exception):
    """A problem that stops the stack from starting; the message says what to change."""


def knob(setting: str) -> str:
    """How a user changes a setting: its flag and its environment variable."""
    return f"--{setting.replace('_', '-')} or {ENV_PREFIX}{setting.upper()}"


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"a port is 1..65535, got {value}")
    return value


@dataclass(frozen=True)
class StackSettings:
    """What to start and where."""

    host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=lambda: {k: v[0] for k, v in PORTS.items()})
    locust: bool = True
    autostart: bool = True
    prometheus: str = "auto"  # auto: when a prometheus binary is on the PATH; or on / off
    postgres: bool = True  # a throwaway PostgreSQL for /db, when its binaries are installed
    grace: float = 10.0
    workers: int = 2  # the pool server's workers (models that are `sized`)
    # Worker processes of every server whose model takes --processes (services/supervisor.py).
    processes: int = 1


def _parser() -> argparse.ArgumentParser:
    """The command line: every setting as a flag (its variable is named in its help)."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.tools.stack",
        description="Run a throwaway PostgreSQL, the four servers, the Locust web UI and "
        "Prometheus as local processes. "
        f"Every option can also be set as an {ENV_PREFIX}* environment variable; flags win.",
    )
    parser.add_argument(
        "--host",
        help="address every service binds and is reached at "
        f"(env {ENV_PREFIX}HOST, default 127.0.0.1)",
    )
    for setting, (default, text) in PORTS.items():
        parser.add_argument(
            "--" + setting.replace("_", "-"),
            dest=setting,
            metavar="PORT",
            help=f"{text} (env {ENV_PREFIX}{setting.upper()}, default {default})",
        )
    for name, text in (
        ("locust", "start the Locust web UI (env {}LOCUST, default on)"),
        (
            "autostart",
            "start the load at once instead of waiting for the web UI's Start "
            "button (env {}AUTOSTART, default on)",
        ),
        (
            "postgres",
            "run a throwaway PostgreSQL for the servers' /db when its binaries are installed "
            "(apt-get install postgresql); off, /db answers ERR backend-unavailable "
            "(env {}POSTGRES, default on)",
        ),
    ):
        parser.add_argument(
            f"--{name}",
            dest=name,
            action=argparse.BooleanOptionalAction,
            help=text.format(ENV_PREFIX),
        )
    parser.add_argument(
        "--prometheus",
        choices=("auto", "on", "off"),
        help="run Prometheus: auto = when `prometheus` is on the PATH "
        f"(env {ENV_PREFIX}PROMETHEUS, default auto)",
    )
    parser.add_argument(
        "--grace",
        metavar="SECONDS",
        help=f"seconds the children get to stop before SIGKILL (env {ENV_PREFIX}GRACE, default 10)",
    )
    parser.add_argument(
        "--workers", metavar="N", help=f"pool server workers (env {ENV_PREFIX}WORKERS, default 2)"
    )
    parser.add_argument(
        "--processes",
        metavar="N",
        help=f"worker processes of each server that takes --processes ({PROCESS_MODELS}), "
        f"on its one port (env {ENV_PREFIX}PROCESSES, default 1)",
    )
    return parser


def _reader(
    args: Mapping[str, object], environ: Mapping[str, str]
) -> Callable[[str, Callable[[str], _T], _T], _T]:
    """A setting's value: the flag's, else its ARENA_STACK_* variable's, else the default."""

    def parsed(name: str, parse: Callable[[str], _T], default: _T) -> _T:
        value = args.get(name)
        if value is None:
            value = environ.get(ENV_PREFIX + name.upper())
        if value is None:
            return default
        try:
            return parse(value) if isinstance(value, str) else value  # type: ignore[return-value]
        except ValueError as error:
            raise StackError(f"bad value for {knob(name)}: {error}") from None

    return parsed


def parse_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> StackSettings:
    """Read flags and ARENA_STACK_* variables (flags win)."""
    parsed = _reader(vars(_parser().parse_args(argv)), environ)
    defaults = StackSettings()
    return StackSettings(
        host=parsed("host", str, defaults.host),
        ports={name: parsed(name, _port, default) for name, (default, _) in PORTS.items()},
        locust=parsed("locust", parse_boolean, True),
        autostart=parsed("autostart", parse_boolean, True),
        prometheus=parsed("prometheus", _prometheus_mode, "auto"),
        postgres=parsed("postgres", parse_boolean, True),
        grace=parsed("grace", _grace, defaults.grace),
        workers=parsed("workers", parse_positive_int, defaults.workers),
        processes=parsed("processes", parse_positive_int, defaults.processes),
    )


def _prometheus_mode(text: str) -> str:
    if text not in ("auto", "on", "off"):
        raise ValueError(f"choose auto, on or off, got {text!r}")
    return text


def _grace(text: str) -> float:
    number = float(text)
    if not 0 <= number < 3600:
        raise ValueError("must be 0..3600 seconds")
    return number


# ---- the services ------------------------------------------------------------------------


@dataclass
class Service:
    """One child process: how to start it, the ports it binds, and how to see it is up."""

    name: str
    command: list[str]
    ports: list[str]  # settings names, for the port check and its message
    probe: Callable[[], bool]
    urls: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's environment
    proc: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = None


def prometheus_config(settings: StackSettings, with_locust: bool) -> str:
    """A scrape config for the local services; job names match docker/prometheus."""
    host = procs.connect_host(settings.host)
    lines = [
        "# Generated by python -m loadtest.tools.stack; job name = server model, as in docker/.",
        "global:",
        "  scrape_interval: 5s",
        "  scrape_timeout: 4s",
        "  evaluation_interval: 5s",
        "scrape_configs:",
    ]
    for model in MODELS:
        port = settings.ports[f"{model}_metrics_port"]
        # The labels docker/prometheus gives each replica: one replica here.
        lines += [
            f"  - job_name: {model}",
            "    honor_labels: true",
            "    static_configs:",
            f'      - targets: ["{host}:{port}"]',
            f'        labels: {{model: {model}, replica: "{host}:{port}"}}',
        ]
    if with_locust:
        lines += [
            "  - job_name: locust",
            "    metrics_path: /metrics",
            "    static_configs:",
            f'      - targets: ["{host}:{settings.ports["locust_port"]}"]',
        ]
    return "\n".join(lines) + "\n"


def server_flags(model: models.Model, settings: StackSettings) -> list[str]:
    """The flags a model's server gets besides host and ports: its pool's size if it has one,
    its worker processes if it takes them (the registry's `sized` and `processes`)."""
    flags = ["--workers", str(settings.workers)] if model.sized else []
    if model.processes:
        flags += ["--processes", str(settings.processes)]
    return flags


def _servers(settings: StackSettings, database: Mapping[str, str] | None) -> list[Service]:
    """One service per model, on its ports; `database` (ARENA_DB_*) in every one's environment."""
    host, reach = settings.host, procs.connect_host(settings.host)
    services = []
    for model in models.MODELS:
        port = settings.ports[f"{model.name}_port"]
        metrics_port = settings.ports[f"{model.name}_metrics_port"]
        command = procs.server_command(
            model.name,
            *server_flags(model, settings),
            host=host,
            port=port,
            metrics_port=metrics_port,
        )
        services.append(
            Service(
                model.name,
                command,
                [f"{model.name}_port", f"{model.name}_metrics_port"],
                functools.partial(procs.ping, reach, port, 2.0),
                [f"tcp://{reach}:{port}", f"http://{reach}:{metrics_port}/metrics"],
                dict(database or {}),
            )
        )
    return services


def _locust(settings: StackSettings) -> Service | None:
    """The Locust web UI loading every server, or None (turned off, or no locustfile)."""
    locust_file = ROOT / "loadtest" / "plugin" / "locustfile.py"
    if not (settings.locust and locust_file.exists()):
        return None
    host, reach = settings.host, procs.connect_host(settings.host)
    web_port = settings.ports["locust_port"]
    # The same interpreter as the servers: right also in a venv that is not activated.
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locust_file),
        "--web-host",
        host,
        "--web-port",
        str(web_port),
    ]
    command += [
        f"--{model}-target=tcp://{reach}:{settings.ports[f'{model}_port']}" for model in MODELS
    ]
    if settings.autostart:
        command.append("--autostart")
    return Service(
        "locust",
        command,
        ["locust_port"],
        functools.partial(procs.http_ok, f"http://{reach}:{web_port}/", any_status=True),
        [f"http://{reach}:{web_port}/"],
    )


def _prometheus(
    settings: StackSettings, workdir: Path, environ: Mapping[str, str], with_locust: bool
) -> Service | None:
    """Prometheus scraping the stack, or None (off, or auto without a binary on the PATH)."""
    prometheus = shutil.which("prometheus", path=environ.get("PATH"))
    if settings.prometheus == "on" and not prometheus:
        raise StackError(
            "--prometheus on, but no `prometheus` binary is on the PATH "
            "(Debian: apt-get install prometheus)"
        )
    if settings.prometheus == "off" or not prometheus:
        return None
    host, reach = settings.host, procs.connect_host(settings.host)
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(settings, with_locust))
    port = settings.ports["prometheus_port"]
    command = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'prometheus-data'}",
        f"--web.listen-address={host}:{port}",
        "--log.level=warn",
    ]
    return Service(
        "prometheus",
        command,
        ["prometheus_port"],
        functools.partial(procs.http_ok, f"http://{reach}:{port}/-/ready"),
        [f"http://{reach}:{port}/"],
    )


def plan(
    settings: StackSettings,
    workdir: Path,
    environ: Mapping[str, str],
    database: Mapping[str, str] | None = None,
) -> list[Service]:
    """The services to start, in start order; `database` (ARENA_DB_*) goes to every server."""
    services = _servers(settings, database)
    locust = _locust(settings)
    prometheus = _prometheus(settings, workdir, environ, with_locust=locust is not None)
    return services + [service for service in (locust, prometheus) if service is not None]


def check_ports(settings: StackSettings, services: list[Service]) -> None:
    """Fail with one clear message when a port is taken or used twice."""
    seen: dict[int, str] = {}
    for service in services:
        for setting in service.ports:
            port = settings.ports[setting]
            if port in seen:
                raise StackError(
                    f"port {port} is set for both {seen[port]} and {setting}; "
                    f"change one with {knob(setting)}"
                )
            seen[port] = setting
            if not procs.port_is_free(settings.host, port):
                raise StackError(
                    f"port {port} ({PORTS[setting][1]}) is already in use; "
                    f"choose another with {knob(setting)}"
                )


# ---- running ------------------------------------------------------------------------------


class Console:
    """Prefixed, line-atomic output shared by every child's pump thread."""

    COLORS = ("36", "33", "35", "32", "34", "31")

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()
        self.color = self.stream.isatty() and "NO_COLOR" not in os.environ
        self.width = 10

    def prefix(self, name: str, index: int) -> str:
        """`[name]` padded, colored on a terminal."""
        label = f"[{name}]".ljust(self.width + 2)
        if self.color:
            return f"\033[{self.COLORS[index % len(self.COLORS)]}m{label}\033[0m "
        return label + " "

    def write(self, prefix: str, text: str) -> None:
        """Print one line."""
        # A closed stdout (piped into `head`) must not stop the pumps: a child whose pipe is
        # not drained blocks on its next log line.
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.stream.write(prefix + text + "\n")
            self.stream.flush()

    def say(self, text: str) -> None:
        """A line from the stack itself."""
        self.write(self.prefix("stack", 5), text)


def _pump(proc: subprocess.Popen[bytes], console: Console, prefix: str) -> None:
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        console.write(prefix, raw.decode(errors="replace").rstrip())


def _become_subreaper() -> None:
    """Adopt orphaned descendants (pool workers, locust helpers) so they can be found and reaped."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


class Stack:
    """Starts the services, watches them, and stops them all."""

    def __init__(self, settings: StackSettings, services: list[Service], console: Console):
        self.settings = settings
        self.services = services
        self.console = console
        self.stop_requested = threading.Event()
        self.reason = ""
        self.database: Postgres | None = None  # started before the servers, stopped after them

    def request_stop(self, signum: int, _frame: object = None) -> None:
        """Signal handler: ask the main loop to stop everything."""
        self.reason = signal.Signals(signum).name
        self.stop_requested.set()

    def start(self) -> None:
        """Start every service; raise StackError when one exits or never answers."""
        if self.stop_requested.is_set():  # Ctrl-C while the database was starting
            return
        self.console.width = max(len(service.name) for service in self.services)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for index, service in enumerate(self.services):
            self.console.say("starting " + service.name + ": " + " ".join(service.command))
            service.proc = subprocess.Popen(
                service.command,
                cwd=ROOT,
                env={**env, **service.env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            service.pump = threading.Thread(
                target=_pump,
                args=(service.proc, self.console, self.console.prefix(service.name, index)),
                daemon=True,
            )
            service.pump.start()
        waiting = list(self.services)
        deadline = time.monotonic() + READY_TIMEOUT
        while waiting:
            if self.stop_requested.is_set():
                return
            for service in list(waiting):
                assert service.proc is not None
                if service.proc.poll() is not None:
                    raise StackError(
                        f"{service.name} exited with code {service.proc.returncode} "
                        "while starting (see its log above)"
                    )
                if service.probe():
                    waiting.remove(service)
                    self.console.say(f"{service.name} is up: " + "  ".join(service.urls))
            if waiting and time.monotonic() > deadline:
                names = ", ".join(service.name for service in waiting)
                raise StackError(f"{names} did not answer within {READY_TIMEOUT:.0f} s")
            self.stop_requested.wait(0.2)
        self.console.say("all services are up; Ctrl-C (or SIGTERM) stops everything")

    def watch(self) -> int:
        """Block until a stop signal (exit 0) or a child dies on its own (exit 1)."""
        while not self.stop_requested.wait(0.5):
            for service in self.services:
                assert service.proc is not None
                if service.proc.poll() is not None:
                    self.console.say(
                        f"{service.name} exited with code "
                        f"{service.proc.returncode}; stopping everything"
                    )
                    return 1
        self.console.say(f"{self.reason or 'stop'} received; stopping everything")
        return 0

    def stop(self) -> None:
        """SIGTERM every child, wait up to the grace period, SIGKILL what is left, reap all."""
        deadline = time.monotonic() + self.settings.grace + 2
        # The load first, and waited for, so the servers see no requests cut off mid-way. Each
        # child's process group holds its own helpers (pool workers, for instance).
        load = [s for s in self.services if s.name in ("locust", "prometheus")]
        servers = [s for s in self.services if s not in load]
        for stage in (load, servers):
            started = [(s, s.proc) for s in stage if s.proc is not None]
            running = [proc.poll() is None for _, proc in started]
            left = max(0.0, deadline - time.monotonic())
            codes = procs.stop_all([proc for _, proc in started], left)
            for (service, _), was_running, code in zip(started, running, codes, strict=True):
                if was_running and code == -signal.SIGKILL:
                    self.console.say(f"{service.name} still running after the grace period: killed")
        # The database last, once no server uses it, and before the orphan sweep, which would
        # SIGKILL it (the postmaster is a child of the stack).
        if self.database is not None:
            self.database.close()
            self.console.say("postgres stopped (its data deleted)")
        self._kill_orphans()
        for service in self.services:
            if service.pump is not None:
                service.pump.join(timeout=2)
        for service in self.services:
            if service.proc is not None:
                self.console.say(f"{service.name} stopped (exit code {service.proc.returncode})")

    def _kill_orphans(self) -> None:
        """Kill and reap anything still below the stack (orphans adopted as subreaper)."""
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline:
            left = procs.descendants(os.getpid())
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            if not left:
                return
            time.sleep(0.05)


def start_database(
    settings: StackSettings, console: Console, environ: Mapping[str, str]
) -> Postgres | None:
    """A throwaway PostgreSQL for /db, or None (turned off, ARENA_DB_URL given, or no
    binaries: /db then answers ERR backend-unavailable and everything else runs); StackError
    when it fails to start."""
    if environ.get("ARENA_DB_URL"):
        # The user's own database: the servers inherit it with the rest of the environment.
        console.say("ARENA_DB_URL is set: the servers use that database, no throwaway PostgreSQL")
        return None
    if not settings.postgres:
        console.say(
            f"PostgreSQL turned off (--no-postgres or {ENV_PREFIX}POSTGRES=0): "
            "/db will answer ERR backend-unavailable"
        )
        return None
    try:
        database = Postgres(bindir=find_bindir(environ))
    except PostgresUnavailable as error:
        console.say(
            f"starting without PostgreSQL, /db will answer ERR backend-unavailable: {error}"
        )
        return None
    console.say(f"starting postgres: a throwaway cluster from {database.bindir}")
    try:
        database.start()
    except PostgresError as error:
        raise StackError(
            f"PostgreSQL did not start ({error}); --no-postgres starts the stack without it"
        ) from None
    console.say(
        f"postgres is up: {database.url} (max_connections {database.max_connections}; every "
        "server gets it as ARENA_DB_URL, its password as ARENA_DB_PASSWORD)"
    )
    return database


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the stack until SIGINT/SIGTERM; returns the exit code."""
    environ = os.environ if environ is None else environ
    console = Console()
    try:
        settings = parse_settings(argv, environ)
    except StackError as error:
        print(f"python -m loadtest.tools.stack: error: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="arena-stack-") as workdir:
        try:
            services = plan(settings, Path(workdir), environ)
            check_ports(settings, services)
        except StackError as error:
            print(f"python -m loadtest.tools.stack: error: {error}", file=sys.stderr)
            return 2
        if not (ROOT / "loadtest" / "plugin" / "locustfile.py").exists() and settings.locust:
            console.say("loadtest/plugin/locustfile.py not found: starting without Locust")
        if settings.prometheus == "auto" and not any(s.name == "prometheus" for s in services):
            console.say("no `prometheus` on the PATH: starting without Prometheus")
        _become_subreaper()
        stack = Stack(settings, services, console)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stack.request_stop)
        code = 0
        try:
            stack.database = start_database(settings, console, environ)
            if stack.database is not None:
                # Planned again with the database's settings: the first plan served to check
                # every port before anything started.
                stack.services = plan(settings, Path(workdir), environ, stack.database.env())
            stack.start()
            code = stack.watch()
        except StackError as error:
            console.say(f"error: {error}; stopping everything")
            code = 1
        finally:
            # A second Ctrl-C must not interrupt the clean-up half way.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
            stack.stop()
        console.say("stopped" if code == 0 else f"stopped (exit code {code})")
        return code


if __name__ == "__main__":
    sys.exit(main())

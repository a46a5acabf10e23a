"""Drive one `docker compose` project of docker-compose.yml from a test, and read it from outside.

Everything here talks to the Docker engine through the `docker` CLI and to the stack through
ports the project publishes on 127.0.0.1, exactly as a user would.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loadtest.tools import procs
from loadtest.tools.procs import free_port as free_port
from services import models

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DASHBOARD_DIR = ROOT / "docker" / "grafana" / "dashboards"
DATASOURCE_DIR = ROOT / "docker" / "grafana" / "provisioning" / "datasources"
LOCUST_CONF = ROOT / "loadtest" / "plugin" / "locust.conf"
REQUIREMENTS_FILES = sorted((ROOT / "docker").glob("requirements-*.txt"))
SERVER_SERVICES = models.NAMES
# PostgreSQL behind `/db` and its exporter (docker/postgres/).
DATABASE_SERVICES = ("postgres", "postgres-exporter")
# The compose file's secrets (passwords, as files) and the variable that names each one's file.
SECRET_FILE_VARIABLES = {
    "postgres-password": "ARENA_POSTGRES_PASSWORD_FILE",
    "db-password": "ARENA_DB_PASSWORD_FILE",
    "db-monitor-password": "ARENA_DB_MONITOR_PASSWORD_FILE",
}
# Compose variables that publish a port on the host: the test picks free ones, so it never
# collides with a stack the user already runs on the default ports.
PUBLISHED_PORT_VARIABLES = {
    **{model.name: f"ARENA_{model.env_name}_PORT" for model in models.MODELS},
    "locust": "ARENA_LOCUST_PORT",
    "prometheus": "ARENA_PROMETHEUS_PORT",
    "grafana": "ARENA_GRAFANA_PORT",
}
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": "5m",
    "${__range}": "5m",
}


def cli_problem(timeout: float = 30.0) -> str | None:
    """Why the Docker Compose v2 CLI cannot be used here, or None when it can."""
    return _first_failure([["docker", "compose", "version"]], timeout)


def engine_problem(timeout: float = 30.0) -> str | None:
    """Why no Docker engine with Compose v2 can be used here, or None when one can."""
    return _first_failure(
        [["docker", "info", "--format", "{{.ServerVersion}}"], ["docker", "compose", "version"]],
        timeout,
    )


def require(problem: str | None, what: str) -> None:
    """Skip the test when `problem` says Docker cannot be used, or fail it in CI
    (ARENA_REQUIRE_DOCKER=1)."""
    if problem:
        if os.environ.get("ARENA_REQUIRE_DOCKER") == "1":
            pytest.fail(f"ARENA_REQUIRE_DOCKER=1 but no {what}: {problem}")
        pytest.skip(f"no {what} ({problem}); set ARENA_REQUIRE_DOCKER=1 to fail")


def _first_failure(commands: list[list[str]], timeout: float) -> str | None:
    for command in commands:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"`{' '.join(command)}` failed: {error}"
        if result.returncode != 0:
            return f"`{' '.join(command)}` exited {result.returncode}: {result.stderr.strip()}"
    return None


def clean_environment() -> dict[str, str]:
    """The current environment without any of the compose file's knobs (so defaults apply)."""
    knobs = ("ARENA_", "GF_", "LOCUST_")
    return {k: v for k, v in os.environ.items() if not k.startswith(knobs)}


def seconds(duration: str) -> float:
    """A Compose duration such as `20s`, `1m30s` or `1500ms` in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([\d.]+)(h|ms|us|ns|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(number) * units[unit] for number, unit in parts)


def poll(check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    """Call `check` until it returns something truthy or `timeout` passes; return the last value.

    Exceptions count as "not yet" (services come up one by one); the last one is returned
    as the value when time runs out, so the caller's assertion message can show it.
    """
    try:
        return procs.poll_until("a condition", check, timeout, interval, ignore=(Exception,))
    except procs.PollTimeout as timed_out:
        return timed_out.last


def http_request(
    url: str,
    data: dict[str, str] | None = None,
    login: tuple[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> urllib.request.Request:
    """A GET (or form-POST) request, with HTTP Basic credentials when `login` is given."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers or {})
    if login is not None:
        token = base64.b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def http_json(
    url: str,
    data: dict[str, str] | None = None,
    timeout: float = 10.0,
    login: tuple[str, str] | None = None,
) -> Any:
    """GET (or form-POST) a URL and decode its JSON body."""
    with urllib.request.urlopen(http_request(url, data, login), timeout=timeout) as response:
        return json.load(response)


def http_text(url: str, timeout: float = 10.0, login: tuple[str, str] | None = None) -> str:
    """GET a URL and return its body as text."""
    with urllib.request.urlopen(http_request(url, login=login), timeout=timeout) as response:
        return response.read().decode()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL expr) for every query in every provisioned dashboard."""
    found: list[tuple[str, str, str]] = []

    def walk(panels: Iterable[dict[str, Any]], source: str) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((source, panel.get("title", ""), target["expr"]))
            walk(panel.get("panels", []), source)

    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        walk(json.loads(path.read_text()).get("panels", []), path.name)
    return found


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's built-in variables with the values Grafana would send."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def provisioned_datasource_uids() -> set[str]:
    """The datasource uids docker/grafana/provisioning/datasources/ defines."""
    uids: set[str] = set()
    for path in DATASOURCE_DIR.glob("*.y*ml"):
        uids.update(re.findall(r"^\s+uid:\s*[\"']?([\w-]+)", path.read_text(), re.MULTILINE))
    return uids


def metric_samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples of one metric in Prometheus text format: {frozenset(labels): value}."""
    return procs.Metrics(text).by_labels(name)


class PublishedStack:
    """What a stack on 127.0.0.1 offers a test: its services' URLs and Prometheus queries.
    Subclasses hold `ports`: {service: published host port}."""

    ports: dict[str, int]

    def url(self, service: str, path: str) -> str:
        """http://127.0.0.1:PUBLISHED_PORT/path of a service."""
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def promql(self, query: str) -> list[dict[str, Any]]:
        """Run an instant query against the stack's Prometheus; return the result vector."""
        reply = http_json(self.url("prometheus", "/api/v1/query"), data={"query": query})
        assert reply["status"] == "success", reply
        return reply["data"]["result"]


@dataclass
class ComposeProject(PublishedStack):
    """One uniquely named project of the repository's compose file, on free host ports."""

    name: str = field(default_factory=lambda: f"arena-test-{secrets.token_hex(4)}")
    ports: dict[str, int] = field(
        default_factory=lambda: {service: procs.free_port() for service in PUBLISHED_PORT_VARIABLES}
    )
    started: list[str] = field(default_factory=list)
    # Replicas per server model (`up --scale`); a scaled model's host port variable is left empty,
    # so each replica is published on a free port (replica_ports).
    scale: dict[str, int] = field(default_factory=dict)
    # The Locust web UI's login (ARENA_LOCUST_LOGIN): on in the test, so the healthchecks and
    # the Prometheus scrape are shown to work with it; the default (off) is checked without
    # Docker in tests/test_locust_weblogin.py.
    locust_login: tuple[str, str] = field(
        default_factory=lambda: ("arena", secrets.token_urlsafe(12))
    )
    # {secret name: password file} for the compose file's secrets (SECRET_FILE_VARIABLES); a
    # secret left out uses the file's default (docker/postgres/dev-secrets/). write_secrets()
    # makes random ones.
    secret_files: dict[str, Path] = field(default_factory=dict)

    def write_secrets(self, directory: Path) -> dict[str, str]:
        """A random password for every secret, each in a file in `directory` that the containers'
        users can read (a Compose file secret is a bind mount: it keeps the host file's mode);
        returns {secret name: password}."""
        passwords = {name: secrets.token_urlsafe(18) for name in SECRET_FILE_VARIABLES}
        for name, password in passwords.items():
            path = directory / name
            path.write_text(password + "\n")
            path.chmod(0o644)
            self.secret_files[name] = path
        return passwords

    @property
    def env(self) -> dict[str, str]:
        """The environment for compose commands: default knobs, our ports, the classic builder."""
        published = {
            PUBLISHED_PORT_VARIABLES[s]: "" if self.scale.get(s, 1) > 1 else str(p)
            for s, p in self.ports.items()
        }
        return {
            **clean_environment(),
            "COMPOSE_BAKE": "false",
            "ARENA_BIND_ADDRESS": "127.0.0.1",
            "ARENA_LOCUST_LOGIN": ":".join(self.locust_login),
            **{SECRET_FILE_VARIABLES[name]: str(path) for name, path in self.secret_files.items()},
            **published,
        }

    def compose(
        self,
        *args: str,
        timeout: float = 120.0,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker compose -p NAME -f docker-compose.yml ARGS` and capture its output."""
        command = ["docker", "compose", "-p", self.name, "-f", str(COMPOSE_FILE), *args]
        result = subprocess.run(
            command, cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"`{' '.join(command[3:])}` exited {result.returncode}\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{self.diagnostics()}"
            )
        return result

    def up(self, services: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
        """Build and start `services`, waiting up to `timeout` s until every one is healthy."""
        self.compose(
            "up",
            "-d",
            "--build",
            "--wait",
            "--wait-timeout",
            str(int(timeout)),
            *[f"--scale={service}={count}" for service, count in self.scale.items()],
            *services,
            timeout=timeout + 60,
            env=env,
        )
        self.started = list(services)

    def config(self) -> dict[str, Any]:
        """The resolved compose model (`docker compose config --format json`)."""
        return json.loads(self.compose("config", "--format", "json").stdout)

    def runnable_services(self) -> tuple[list[str], list[str]]:
        """(services this engine can start, services it cannot: no build and no local image)."""
        runnable, missing = [], []
        for name, service in self.config()["services"].items():
            if "build" in service or image_present(service["image"]):
                runnable.append(name)
            else:
                missing.append(f"{name} ({service['image']})")
        return runnable, missing

    def containers(self) -> list[dict[str, Any]]:
        """`docker compose ps --all` as a list of dicts (one per container)."""
        output = self.compose("ps", "--all", "--format", "json", check=False).stdout
        rows: list[dict[str, Any]] = []
        for line in output.splitlines():
            line = line.strip()
            if not line:
                continue
            parsed = json.loads(line)
            rows.extend(parsed if isinstance(parsed, list) else [parsed])
        return rows

    def inspect(self, service: str) -> dict[str, Any]:
        """`docker inspect` of the service's (first) container."""
        ids = self.compose("ps", "--all", "-q", service).stdout.split()
        assert ids, f"no container for service {service}"
        result = subprocess.run(
            ["docker", "inspect", ids[0]], capture_output=True, text=True, timeout=30, check=True
        )
        return json.loads(result.stdout)[0]

    def container_state(self, service: str) -> dict[str, Any]:
        """`docker inspect` .State of the service's (first) container, plus its RestartCount."""
        details = self.inspect(service)
        return {**details["State"], "RestartCount": details["RestartCount"]}

    def crash(self, service: str) -> None:
        """SIGKILL the service's main process from inside its container, as a crash would.

        Not `docker kill`: the engine counts that as a manual stop, and no restart policy
        (not even `always`) restarts a container after it (moby/moby#53415).
        """
        # PID 1 is the init process (`init: true`); its one child is the server.
        self.compose(
            "exec",
            "-T",
            service,
            "sh",
            "-c",
            "kill -KILL $(cat /proc/1/task/1/children)",
            check=False,
            timeout=30,
        )

    def server_metrics(self, service: str) -> str:
        """A server's /metrics text, read inside its container (the metrics port is internal)."""
        script = (
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9100/metrics', timeout=5).read().decode())"
        )
        return self.compose("exec", "-T", service, "python", "-c", script, timeout=30).stdout

    def psql(self, sql: str) -> list[list[str]]:
        """Run SQL in the `postgres` container as its superuser (the Unix socket, peer
        authentication: no password); the rows, each a list of column texts."""
        command = ["psql", "--no-psqlrc", "-U", "postgres", "-d", "arena", "-AtF", "\t", "-c", sql]
        output = self.compose("exec", "-T", "postgres", *command, timeout=30).stdout
        return [line.split("\t") for line in output.splitlines() if line]

    def logs(self) -> str:
        """Every container's whole log so far."""
        return self.compose("logs", "--no-color", "--no-log-prefix", timeout=60).stdout

    def replica_ports(self, service: str, port: int = 9000) -> list[int]:
        """The host port of each replica of `service` (`docker compose port --index N`)."""
        found = []
        for index in range(1, self.scale.get(service, 1) + 1):
            output = self.compose("port", "--index", str(index), service, str(port)).stdout
            found.append(int(output.strip().rpartition(":")[2]))
        return found

    def diagnostics(self) -> str:
        """Container states and recent logs, for assertion messages."""
        try:
            states = self.compose("ps", "--all", check=False).stdout
            logs = self.compose("logs", "--no-color", "--tail", "25", check=False).stdout
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"(no diagnostics: {error})"
        return f"--- docker compose ps ---\n{states}\n--- last log lines ---\n{logs[-8000:]}"

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, volumes and networks still labelled with this project."""
        label = f"label=com.docker.compose.project={self.name}"
        found = {}
        for kind, command in (
            ("containers", ["docker", "ps", "-a", "-q", "--filter", label]),
            ("volumes", ["docker", "volume", "ls", "-q", "--filter", label]),
            ("networks", ["docker", "network", "ls", "-q", "--filter", label]),
        ):
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
            found[kind] = result.stdout.split()
        return found

    def down(self) -> subprocess.CompletedProcess[str]:
        """Remove everything the project created (containers, network, named volumes)."""
        return self.compose(
            "down", "-v", "--remove-orphans", "--timeout", "30", timeout=180, check=False
        )


def image_present(image: str) -> bool:
    """Whether the engine has this image locally (nothing is pulled)."""
    result = subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=30)
    return result.returncode == 0


def ping(port: int, timeout: float = 10.0) -> bytes:
    """Send `/ping` to 127.0.0.1:port from the host and return the first reply line."""
    return procs.ping_reply("127.0.0.1", port, timeout)


def reply(port: int, line: bytes, timeout: float = 10.0) -> bytes:
    """Send one request line to 127.0.0.1:port from the host; its reply line (then `/quit`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(line + b"\n/quit\n")
        with sock.makefile("rb") as replies:
            return replies.readline(65536)

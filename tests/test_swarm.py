"""`docker stack deploy -c docker/stack.yml` runs the arena on Docker Swarm, two replicas a model.

One deployment for the whole module, on a single-node swarm of the local engine (`docker swarm
init` when it is no swarm yet, `docker swarm leave --force` after; a swarm that was there
before is left as it was). The images are those `docker compose build` makes. The tests check,
in file order: every service runs its replicas; every server replica answers `/db` through
PostgreSQL (its Swarm secret, the overlay network), which lists each model's connections; Locust,
restarted once everything runs so each target's users spread over its replicas, loads every
target with zero failures and every replica gets connections and requests; Prometheus scrapes
every replica and the PostgreSQL exporter; `docker stack rm` leaves no service, network,
config, secret or container behind (and the test removes the volumes).

Without a Docker engine the module is skipped, unless ARENA_REQUIRE_DOCKER=1 (CI), where it
fails.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from services import models
from tests.compose_helpers import (
    DATABASE_SERVICES,
    ROOT,
    SERVER_SERVICES,
    ComposeProject,
    PublishedStack,
    clean_environment,
    engine_problem,
    free_port,
    http_json,
    http_text,
    image_present,
    metric_samples,
    poll,
    require,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

STACK_FILE = ROOT / "docker" / "stack.yml"
REPLICAS = 2  # per server model
USERS_PER_TARGET = 100  # loadtest/plugin/locust.conf
BUILD_TIMEOUT = 420.0  # `docker compose build`; cached builds take seconds
RUNNING_TIMEOUT = 180.0  # every task started and healthy
TRAFFIC_TIMEOUT = 120.0
SCRAPE_TIMEOUT = 90.0
REMOVE_TIMEOUT = 90.0
PUBLISHED = ("locust", "prometheus", "grafana")
GRAFANA_IMAGE = "grafana/grafana:11.6.1"
DB_TIMEOUT = 60.0  # PostgreSQL starts with the servers here (no depends_on in Swarm)
# Run in a server replica's container: one `/db` to the server in it, its reply line printed.
DB_SCRIPT = (
    "import socket; s = socket.create_connection(('127.0.0.1', 9000), timeout=10); "
    "s.sendall(b'/db 5 hello from the swarm test\\n/quit\\n'); "
    "print(s.makefile('rb').readline().decode(), end='')"
)
DB_REPLY = "HELLO FROM THE SWARM TEST\n"


def docker(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run `docker ARGS`; return stdout, or fail with its output."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"`docker {' '.join(args)}` exited {result.returncode}\n{result}")
    return result.stdout


@dataclass
class SwarmStack(PublishedStack):
    """One uniquely named stack of docker/stack.yml, its web UIs on free host ports (published
    in mode host)."""

    name: str = field(default_factory=lambda: f"arena-test-{secrets.token_hex(4)}")
    ports: dict[str, int] = field(default_factory=lambda: {s: free_port() for s in PUBLISHED})
    grafana: bool = False  # only where its image is present (no registry here)

    @property
    def env(self) -> dict[str, str]:
        """Default knobs, our ports, REPLICAS of every model, Grafana only when it can run."""
        return {
            **clean_environment(),
            **{f"ARENA_{s.upper()}_PORT": str(port) for s, port in self.ports.items()},
            **{f"ARENA_{m.env_name}_REPLICAS": str(REPLICAS) for m in models.MODELS},
            "ARENA_GRAFANA_REPLICAS": "1" if self.grafana else "0",
        }

    def expected_replicas(self) -> dict[str, int]:
        """{service: replicas} as deployed."""
        return {
            **{service: REPLICAS for service in SERVER_SERVICES},
            "locust": 1,
            "locust-worker": 1,
            "prometheus": 1,
            **{service: 1 for service in DATABASE_SERVICES},
            "grafana": 1 if self.grafana else 0,
        }

    def deploy(self) -> None:
        """`docker stack deploy` with our environment (images used as built, never pulled)."""
        command = ["docker", "stack", "deploy", "--resolve-image", "never"]
        command += ["-c", str(STACK_FILE), self.name]
        result = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    def replicas(self) -> dict[str, str]:
        """{service: "running/desired"} from `docker stack services`."""
        output = docker("stack", "services", self.name, "--format", "{{.Name}} {{.Replicas}}")
        rows = (line.split() for line in output.splitlines() if line.strip())
        return {name.removeprefix(f"{self.name}_"): count for name, count in rows}

    def tasks(self) -> str:
        """`docker stack ps` without truncation, for assertion messages."""
        return docker("stack", "ps", self.name, "--no-trunc", check=False)

    def leftovers(self) -> dict[str, list[str]]:
        """Services, networks, configs, secrets and containers still in the stack's namespace."""
        label = f"label=com.docker.stack.namespace={self.name}"
        return {
            "services": docker("service", "ls", "-q", "--filter", label).split(),
            "networks": docker("network", "ls", "-q", "--filter", label).split(),
            "configs": docker("config", "ls", "-q", "--filter", label).split(),
            "secrets": docker("secret", "ls", "-q", "--filter", label).split(),
            "containers": docker("ps", "-aq", "--filter", label).split(),
        }

    def task_containers(self, service: str) -> list[str]:
        """The ids of the running containers of one service's tasks (this node's)."""
        label = f"label=com.docker.swarm.service.name={self.name}_{service}"
        return docker("ps", "-q", "--filter", label).split()

    def volumes(self) -> list[str]:
        """The stack's named volumes (Swarm leaves them behind on purpose: they hold data)."""
        label = f"label=com.docker.stack.namespace={self.name}"
        return docker("volume", "ls", "-q", "--filter", label).split()

    def remove(self) -> None:
        """`docker stack rm`, then wait for its containers to go and remove its volumes."""
        docker("stack", "rm", self.name, check=False, timeout=120)
        poll(lambda: not any(self.leftovers().values()), REMOVE_TIMEOUT, interval=2.0)
        for volume in self.volumes():
            docker("volume", "rm", volume, check=False)


@pytest.fixture(scope="module")
def swarm() -> Iterator[SwarmStack]:
    """The stack deployed on a swarm (initialised here when needed); always removed after."""
    require(engine_problem(), "Docker engine")
    ComposeProject().compose("build", timeout=BUILD_TIMEOUT)
    state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()
    initialised = state == "inactive"
    if initialised:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    else:
        assert state == "active", f"this engine's swarm is {state!r}: neither off nor usable"
    stack = SwarmStack(grafana=image_present(GRAFANA_IMAGE))
    try:
        print(f"stack {stack.name}: {stack.expected_replicas()}")
        stack.deploy()
        yield stack
    finally:
        stack.remove()
        if initialised:
            docker("swarm", "leave", "--force", check=False)


def test_every_service_runs_all_its_replicas(swarm: SwarmStack) -> None:
    """`docker stack services` shows every replica of every service running (healthy)."""
    expected = {s: f"{n}/{n}" for s, n in swarm.expected_replicas().items()}
    seen = poll(lambda: swarm.replicas() == expected, RUNNING_TIMEOUT, interval=3.0)
    assert seen is True, f"{swarm.replicas()} != {expected}\n{swarm.tasks()}"


def test_every_replica_answers_db_through_postgres(swarm: SwarmStack) -> None:
    """`/db 5 TEXT` sent inside each server replica's container to its own server: TEXT
    upper-cased after 5 ms in PostgreSQL (only `ERR backend-unavailable`, the database or the
    pool still starting, is asked again); pg_stat_activity then lists every model's replicas'
    connections as `arena-MODEL`, role arena."""
    for model in SERVER_SERVICES:
        containers = swarm.task_containers(model)
        assert len(containers) == REPLICAS, (model, containers, swarm.tasks())
        for container in containers:

            def answered(container: str = container) -> str | None:
                answer = docker("exec", container, "python", "-c", DB_SCRIPT, timeout=30)
                return None if answer.startswith("ERR backend-unavailable") else answer

            answer = poll(answered, DB_TIMEOUT, interval=2.0)
            assert answer == DB_REPLY, f"{model} replica {container}: {answer!r}"
    (postgres,) = swarm.task_containers("postgres")
    query = (
        "SELECT application_name, count(*) FROM pg_stat_activity WHERE usename = 'arena' GROUP BY 1"
    )
    output = docker(
        "exec", postgres, "psql", "-U", "postgres", "-d", "arena", "-AtF", " ", "-c", query
    )
    connections = {
        name: int(count) for name, count in (line.split() for line in output.splitlines())
    }
    print(f"pg_stat_activity (role arena): {connections}")
    for model in SERVER_SERVICES:
        assert connections.get(f"arena-{model}", 0) >= REPLICAS, (model, connections)


def locust_totals(swarm: SwarmStack) -> tuple[dict[str, float], dict[str, float], float]:
    """Locust's ({target: users}, {target: requests}, failures of every kind) so far."""
    text = http_text(swarm.url("locust", "/metrics"))
    users = {dict(k)["target"]: v for k, v in metric_samples(text, "locust_users").items()}
    requests: dict[str, float] = {}
    for labels, value in metric_samples(text, "locust_requests_total").items():
        requests[dict(labels)["target"]] = requests.get(dict(labels)["target"], 0.0) + value
    failures = sum(metric_samples(text, "locust_failures_total").values())
    failures += sum(metric_samples(text, "locust_connect_errors_total").values())
    return users, requests, failures


def test_locust_loads_every_replica_with_zero_failures(swarm: SwarmStack) -> None:
    """Restarted once everything runs (so no user connected while a replica was missing from
    DNS), Locust runs 100 users per target with zero failures, and by the servers' own metrics
    every replica of every model holds connections and serves requests."""
    master = swarm.url("locust", "")
    poll(lambda: http_json(master + "/stats/requests")["state"] == "running", TRAFFIC_TIMEOUT)
    assert http_json(master + "/stop", data={})["success"]
    poll(lambda: http_json(master + "/stats/requests")["state"] == "stopped", TRAFFIC_TIMEOUT)
    users = str(USERS_PER_TARGET * len(SERVER_SERVICES))
    answer = http_json(master + "/swarm", data={"user_count": users, "spawn_rate": "100"})
    assert answer["success"], answer

    def loaded() -> dict[str, dict[str, tuple[float, float]]] | None:
        running, requests, failures = locust_totals(swarm)
        assert failures == 0, f"Locust failures: {http_text(master + '/metrics')}"
        rows = swarm.promql("sum by (job, replica) (arena_connections_active)")
        rates = swarm.promql("sum by (job, replica) (rate(arena_requests_total[20s]))")
        rate_of = {(r["metric"]["job"], r["metric"]["replica"]): r["value"][1] for r in rates}
        spread: dict[str, dict[str, tuple[float, float]]] = {}
        for row in rows:
            key = (row["metric"]["job"], row["metric"]["replica"])
            load = (float(row["value"][1]), float(rate_of.get(key, 0)))
            spread.setdefault(key[0], {})[key[1]] = load
        ready = all(
            running.get(model) == USERS_PER_TARGET
            and requests.get(model, 0) > 0
            and len(spread.get(model, {})) == REPLICAS
            and all(connections > 0 and rate > 0 for connections, rate in spread[model].values())
            and sum(connections for connections, _ in spread[model].values()) == USERS_PER_TARGET
            for model in SERVER_SERVICES
        )
        return spread if ready else None

    spread = poll(loaded, TRAFFIC_TIMEOUT + SCRAPE_TIMEOUT, interval=5.0)
    assert isinstance(spread, dict), f"not every replica loaded: {spread!r}\n{swarm.tasks()}"
    print(f"(connections, requests/s) per replica: {json.dumps(spread)}")
    report = http_json(master + "/stats/requests")
    assert report["errors"] == [], report["errors"]
    assert report["stats"][-1]["num_failures"] == 0


def test_prometheus_has_every_replica_up(swarm: SwarmStack) -> None:
    """Each server job has one target per replica (DNS), labelled with model and address; the
    PostgreSQL exporter's job is up and reaches the database (pg_up 1)."""
    targets = http_json(swarm.url("prometheus", "/api/v1/targets"))["data"]["activeTargets"]
    by_job: dict[str, list[dict[str, Any]]] = {}
    for target in targets:
        by_job.setdefault(target["labels"]["job"], []).append(target)
    assert set(by_job) == {*SERVER_SERVICES, "locust", "postgres"}
    for model in SERVER_SERVICES:
        assert len(by_job[model]) == REPLICAS, by_job[model]
        for target in by_job[model]:
            assert target["health"] == "up", target
            assert target["labels"]["model"] == model, target
            assert target["labels"]["replica"] == target["labels"]["instance"], target
    assert [t["health"] for t in by_job["locust"]] == ["up"], by_job["locust"]
    assert [t["health"] for t in by_job["postgres"]] == ["up"], by_job["postgres"]
    up = swarm.promql('pg_up{job="postgres"}')
    assert [row["value"][1] for row in up] == ["1"], up


def test_stack_rm_leaves_nothing_behind(swarm: SwarmStack) -> None:
    """`docker stack rm` removes every service, network, config, secret and container of the
    stack."""
    swarm.remove()
    assert swarm.leftovers() == {
        "services": [],
        "networks": [],
        "configs": [],
        "secrets": [],
        "containers": [],
    }
    assert swarm.volumes() == []

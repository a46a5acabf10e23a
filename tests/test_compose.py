"""`docker compose up` starts a healthy, loaded, observable stack, and stops cleanly.

One uniquely named compose project on free ports is built and started for the whole module,
with the Locust web login on (ARENA_LOCUST_LOGIN), so the healthchecks and Prometheus are shown
to work with it. The tests read the stack from outside the containers (published ports, the
docker CLI) in the order a user would look at it, then crash one server under load and watch it
come back, stop the servers with SIGTERM, and finally take it down; the tests run in file order
and each later one needs what the earlier ones left. gevent runs two replicas (`up --scale
gevent=2`): Locust must load, and Prometheus scrape, each one. PostgreSQL and its exporter run
with random passwords (the secrets' file variables pointed at temporary files): every server
answers `/db` through it, PostgreSQL lists each server's connections by application_name, and no
password shows in a log or a container's configuration. Grafana's image cannot run on an engine
without a registry: then every PromQL query of the provisioned dashboard is run against the real
Prometheus instead.

Without a Docker engine the module is skipped, unless ARENA_REQUIRE_DOCKER=1 (CI), where it
fails.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from loadtest.plugin.workload import KNOBS, TARGETS
from services import models
from services.config import Settings
from tests.compose_helpers import (
    DASHBOARD_DIR,
    DATABASE_SERVICES,
    LOCUST_CONF,
    PUBLISHED_PORT_VARIABLES,
    ROOT,
    SECRET_FILE_VARIABLES,
    SERVER_SERVICES,
    ComposeProject,
    clean_environment,
    cli_problem,
    dashboard_queries,
    engine_problem,
    grafana_to_promql,
    http_json,
    http_request,
    http_text,
    metric_samples,
    ping,
    poll,
    provisioned_datasource_uids,
    reply,
    require,
    seconds,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]

UP_TIMEOUT = 420.0  # image builds included; cached builds take seconds
TRAFFIC_TIMEOUT = 120.0  # Locust waits for a worker, then spawns its users
USERS_PER_SERVER = 100  # what loadtest/plugin/locust.conf starts against each server
SCRAPE_TIMEOUT = 90.0  # a few 5 s scrape intervals, so every rate() has two samples
RESTART_TIMEOUT = 60.0  # restart + first healthcheck (every 5 s) + users' reconnect back-off
# Locust workers report to the master every 3 s: two reads this far apart that agree mean the
# failure counter really stopped.
QUIET_INTERVAL = 7.0
# `--scale` rides in this one stack start: two replicas of one model (the cores lesson's model),
# the others one each. Locust's 100 users of that target spread over both.
SCALED = {"gevent": 2}
HARDENED_SERVICES = (*SERVER_SERVICES, "locust", "locust-worker", *DATABASE_SERVICES)
# `/db MS TEXT` waits MS ms inside PostgreSQL, then answers TEXT upper-cased like an echo.
DB_REQUEST = b"/db 5 hello from the compose test"
DB_REPLY = b"HELLO FROM THE COMPOSE TEST\n"
DB_TIMEOUT = 30.0  # a server's pool connects in the background; only backend-unavailable waits
# What a user opens: each server's protocol port, Locust's web UI, Prometheus and Grafana.
PUBLISHED = {
    **{service: [9000] for service in SERVER_SERVICES},
    "locust": [8089],
    "prometheus": [9090],
    "grafana": [3000],
}


@pytest.fixture(scope="module")
def compose_cli() -> ComposeProject:
    """A project handle for commands that need only the Compose CLI, not a running engine."""
    require(cli_problem(), "Docker Compose CLI")
    return ComposeProject()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeProject]:
    """The stack, built and started with `up -d --build --wait`, with random database passwords;
    always taken down after."""
    require(engine_problem(), "Docker engine")
    project = ComposeProject(scale=SCALED)
    project.write_secrets(tmp_path_factory.mktemp("secrets"))
    try:
        runnable, missing = project.runnable_services()
        print(
            f"compose project {project.name}: starting {runnable}; "
            f"cannot run here (no image, no build): {missing}"
        )
        project.up(runnable, UP_TIMEOUT)
        yield project
    finally:
        project.down()


def test_compose_file_renders_without_warnings(compose_cli: ComposeProject) -> None:
    """`docker compose config` succeeds and warns about nothing, with no knob set at all."""
    result = compose_cli.compose("config", "--quiet", env=clean_environment())
    assert result.stderr.strip() == ""


def test_compose_defaults_match_the_code(compose_cli: ComposeProject) -> None:
    """The knobs' defaults in docker-compose.yml are the servers' and the load test's own."""
    services = json.loads(
        compose_cli.compose("config", "--format", "json", env=clean_environment()).stdout
    )["services"]
    server_defaults = Settings()
    for name in SERVER_SERVICES:
        environment = services[name]["environment"]
        assert float(environment["ARENA_GRACE"]) == server_defaults.grace
        assert int(environment["ARENA_MAX_CONNECTIONS"]) == server_defaults.max_connections
        assert float(environment["ARENA_IDLE_TIMEOUT"]) == server_defaults.idle_timeout
        assert environment["ARENA_LOG_LEVEL"] == server_defaults.log_level
        assert int(environment["ARENA_DB_POOL"]) == server_defaults.db_pool
        assert float(environment["ARENA_DB_TIMEOUT"]) == server_defaults.db_timeout
        if "ARENA_DB_DRIVER" in environment:  # gevent and asyncio only
            assert environment["ARENA_DB_DRIVER"] == server_defaults.db_driver
        if "ARENA_LOOP" in environment:  # asyncio's event loop: the server's own default
            assert environment["ARENA_LOOP"] == server_defaults.loop
        # SIGKILL must come only after the server's own grace period is over.
        assert seconds(services[name]["stop_grace_period"]) > float(environment["ARENA_GRACE"])
        assert services[name]["cpus"] == services["threaded"]["cpus"]
        assert services[name]["mem_limit"] == services["threaded"]["mem_limit"]
    conf = dict(re.findall(r"^([\w-]+)\s*=\s*(\S+)", LOCUST_CONF.read_text(), re.MULTILINE))
    for name in ("locust", "locust-worker"):
        environment = services[name]["environment"]
        for knob in KNOBS:
            if knob.dest in {f"{target}_target" for target in TARGETS}:
                continue  # addresses are container names here, not the local defaults
            assert knob.parse(environment[knob.env_var]) == knob.parse(knob.default), knob.flag
        assert environment["LOCUST_USERS"] == conf["users"]
        assert environment["LOCUST_SPAWN_RATE"] == conf["spawn-rate"]


def test_every_model_can_publish_its_replicas_without_a_clash(compose_cli: ComposeProject) -> None:
    """One replica: the model's fixed host port. Its port variable empty: no fixed host port (a
    free one per replica, so `--scale` works); a range: one port of it per replica."""
    for value, published in (("", None), ("9030-9039", "9030-9039")):
        env = {
            **clean_environment(),
            **{PUBLISHED_PORT_VARIABLES[s]: value for s in SERVER_SERVICES},
        }
        services = json.loads(compose_cli.compose("config", "--format", "json", env=env).stdout)
        for name in SERVER_SERVICES:
            ports = services["services"][name]["ports"]
            assert [(p["target"], p.get("published")) for p in ports] == [(9000, published)], ports


def test_the_processes_knob_reaches_exactly_the_models_that_take_it(
    compose_cli: ComposeProject,
) -> None:
    """ARENA_<MODEL>_PROCESSES becomes the server's ARENA_PROCESSES (default: the server's own)
    where the registry says the model takes --processes, in Compose and in the Swarm stack; the
    others (the pool) never get it."""
    variables = {f"ARENA_{model.env_name}_PROCESSES": "3" for model in models.MODELS}
    swarm = (ROOT / "docker" / "stack.yml").read_text()
    for env, wanted in ((clean_environment(), str(Settings().processes)), (variables, "3")):
        rendered = compose_cli.compose(
            "config", "--format", "json", env={**clean_environment(), **env}
        )
        services = json.loads(rendered.stdout)["services"]
        for model in models.MODELS:
            environment = services[model.name]["environment"]
            if model.processes:
                assert environment["ARENA_PROCESSES"] == wanted, model.name
            else:
                assert "ARENA_PROCESSES" not in environment, model.name
    for model in models.MODELS:
        block = re.search(rf"^  {model.name}:\n(.*?)(?=^  \S)", swarm, re.M | re.S)
        assert block, model.name
        line = f"ARENA_PROCESSES: ${{ARENA_{model.env_name}_PROCESSES:-1}}"
        assert (line in block[1]) == model.processes, model.name


def test_compose_file_hardens_every_service(compose_cli: ComposeProject) -> None:
    """Servers and Locust: non-root, read-only root, no capabilities, no-new-privileges; only
    the ports a user needs, on 127.0.0.1; no password and no Locust login in the file."""
    services = json.loads(
        compose_cli.compose("config", "--format", "json", env=clean_environment()).stdout
    )["services"]
    for name, service in services.items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["restart"] == "unless-stopped", name
        assert service["init"] is True, name
        published = sorted(port["target"] for port in service.get("ports", []))
        assert published == PUBLISHED.get(name, []), (name, service.get("ports"))
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    for name in HARDENED_SERVICES:
        user = services[name]["user"]
        assert user.split(":")[0] not in ("", "0", "root"), (name, user)
    # Passed through from the shell only: no value, hence no default password, in the file.
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] is None
    assert grafana["GF_AUTH_BASIC_ENABLED"] == "false"
    for name in ("locust", "locust-worker"):
        assert services[name]["environment"]["ARENA_LOCUST_LOGIN"] == "", name
    with_login = json.loads(
        compose_cli.compose(
            "config",
            "--format",
            "json",
            env={**clean_environment(), "ARENA_LOCUST_LOGIN": "me:secret"},
        ).stdout
    )["services"]
    for name in ("locust", "locust-worker"):
        assert with_login[name]["environment"]["ARENA_LOCUST_LOGIN"] == "me:secret", name


def test_postgres_is_pinned_private_and_takes_its_passwords_from_secrets(
    compose_cli: ComposeProject,
) -> None:
    """PostgreSQL 15.x, its port not published unless ARENA_POSTGRES_PORT asks (then on 127.0.0.1
    only); every password a secret file, none in an environment variable or a URL; the servers
    reach it by name, wait for it without depending on it, and fit in its max_connections."""
    config = json.loads(
        compose_cli.compose("config", "--format", "json", env=clean_environment()).stdout
    )
    services = config["services"]
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:15\.\d+", postgres["image"]), postgres["image"]
    assert not postgres.get("ports"), postgres.get("ports")
    assert "pg_isready" in postgres["healthcheck"]["test"], postgres["healthcheck"]

    # The secrets are files; a file secret is bind-mounted with its mode, so the default ones
    # must be readable by the containers' users.
    assert set(config["secrets"]) == set(SECRET_FILE_VARIABLES)
    default_passwords = []
    for name, secret in config["secrets"].items():
        path = Path(secret["file"])
        assert path.is_file() and path.stat().st_mode & 0o004, (name, path)
        default_passwords.append(path.read_text().strip())
        assert default_passwords[-1], f"{path} is empty"
    for name, service in services.items():
        mounted = {secret["source"] for secret in service.get("secrets", [])}
        for key, value in (service.get("environment") or {}).items():
            if value is None:  # passed through from the shell when set (Grafana's admin password)
                continue
            assert not any(password in value for password in default_passwords), (name, key)
            if "://" in value:
                assert urlsplit(value).password is None, (name, key)
            if "PASS" in key:
                assert key.endswith("_FILE"), f"{name}: {key} holds a password in plain env"
                assert value.removeprefix("/run/secrets/") in mounted, (name, key, value)
    exporter = services["postgres-exporter"]["environment"]
    assert "DATA_SOURCE_NAME" not in exporter and "@" not in exporter["DATA_SOURCE_URI"]

    pools = 0
    for name in SERVER_SERVICES:
        service = services[name]
        environment = service["environment"]
        url = urlsplit(environment["ARENA_DB_URL"])
        assert (url.hostname, url.username, url.password) == ("postgres", "arena", None), url
        assert environment["ARENA_DB_PASSWORD_FILE"] == "/run/secrets/db-password", name
        assert service["depends_on"]["postgres"] == {
            "condition": "service_healthy",
            "required": False,
        }, name
        # Only the models where one thread serves every connection take a blocking driver.
        assert ("ARENA_DB_DRIVER" in environment) == (len(models.get(name).db_drivers) > 1), name
        pools += int(environment["ARENA_DB_POOL"])
    max_connections = int(
        next(arg for arg in postgres["command"] if arg.startswith("max_connections=")).split("=")[1]
    )
    # Two replicas of every model (the Swarm default), the exporter and psql, with room.
    assert max_connections >= 2 * pools + 10, (max_connections, pools)

    # The knob publishes it for psql on the host: on 127.0.0.1, whatever ARENA_BIND_ADDRESS says.
    env = {**clean_environment(), "ARENA_POSTGRES_PORT": "5432", "ARENA_BIND_ADDRESS": "0.0.0.0"}
    published = json.loads(compose_cli.compose("config", "--format", "json", env=env).stdout)
    ports = published["services"]["postgres"]["ports"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in ports] == [
        ("127.0.0.1", "5432", 5432)
    ], ports


def test_every_started_service_is_running_and_healthy(stack: ComposeProject) -> None:
    """Every container is running, and healthy by its own healthcheck."""
    containers = {row["Service"]: row for row in stack.containers()}
    assert set(stack.started) <= set(containers), stack.diagnostics()
    # PostgreSQL and its exporter always run (../shared/container-engine builds their stand-ins).
    assert set(DATABASE_SERVICES) <= set(stack.started), (
        f"{DATABASE_SERVICES} not started: no image (run container-engine/setup.sh standins)"
    )
    for service in stack.started:
        row = containers[service]
        assert row["State"] == "running", f"{service}: {row}\n{stack.diagnostics()}"
        assert row["Health"] == "healthy", f"{service}: {row}\n{stack.diagnostics()}"


def test_running_servers_and_locust_are_hardened(stack: ComposeProject) -> None:
    """The engine applied it: non-root user, read-only root, no capabilities, no-new-privileges."""
    for service in HARDENED_SERVICES:
        details = stack.inspect(service)
        host = details["HostConfig"]
        assert details["Config"]["User"].split(":")[0] not in ("", "0", "root"), service
        assert host["ReadonlyRootfs"] is True, service
        assert [cap.upper().removeprefix("CAP_") for cap in host["CapDrop"]] == ["ALL"], service
        assert "no-new-privileges:true" in host["SecurityOpt"], service
        assert host["RestartPolicy"]["Name"] == "unless-stopped", service


def test_locust_web_ui_needs_the_login_when_one_is_set(stack: ComposeProject) -> None:
    """ARENA_LOCUST_LOGIN (set for this stack): no page or API answer without it, HTTP Basic or
    the login form get in, /metrics stays open for Prometheus."""
    api = stack.url("locust", "/stats/requests")
    for login in (None, ("arena", "wrong"), ("wrong", stack.locust_login[1])):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(http_request(api, login=login), timeout=10)
        assert refused.value.code == 401, login
        assert refused.value.headers["WWW-Authenticate"].startswith("Basic"), login
    assert "stats" in http_json(api, login=stack.locust_login)
    # A browser opening the UI lands on Locust's login page.
    page = http_request(stack.url("locust", "/"), headers={"Accept": "text/html"})
    with urllib.request.urlopen(page, timeout=10) as response:
        assert response.url.endswith("/login"), response.url
    assert "locust_users" in http_text(stack.url("locust", "/metrics"))


def test_servers_answer_on_their_published_ports(stack: ComposeProject) -> None:
    """From the host, each server answers `/ping` with `PONG` on its 127.0.0.1 port; each
    replica of a scaled one on its own free port."""
    for service in SERVER_SERVICES:
        ports = stack.replica_ports(service) if service in SCALED else [stack.ports[service]]
        assert len(set(ports)) == SCALED.get(service, 1), (service, ports)
        for port in ports:
            assert ping(port) == b"PONG\n", (service, port)


def test_every_server_answers_db_through_postgres(stack: ComposeProject) -> None:
    """`/db 5 TEXT` from the host to each server (each replica of a scaled one): a query that
    waits 5 ms in PostgreSQL, then TEXT upper-cased. Only `ERR backend-unavailable` (a pool still
    connecting) is asked again, until a deadline."""
    for service in SERVER_SERVICES:
        ports = stack.replica_ports(service) if service in SCALED else [stack.ports[service]]
        for port in ports:

            def answered(port: int = port) -> bytes | None:
                answer = reply(port, DB_REQUEST)
                return None if answer.startswith(b"ERR backend-unavailable") else answer

            answer = poll(answered, DB_TIMEOUT, interval=1.0)
            assert answer == DB_REPLY, (
                f"{service} on {port} answered {answer!r}\n{stack.diagnostics()}"
            )


def test_postgres_lists_each_server_by_application_name(stack: ComposeProject) -> None:
    """pg_stat_activity (read in the container as the superuser, over the socket): every model's
    connections as `arena-MODEL`, logged in as role arena, at most ARENA_DB_POOL per replica; the
    exporter's as arena_monitor; no one else but this psql."""
    config = stack.config()["services"]
    rows = stack.psql(
        "SELECT application_name, usename, count(*) FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' GROUP BY 1, 2 ORDER BY 1, 2"
    )
    seen = {(application, user): int(count) for application, user, count in rows}
    print(f"pg_stat_activity: {seen}")
    for service in SERVER_SERVICES:
        pool = int(config[service]["environment"]["ARENA_DB_POOL"])
        count = seen.pop((f"arena-{service}", "arena"), 0)
        assert 1 <= count <= SCALED.get(service, 1) * pool, (service, count, rows)
    assert seen.pop(("arena-exporter", "arena_monitor"), 0) >= 1, rows
    assert set(seen) == {("psql", "postgres")}, rows


def test_prometheus_sees_postgres_through_the_exporter(stack: ComposeProject) -> None:
    """The exporter's job: pg_up is 1, and its per-application_name query counts every server
    model's connections."""

    def seen() -> dict[str, float] | None:
        up = stack.promql('pg_up{job="postgres"}')
        rows = stack.promql(
            'sum by (application_name) (pg_stat_activity_app_connections{job="postgres"})'
        )
        found = {row["metric"]["application_name"]: float(row["value"][1]) for row in rows}
        found["pg_up"] = float(up[0]["value"][1]) if up else 0.0
        ready = found["pg_up"] == 1 and all(
            found.get(f"arena-{service}", 0) >= 1 for service in SERVER_SERVICES
        )
        return found if ready else None

    found = poll(seen, SCRAPE_TIMEOUT, interval=2.0)
    assert isinstance(found, dict), f"exporter's view: {found!r}\n{stack.diagnostics()}"
    print(f"exporter: {found}")


def test_locust_loads_every_server_with_zero_failures(stack: ComposeProject) -> None:
    """Locust autostarts 100 users per server; all of them see requests and none fail."""
    seen: dict[str, dict[str, float]] = {}

    def loaded() -> dict | None:
        text = http_text(stack.url("locust", "/metrics"))
        users = {
            dict(labels).get("target", ""): value
            for labels, value in metric_samples(text, "locust_users").items()
        }
        requests: dict[str, float] = {}
        for labels, value in metric_samples(text, "locust_requests_total").items():
            target = dict(labels).get("target", "")
            requests[target] = requests.get(target, 0.0) + value
        seen.update(users=users, requests=requests)
        ready = all(
            users.get(s) == USERS_PER_SERVER and requests.get(s, 0) > 0 for s in SERVER_SERVICES
        )
        return {"users": users, "requests": requests, "text": text} if ready else None

    state = poll(loaded, TRAFFIC_TIMEOUT)
    assert isinstance(state, dict), (
        f"Locust did not run {USERS_PER_SERVER} users with requests against every server: "
        f"last seen {seen or state!r}\n{stack.diagnostics()}"
    )
    failures = metric_samples(state["text"], "locust_failures_total")
    connect_errors = metric_samples(state["text"], "locust_connect_errors_total")
    assert sum(failures.values()) == 0, failures
    assert sum(connect_errors.values()) == 0, connect_errors

    # Locust's own statistics (the web UI's table): one row per (target, command).
    report = http_json(stack.url("locust", "/stats/requests"), login=stack.locust_login)
    for service in SERVER_SERVICES:
        rows = [row for row in report["stats"] if row["method"] == service]
        assert sum(row["num_requests"] for row in rows) > 0, (service, report["stats"])
        assert sum(row["num_failures"] for row in rows) == 0, (service, rows, report["errors"])
    assert report["stats"][-1]["num_failures"] == 0, report["errors"]
    assert report["errors"] == []
    assert report["worker_count"] >= 1


def test_prometheus_scrapes_every_target(stack: ComposeProject) -> None:
    """Prometheus reports every server replica (found by DNS, labelled with its model and
    address), the Locust master and the PostgreSQL exporter as up."""
    expected = {**{service: 1 for service in SERVER_SERVICES}, **SCALED, "locust": 1, "postgres": 1}

    def all_up() -> dict[str, list[str]] | None:
        targets = http_json(stack.url("prometheus", "/api/v1/targets"))["data"]["activeTargets"]
        health: dict[str, list[str]] = {}
        for target in targets:
            labels = target["labels"]
            health.setdefault(labels["job"], []).append(
                f"{labels['instance']} {target['health']} {target['lastError']}".strip()
            )
            if labels["job"] in SERVER_SERVICES:
                assert labels["model"] == labels["job"], labels
                assert labels["replica"] == labels["instance"], labels
        up = all(
            len(health.get(job, [])) == count and all(h.endswith(" up") for h in health[job])
            for job, count in expected.items()
        )
        return health if up else None

    health = poll(all_up, SCRAPE_TIMEOUT)
    assert isinstance(health, dict), f"targets not all up: {health!r}\n{stack.diagnostics()}"
    assert set(health) == set(expected)


def replica_load(stack: ComposeProject, model: str) -> dict[str, tuple[float, float]]:
    """{replica: (open connections, requests/s)} of one model, from Prometheus."""
    selector = f'{{job="{model}"}}'
    connections = stack.promql(f"sum by (replica) (arena_connections_active{selector})")
    rates = stack.promql(f"sum by (replica) (rate(arena_requests_total{selector}[30s]))")
    rate_of = {row["metric"]["replica"]: float(row["value"][1]) for row in rates}
    return {
        row["metric"]["replica"]: (float(row["value"][1]), rate_of.get(row["metric"]["replica"], 0))
        for row in connections
    }


def test_every_replica_gets_connections_and_requests(stack: ComposeProject) -> None:
    """The scaled model's users spread over its replicas (Locust resolves the name at each
    connect): by the servers' own metrics in Prometheus, every replica holds connections and
    serves requests, and together they hold the target's 100 users."""
    for model, replicas in SCALED.items():

        def spread(model: str = model, replicas: int = replicas) -> dict | None:
            seen = replica_load(stack, model)
            ready = (
                len(seen) == replicas
                and all(connections > 0 and rate > 0 for connections, rate in seen.values())
                and sum(connections for connections, _ in seen.values()) == USERS_PER_SERVER
            )
            return seen if ready else None

        seen = poll(spread, SCRAPE_TIMEOUT, interval=5.0)
        assert isinstance(seen, dict), f"{model}: replicas not all loaded: {seen!r}"
        print(f"{model}: (connections, requests/s) per replica {seen}")


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    """Each dashboard: unique panel ids, panels inside 24 columns without overlapping, a query
    on every graph, and every datasource reference is the provisioned Prometheus uid."""
    uids = provisioned_datasource_uids()
    assert uids, "no datasource provisioned"
    paths = sorted(DASHBOARD_DIR.glob("*.json"))
    assert paths, "no dashboard provisioned"
    for path in paths:
        dashboard = json.loads(path.read_text())
        panels, pending = [], list(dashboard["panels"])
        while pending:
            panel = pending.pop()
            pending.extend(panel.get("panels", []))
            panels.append(panel)
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        cells: dict[tuple[int, int], str] = {}
        for panel in panels:
            title = panel.get("title", "")
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (path.name, title, grid)
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{path.name}: {title!r} overlaps {cells[x, y]!r}"
                    cells[x, y] = title
            if panel["type"] in ("timeseries", "stat"):
                assert panel.get("targets"), (path.name, title)
            for item in (panel, *panel.get("targets", [])):
                source = item.get("datasource")
                if source is not None:
                    assert source.get("uid") in uids, (path.name, title, source)


def test_every_dashboard_query_returns_data(stack: ComposeProject) -> None:
    """Each PromQL expr in docker/grafana/dashboards/*.json returns data from the live stack."""
    queries = dashboard_queries()
    assert queries, "the dashboard has no queries"

    def empty_queries() -> list[str]:
        return [
            f"{panel}: {expr}"
            for _, panel, expr in queries
            if not stack.promql(grafana_to_promql(expr))
        ]

    if poll(lambda: not empty_queries(), SCRAPE_TIMEOUT, interval=5.0) is not True:
        empty = empty_queries()
        assert not empty, "queries without data:\n" + "\n".join(empty)


def locust_failures_by_target(stack: ComposeProject) -> dict[str, float]:
    """Locust's failed requests (refused connects included) so far, per target."""
    text = http_text(stack.url("locust", "/metrics"))
    failures: dict[str, float] = {}
    for labels, value in metric_samples(text, "locust_failures_total").items():
        target = dict(labels).get("target", "")
        failures[target] = failures.get(target, 0.0) + value
    return failures


def test_a_crashed_server_is_restarted_and_its_users_reconnect(stack: ComposeProject) -> None:
    """SIGKILL of a server under load: Docker restarts it (`restart: unless-stopped`), Locust
    counts failures for that server only, and its 100 users reconnect by themselves."""
    victim = "threaded"
    before = locust_failures_by_target(stack)
    restarts_before = stack.container_state(victim)["RestartCount"]
    stack.crash(victim)

    def restarted_and_healthy() -> dict | None:
        state = stack.container_state(victim)
        back = (
            state["RestartCount"] > restarts_before
            and state["Running"]
            and state.get("Health", {}).get("Status") == "healthy"
        )
        return state if back else None

    state = poll(restarted_and_healthy, RESTART_TIMEOUT, interval=1.0)
    assert isinstance(state, dict), f"{victim} not restarted: {state!r}\n{stack.diagnostics()}"

    def users_reconnected() -> float | None:
        samples = metric_samples(stack.server_metrics(victim), "arena_connections_active")
        active = sum(samples.values())
        return active if active == USERS_PER_SERVER else None

    active = poll(users_reconnected, RESTART_TIMEOUT, interval=1.0)
    assert active == USERS_PER_SERVER, (
        f"{victim} holds {active!r} connections after its restart, not {USERS_PER_SERVER}\n"
        f"{stack.diagnostics()}"
    )

    # Failures stop growing once the users are back: two reads a few seconds apart agree.
    latest: list[dict[str, float]] = [locust_failures_by_target(stack)]

    def failures_settled() -> bool:
        time.sleep(QUIET_INTERVAL)
        latest.append(locust_failures_by_target(stack))
        return latest[-1] == latest[-2]

    settled = poll(failures_settled, 4 * QUIET_INTERVAL, interval=0.0)
    after = latest[-1]
    print(
        f"{victim}: restart {state['RestartCount']}, {active} connections back, "
        f"Locust failures {before} -> {after}"
    )
    assert settled is True, f"Locust's failures keep growing: {latest}"
    assert after.get(victim, 0) > before.get(victim, 0), (before, after)
    for service in SERVER_SERVICES:
        if service != victim:
            assert after.get(service, 0) == before.get(service, 0), (service, before, after)


def test_no_password_shows_in_a_log_or_a_container_configuration(stack: ComposeProject) -> None:
    """After everything above (first start, /db, the exporter, a crash and restart): none of the
    three passwords is in any container's log or in what `docker inspect` shows of it
    (environment, command, labels); they are only in the secret files."""
    passwords = [path.read_text().strip() for path in stack.secret_files.values()]
    assert len(passwords) == len(SECRET_FILE_VARIABLES)
    logs = stack.logs()
    assert "10-arena-roles.sh: roles arena" in logs  # the init script ran, and logged
    for password in passwords:
        assert password not in logs
    for service in stack.started:
        shown = json.dumps(stack.inspect(service))
        for password in passwords:
            assert password not in shown, service


def test_sigterm_stops_each_server_with_exit_code_0(stack: ComposeProject) -> None:
    """`docker compose stop` (SIGTERM, SIGKILL only after stop_grace_period) ends each server
    by itself, under load, with exit code 0; then PostgreSQL, with exit code 0 too."""
    stack.compose("stop", *SERVER_SERVICES, timeout=180)
    for service in SERVER_SERVICES:
        state = stack.container_state(service)
        assert state["Status"] == "exited", (service, state)
        assert state["OOMKilled"] is False, (service, state)
        assert state["ExitCode"] == 0, f"{service}: {state}\n{stack.diagnostics()}"
    # PostgreSQL too, once its clients are gone: its stop signal (SIGINT, a fast shutdown)
    # reaches it through the init process.
    stack.compose("stop", "postgres", timeout=120)
    state = stack.container_state("postgres")
    assert (state["Status"], state["ExitCode"]) == ("exited", 0), state


def test_down_leaves_nothing_behind(stack: ComposeProject) -> None:
    """`docker compose down -v` removes every container, network and named volume."""
    result = stack.down()
    assert result.returncode == 0, result.stderr
    assert stack.leftovers() == {"containers": [], "volumes": [], "networks": []}

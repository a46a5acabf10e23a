"""The Locust side of `/db` (issue 19): its knobs and scenarios, and real runs against servers
started without a database, whose every `/db` must be a failure named by the server's reply line
on a connection that stays open.

The servers here have no database on purpose: they answer `/db` with `ERR backend-unavailable`
whatever machine the tests run on, so the assertions hold with or without PostgreSQL installed.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

import pytest
from locust.event import EventHook

from loadtest.lessons import catalog
from loadtest.plugin import scenarios
from loadtest.plugin.client import LineClient, is_backend_error
from loadtest.plugin.webui import scenario_rows
from loadtest.plugin.workload import COMMANDS, KNOBS_BY_DEST, SCENARIOS, Workload
from services import models
from services.config import Settings
from tests.conftest import RunningServer, launch_server, stop_server
from tests.loadtest_helpers import TARGETS, Metrics, csv_totals, locust_env, run_to_end

# An empty URL is "no database", also when the environment running the tests names one.
NO_DATABASE = {"ARENA_DB_URL": ""}
UNAVAILABLE = "ERR backend-unavailable"
USERS_PER_TARGET = 5
DB_SCENARIOS = ("db-wait", "db-pool-bound", "undetected-io")


# --- knobs and scenarios ----------------------------------------------------------------------


def test_db_knobs_are_read_from_flags_env_and_form_like_the_other_workload_knobs():
    for dest, flag, env in (
        ("db_share", "--db-share", "LOCUST_DB_SHARE"),
        ("db_ms", "--db-ms", "LOCUST_DB_MS"),
    ):
        knob = KNOBS_BY_DEST[dest]
        assert (knob.flag, knob.env_var, knob.default) == (flag, env, "")
        assert knob.from_scenario  # blank = the scenario's value
    given = Workload.from_options({"db_share": " 0.3 ", "db_ms": "007"})
    assert (given.db_share, given.db_ms) == (0.3, 7)
    assert given.given == {"db_share", "db_ms"}
    assert "db" in COMMANDS  # a row of its own in /metrics and the latency table


def test_a_db_request_is_built_and_checked_like_a_sleep():
    workload = Workload.from_options({"db_ms": "7", "sleep_ms": "7", "timeout_s": "2"})
    assert workload.build_request("db", b"ab-1") == (b"/db 7 ab-1\n", b"AB-1")
    # No text: the same (empty) reply /sleep gives.
    assert workload.build_request("db", b"") == (b"/db 7\n", b"")
    assert workload.build_request("db", b"")[1] == workload.build_request("sleep", b"")[1]
    assert workload.reply_timeout("db") == workload.reply_timeout("sleep") == 2.007


def test_the_db_share_takes_its_place_in_the_mix():
    workload = Workload.from_options(
        {"ping_share": "0.2", "sleep_share": "0.2", "work_share": "0.2", "db_share": "0.2"}
    )
    picked = [workload.pick_command(draw) for draw in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert picked == ["ping", "sleep", "work", "db", "echo"]
    only_db = Workload.from_options(
        {"ping_share": "0", "sleep_share": "0", "work_share": "0", "db_share": "1"}
    )
    assert {only_db.pick_command(draw / 100) for draw in range(100)} == {"db"}


def test_db_scenarios_preset_what_they_claim():
    wait = Workload.from_options({"scenario": "db-wait"})
    assert (wait.db_share, wait.db_ms, wait.think_ms) == (1, 20, 0)
    assert (wait.ping_share, wait.sleep_share, wait.work_share) == (0, 0, 0)
    # No more concurrent queries than the servers' default pool has connections.
    assert wait.users_per_target == scenarios.DB_POOL_CONNECTIONS

    bound = Workload.from_options({"scenario": "db-pool-bound"})
    assert (bound.db_share, bound.db_ms, bound.think_ms) == (1, 50, 0)
    assert (bound.ping_share, bound.sleep_share, bound.work_share) == (0, 0, 0)
    assert bound.users_per_target > scenarios.DB_POOL_CONNECTIONS
    lesson = scenarios.get("db-pool-bound")
    assert f"pool of {scenarios.DB_POOL_CONNECTIONS} by default" in lesson.claim

    undetected = Workload.from_options({"scenario": "undetected-io"})
    assert (undetected.db_share, undetected.db_ms) == (0.02, 20)
    assert (undetected.ping_share, undetected.sleep_share, undetected.work_share) == (0, 0, 0)
    lesson = scenarios.get("undetected-io")
    command = "ARENA_DB_DRIVER=blocking LOCUST_SCENARIO=undetected-io docker compose up -d"
    assert command in lesson.watch
    assert "CPU stays low" in lesson.expect and "blocked-loop" in lesson.expect


def test_the_scenarios_text_names_the_servers_own_database_pool():
    assert Settings().db_pool == scenarios.DB_POOL_CONNECTIONS


def test_every_scenario_offered_includes_the_database_ones_and_only_they_send_db():
    assert (*(lesson.id for lesson in catalog.LESSONS), *DB_SCENARIOS) == SCENARIOS
    for scenario in SCENARIOS:
        workload = Workload.from_options({"scenario": scenario})
        assert (workload.db_share > 0) == (scenario in DB_SCENARIOS), scenario


def test_a_given_db_knob_wins_over_the_scenario_and_the_scenario_tab_says_where_each_came_from():
    workload = Workload.from_options({"scenario": "db-wait", "db_ms": "5"})
    assert (workload.db_ms, workload.db_share) == (5, 1)
    rows = {row["item"]: row["value"] for row in scenario_rows(workload)}
    assert rows["--db-ms"] == "5 (given)"
    assert rows["--db-share"] == "1 (scenario db-wait)"
    assert rows["Claim"] == scenarios.get("db-wait").claim


def test_the_scenario_tab_shows_what_make_lessons_found_and_an_inconclusive_is_no_failure(
    tmp_path,
):
    results = tmp_path / "lessons.json"
    results.write_text(
        '{"when": "2026-12-07 23:00 UTC", "lessons": ['
        '{"id": "io-wait", "verdict": "holds", "reason": "threaded 80% of the ideal"},'
        '{"id": "cores", "verdict": "inconclusive", "reason": "1.10 free cores"}]}'
    )
    assert scenarios.checked("io-wait", results) == (
        "holds (2026-12-07 23:00 UTC): threaded 80% of the ideal"
    )
    assert scenarios.checked("cores", results).startswith(
        "inconclusive (the machine could not show it; not a failure)"
    )
    assert scenarios.checked("steady", results) is None  # a preset without a check
    assert scenarios.checked("io-wait", tmp_path / "missing.json") is None
    # The tab itself reads the committed results (the Locust image copies them in).
    committed = scenarios.checked("io-wait")
    rows = {row["item"]: row["value"] for row in scenario_rows(Workload.from_options({}))}
    assert "Checked by make lessons" not in rows  # steady: nothing checked
    rows = {
        row["item"]: row["value"]
        for row in scenario_rows(Workload.from_options({"scenario": "io-wait"}))
    }
    assert committed and rows["Checked by make lessons"] == committed


# --- real servers without a database ----------------------------------------------------------


@pytest.fixture(scope="module")
def servers_without_a_database() -> Iterator[dict[str, RunningServer]]:
    """Every model (the pool with 2 workers), started with no database configured."""
    started: dict[str, RunningServer] = {}
    try:
        for target in TARGETS:
            flags = models.get(target).small_flags
            started[target] = launch_server(target, *flags, env=NO_DATABASE)
        yield started
    finally:
        for server in started.values():
            stop_server(server)


class RecordedEvents:
    """A real Locust EventHook with a listener that keeps every request event."""

    def __init__(self) -> None:
        self.hook = EventHook()
        self.events: list[dict[str, Any]] = []
        self.hook.add_listener(lambda **event: self.events.append(event))


@pytest.mark.parametrize("target", TARGETS)
def test_a_db_error_reply_is_a_failure_named_by_it_and_the_connection_is_kept(
    servers_without_a_database, target
):
    server = servers_without_a_database[target]
    recorded = RecordedEvents()
    client = LineClient(target, server.address, recorded.hook, connect_timeout=10)
    assert not client.request("db", b"/db 5 ab\n", b"AB", timeout=10)
    assert client.connected  # the server keeps it open: no reconnect for a database error
    assert client.request("echo", b"ab\n", b"AB", timeout=10)
    client.close()
    assert [event["name"] for event in recorded.events] == ["connect", "db", "echo"]
    error = recorded.events[1]["exception"]
    # Locust names a failure by the exception's repr: the server's line itself.
    assert repr(error).startswith(f"{UNAVAILABLE} "), repr(error)
    assert recorded.events[2]["exception"] is None


@pytest.mark.locust
@pytest.mark.slow
def test_locust_counts_every_db_request_to_a_server_without_a_database_as_a_failure(
    servers_without_a_database, tmp_path
):
    servers = servers_without_a_database
    before = {target: Metrics.parse(server.metrics_text()) for target, server in servers.items()}
    shares = ["--ping-share", "0", "--sleep-share", "0", "--work-share", "0", "--db-share", "1"]
    args = ["--headless", "-t", "5s", "--users-per-target", str(USERS_PER_TARGET), *shares]
    run_to_end(
        tmp_path,
        "db",
        [*args, "--csv", str(tmp_path / "db")],
        locust_env({target: server.address for target, server in servers.items()}),
        expect=1,  # requests failed
    )

    totals = csv_totals(tmp_path / "db_stats.csv")
    assert set(totals) == {(target, command) for target in TARGETS for command in ("db", "connect")}
    for target in TARGETS:
        requests, failures = totals[(target, "db")]
        assert requests > 0 and failures == requests, (target, totals)
        # One connect per user: a database error never made a user reconnect.
        assert totals[(target, "connect")] == (USERS_PER_TARGET, 0), (target, totals)

    with open(tmp_path / "db_failures.csv", newline="") as handle:
        failed = list(csv.DictReader(handle))
    assert {(row["Method"], row["Name"]) for row in failed} == {(t, "db") for t in TARGETS}
    assert all(row["Error"].startswith(f"{UNAVAILABLE} ") for row in failed), failed
    for target in TARGETS:
        occurrences = sum(int(row["Occurrences"]) for row in failed if row["Method"] == target)
        assert occurrences == totals[(target, "db")][1]

    with open(tmp_path / "db_latency.csv", newline="") as handle:
        latency = {(r["target"], r["command"]): r for r in csv.DictReader(handle)}
    for target in TARGETS:
        row = latency[(target, "db")]
        assert int(row["requests"]) == int(row["failures"]) == totals[(target, "db")][0]

    # The servers counted them as `db` errors too (a user stopped while waiting for a reply
    # was answered but never counted by Locust).
    for target, server in servers.items():
        after = Metrics.parse(server.metrics_text())
        answered = sum(
            metrics.value("arena_requests_total", command="db", outcome="error") * sign
            for metrics, sign in ((after, 1), (before[target], -1))
        )
        sent = totals[(target, "db")][0]
        assert sent <= answered <= sent + USERS_PER_TARGET, (target, sent, answered)


@pytest.mark.locust
@pytest.mark.slow
def test_locust_db_wait_against_servers_with_a_database_succeeds(postgres, tmp_path):
    """The db-wait scenario against every model with a real PostgreSQL (the `postgres` fixture):
    each /db reply is validated like /sleep's, and every one succeeds."""
    started: dict[str, RunningServer] = {}
    try:
        for target in TARGETS:
            flags = models.get(target).small_flags
            started[target] = launch_server(target, *flags, env=postgres.env())
        # Few users: the pool model's process workers each open their own connections, and
        # PostgreSQL allows 100 in all.
        args = ["--headless", "-t", "4s", "--users-per-target", "3", "--csv", str(tmp_path / "ok")]
        run = run_to_end(
            tmp_path,
            "ok",
            args,
            locust_env(
                {target: server.address for target, server in started.items()},
                LOCUST_SCENARIO="db-wait",
            ),
        )
        assert "--db-share 1 (scenario db-wait)" in run.stderr
        totals = csv_totals(tmp_path / "ok_stats.csv")
        assert set(totals) == {(t, c) for t in TARGETS for c in ("db", "connect")}, totals
        for target, server in started.items():
            requests, failures = totals[(target, "db")]
            assert requests > 0 and failures == 0, (target, totals)
            answered = Metrics.parse(server.metrics_text()).value(
                "arena_requests_total", command="db", outcome="ok"
            )
            assert requests <= answered <= requests + 3, (target, requests, answered)
    finally:
        for server in started.values():
            stop_server(server)


@pytest.mark.parametrize(
    ("reply", "backend"),
    [
        (b"ERR backend-unavailable the database cannot be reached; retry later", True),
        (b"ERR backend-busy no database connection was free in time; retry", True),
        (b"ERR backend-error the database refused the query", True),
        (b"ERR backend-busy", True),
        (b"ERR backend-busyness x", False),
        (b"ERR server-busy the server already holds its limit of 5 connections", False),
        (b"ERR unknown-command try /ping", False),
        (b"XERR backend-busy x", False),
        (b"BACKEND-BUSY", False),
    ],
)
def test_only_the_databases_error_replies_keep_the_connection(reply, backend):
    assert is_backend_error(reply) is backend

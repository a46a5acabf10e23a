"""The Locust load test against the real servers: real Locust subprocesses, real scrapes, real CSVs.

The fast tests at the top check the pieces (knobs, the line client, the metrics text); the
`locust`-marked ones run `locust -f loadtest/plugin/locustfile.py` with 100 users per target.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from locust.event import EventHook

from loadtest.plugin import locustfile, scenarios
from loadtest.plugin.client import LineClient, resolve
from loadtest.plugin.client_metrics import render_metrics
from loadtest.plugin.client_stats import ClientStats, fine_key, latency_rows
from loadtest.plugin.users import scenario_user_count
from loadtest.plugin.workload import KNOBS, KNOBS_BY_DEST, WORKLOAD_KNOBS, KnobError, Workload
from services import models
from tests.conftest import RunningServer, launch_server, stop_server
from tests.loadtest_helpers import (
    COMMANDS,
    TARGETS,
    LocustProcess,
    Metrics,
    csv_totals,
    free_port,
    locust_env,
    nonzero,
    poll,
    run_to_end,
    server_counts,
    start_distributed,
    start_locust,
    stats_totals,
)

USERS_PER_TARGET = 100
PROTOCOL_COMMANDS = ("echo", "ping", "sleep", "work")


# --- the pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "flag", "hint"),
    [
        ({"sleep_share": "2"}, "--sleep-share", "from 0 to 1"),
        ({"payload_bytes": "abc"}, "--payload-bytes", "'abc'"),
        ({"payload_bytes": "70000"}, "--payload-bytes", "65000"),
        ({"think_ms": "-1"}, "--think-ms", "from 0"),
        ({"work_rounds": "1.5"}, "--work-rounds", "whole number"),
        ({"threaded_target": "http://127.0.0.1:9001"}, "--threaded-target", "tcp://"),
        ({"pool_target": "tcp://127.0.0.1"}, "--pool-target", "tcp://"),
        ({"targets": "threaded,nginx"}, "--targets", "nginx"),
        ({"targets": "pool,pool"}, "--targets", "twice"),
        ({"targets": ""}, "--targets", "at least one"),
        ({"arrival_rate": "-1"}, "--arrival-rate", "from 0"),
        ({"arrival_rate": "fast"}, "--arrival-rate", "'fast'"),
        ({"arrival_rate": "1e9"}, "--arrival-rate", "100000"),
        ({"arrival": "burst"}, "--arrival", "poisson, uniform"),
        ({"db_share": "1.5"}, "--db-share", "from 0 to 1"),
        ({"db_share": "-0.1"}, "--db-share", "from 0 to 1"),
        ({"db_ms": "60001"}, "--db-ms", "from 0 to 60000"),
        ({"db_ms": "2.5"}, "--db-ms", "whole number"),
        ({"db_ms": "soon"}, "--db-ms", "'soon'"),
        (
            {"ping_share": "0.5", "sleep_share": "0.4", "work_share": "0.2"},
            "--work-share",
            "exceed 1",
        ),
        ({"sleep_share": "0.6", "db_share": "0.5"}, "--db-share", "exceed 1"),
    ],
)
def test_bad_knob_values_are_refused_with_the_knob_named(values, flag, hint):
    with pytest.raises(KnobError) as refused:
        Workload.from_options(values)
    assert flag in str(refused.value)
    assert hint in str(refused.value)


def test_requests_carry_the_knobs_and_expect_the_protocols_reply():
    workload = Workload.from_options({"sleep_ms": "7", "work_rounds": "300"})
    assert workload.build_request("echo", b"ab-1") == (b"ab-1\n", b"AB-1")
    assert workload.build_request("echo", b"") == (b"\n", b"")
    assert workload.build_request("ping", b"ignored") == (b"/ping\n", b"PONG")
    assert workload.build_request("sleep", b"xy") == (b"/sleep 7 xy\n", b"XY")
    assert workload.build_request("work", b"") == (b"/work 300\n", b"")
    assert workload.addresses["gevent"] == ("127.0.0.1", 9003)
    shares = Workload.from_options(
        {"ping_share": "0.25", "sleep_share": "0.25", "work_share": "0.25"}
    )
    picked = [shares.pick_command(draw) for draw in (0.1, 0.3, 0.6, 0.9)]
    assert picked == ["ping", "sleep", "work", "echo"]


def test_a_scenario_fills_the_knobs_left_blank_and_a_given_knob_wins():
    io_wait = Workload.from_options({"scenario": "io-wait"})
    assert (io_wait.sleep_share, io_wait.ping_share, io_wait.work_share) == (1, 0, 0)
    assert io_wait.think_ms == 0 and io_wait.given == frozenset()
    kept = Workload.from_options({"scenario": "io-wait", "sleep_ms": " 5 ", "think_ms": ""})
    assert (kept.sleep_ms, kept.think_ms, kept.sleep_share) == (5, 0, 1)
    assert kept.given == {"sleep_ms"}
    sources = {knob.dest: source for knob, _, source in kept.knob_values()}
    assert sources["sleep_ms"] == "given" and sources["think_ms"] == "scenario io-wait"
    # No scenario named: the default lesson, which is the old default workload.
    assert Workload.from_options({}) == Workload.from_options({"scenario": "steady"})
    steady = Workload.from_options({})
    assert (steady.think_ms, steady.sleep_ms, steady.users_per_target) == (100, 5, 100)


def test_an_unknown_scenario_is_refused_with_the_choices():
    with pytest.raises(KnobError) as refused:
        Workload.from_options({"scenario": "nap"})
    assert "--scenario" in str(refused.value) and "io-wait" in str(refused.value)


@pytest.mark.parametrize("lesson", scenarios.LESSONS, ids=lambda lesson: lesson.id)
def test_every_lesson_presets_valid_workload_knobs(lesson):
    assert set(lesson.knobs) <= {knob.dest for knob in WORKLOAD_KNOBS}
    workload = Workload.from_options({"scenario": lesson.id})
    for dest, value in lesson.knobs.items():
        assert getattr(workload, dest) == KNOBS_BY_DEST[dest].parse(value), dest
    assert lesson.claim and lesson.watch and lesson.expect


def test_docs_lessons_has_every_lessons_claim_watch_and_expect():
    docs = " ".join((Path(__file__).parent.parent / "docs" / "LESSONS.md").read_text().split())
    for lesson in scenarios.LESSONS:
        assert f"## `{lesson.id}`" in docs
        for text in (lesson.claim, lesson.watch, lesson.expect):
            assert " ".join(text.split()) in docs, (lesson.id, text)


def test_the_scenario_sets_the_number_of_users_unless_users_per_target_is_given():
    many = Workload.from_options({"scenario": "many-clients"})
    assert scenario_user_count(many, 300) == 1000 * len(many.targets)
    capped = Workload.from_options({"scenario": "many-clients", "users_per_target": "10"})
    assert scenario_user_count(capped, 300) == 300  # -u is a cap again
    one = Workload.from_options({"targets": models.NAMES[0]})
    assert scenario_user_count(one, 300) == 300  # never lowered


def test_the_knobs_are_ordered_scenario_workload_targets():
    kinds = [
        "scenario"
        if knob.dest == "scenario"
        else "workload"
        if knob.from_scenario or knob.dest in ("timeout_s", "arrival")
        else "targets"
        for knob in KNOBS
    ]
    assert kinds == sorted(kinds, key=["scenario", "workload", "targets"].index)


def test_one_user_class_per_model_with_its_address_as_host():
    for model in models.MODELS:
        [cls] = [
            value
            for value in vars(locustfile).values()
            if getattr(value, "target", None) == model.name
        ]
        assert cls.__name__.lower() == model.name.replace("-", "") + "user"
        assert cls.host == f"tcp://127.0.0.1:{model.port}"
        assert not cls.abstract


class RecordedEvents:
    """A real Locust EventHook with a listener that keeps every request event."""

    def __init__(self) -> None:
        self.hook = EventHook()
        self.events: list[dict[str, Any]] = []
        self.hook.add_listener(lambda **event: self.events.append(event))

    def outcomes(self) -> list[tuple[str, str | None]]:
        """(name, exception text or None) per event, in order."""
        return [
            (e["name"], None if e["exception"] is None else str(e["exception"]))
            for e in self.events
        ]


@pytest.fixture
def threaded_server() -> Iterator[RunningServer]:
    """A real threaded server on a free port."""
    server = launch_server("threaded")
    yield server
    stop_server(server)


def test_client_checks_each_reply_and_reconnects_after_a_wrong_one(threaded_server):
    recorded = RecordedEvents()
    client = LineClient("threaded", threaded_server.address, recorded.hook, connect_timeout=10)
    assert client.request("echo", b"abc\n", b"ABC", timeout=10)
    # The server upper-cases; expecting the text unchanged must fail and show both texts.
    assert not client.request("echo", b"abc\n", b"abc", timeout=10)
    assert not client.connected
    assert client.request("ping", b"/ping\n", b"PONG", timeout=10)
    outcomes = recorded.outcomes()
    assert [name for name, _ in outcomes] == ["connect", "echo", "echo", "connect", "ping"]
    assert outcomes[2][1] == "wrong reply to echo: expected b'abc' got b'ABC'"
    assert all(error is None for i, (_, error) in enumerate(outcomes) if i != 2)
    assert {e["request_type"] for e in recorded.events} == {"threaded"}
    assert all(e["response_time"] > 0 for e in recorded.events)
    client.close()


def test_client_times_out_closes_and_reconnects(threaded_server):
    recorded = RecordedEvents()
    client = LineClient("threaded", threaded_server.address, recorded.hook, connect_timeout=10)
    assert not client.request("sleep", b"/sleep 3000 x\n", b"X", timeout=0.3)
    assert not client.connected  # the late reply must never be read as the next one's
    assert client.request("echo", b"late\n", b"LATE", timeout=10)
    names = [name for name, _ in recorded.outcomes()]
    assert names == ["connect", "sleep", "connect", "echo"]
    assert "timed out" in recorded.outcomes()[1][1]
    client.close()


def test_client_counts_a_refused_connect_and_sends_nothing():
    recorded = RecordedEvents()
    client = LineClient("pool", ("127.0.0.1", free_port()), recorded.hook, connect_timeout=5)
    assert not client.request("echo", b"a\n", b"A", timeout=5)
    assert not client.request("echo", b"a\n", b"A", timeout=5)
    assert [name for name, _ in recorded.outcomes()] == ["connect", "connect"]
    assert all("refused" in error for _, error in recorded.outcomes())
    assert client.consecutive_connect_failures == 2


def test_clients_of_one_name_take_its_replicas_in_turn_at_each_connect():
    """A name behind which two real servers answer (two replicas; the resolver stands in for
    Docker's DNS): the clients' connects alternate between them and every request is answered."""
    replicas = [launch_server("threaded"), launch_server("threaded")]
    try:
        addresses = sorted(server.address for server in replicas)
        name = ("replicas.invalid", free_port())  # never resolved for real: the resolver answers
        # DNS servers shuffle the records: the turn must not depend on their order.
        answers = iter([addresses, addresses[::-1]] * 4)
        recorded = RecordedEvents()
        clients = [
            LineClient("threaded", name, recorded.hook, resolver=lambda *_: next(answers))
            for _ in range(4)
        ]
        for client in clients:
            assert client.request("echo", b"abc\n", b"ABC", timeout=10)
        peers = [client.peer for client in clients]
        assert peers[0] != peers[1] and peers[0::2] == [peers[0]] * 2, peers
        assert set(peers) == set(addresses)
        for client in clients:
            client.close()
    finally:
        for server in replicas:
            stop_server(server)


def test_an_address_that_refuses_is_passed_over_for_the_next(threaded_server):
    """A name whose other address refuses (a replica gone, or `localhost` naming ::1 where only
    127.0.0.1 listens): every connect still reaches the one that answers, and nothing fails."""
    dead = ("127.0.0.1", free_port())
    recorded = RecordedEvents()
    clients = [
        LineClient(
            "threaded",
            ("mixed.invalid", 9),
            recorded.hook,
            resolver=lambda *_: [dead, threaded_server.address],
        )
        for _ in range(3)
    ]
    for client in clients:
        assert client.request("echo", b"abc\n", b"ABC", timeout=10)
        assert client.peer == threaded_server.address
        client.close()
    assert all(error is None for _, error in recorded.outcomes())


def test_the_default_resolver_returns_the_addresses_of_a_name():
    assert resolve("127.0.0.1", 9) == [("127.0.0.1", 9)]
    assert ("127.0.0.1", 9) in resolve("localhost", 9)
    with pytest.raises(OSError):
        resolve("no-such-host.invalid", 9)


def test_fine_histogram_keeps_three_significant_digits():
    assert [fine_key(us) for us in (0, 7, 999, 1000, 1234, 98765, 1234567)] == [
        0,
        7,
        999,
        1000,
        1230,
        98700,
        1230000,
    ]
    stats = ClientStats()
    for microseconds in range(1, 1001):
        stats.record("gevent", "echo", microseconds / 1e6, failed=False)
    stats.record("gevent", "echo", 0.5, failed=True)
    [row] = latency_rows(stats)
    assert (row["requests"], row["failures"]) == (1001, 1)
    assert (row["p50_us"], row["p99_us"], row["p999_us"], row["max_us"]) == (500, 990, 999, 1000)


def test_metrics_text_is_valid_prometheus_and_merges_worker_reports():
    busy, idle = models.NAMES[:2]  # two targets: one with users and traffic, one without
    worker_a, worker_b, master = ClientStats(), ClientStats(), ClientStats()
    worker_a.record(busy, "echo", 0.00003, failed=False)
    worker_a.record(busy, "connect", 0.001, failed=True)
    worker_b.record(busy, "echo", 0.002, failed=False)
    for worker in (worker_a, worker_b):
        master.merge_message(worker.drain())
    assert not worker_a.series  # a worker ships only what is new
    text = render_metrics(master, {busy: 2}, [busy, idle]).decode()
    metrics = Metrics.parse(text)
    assert metrics.value("locust_users", target=busy) == 2
    assert metrics.value("locust_users", target=idle) == 0
    assert metrics.value("locust_requests_total", target=busy, command="echo") == 2
    assert metrics.value("locust_failures_total", target=idle, command="sleep") == 0
    assert metrics.value("locust_connect_errors_total", target=busy) == 1
    bucket = "locust_request_duration_seconds_bucket"
    assert metrics.value(bucket, target=busy, command="echo", le="5e-05") == 1
    assert metrics.value(bucket, target=busy, command="echo", le="0.0025") == 2
    assert metrics.value(bucket, target=busy, command="connect", le="+Inf") == 0
    promtool = shutil.which("promtool")
    if promtool:
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


# --- real Locust runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, RunningServer]]:
    """The three real servers (pool with 2 workers, as on a 2-core machine)."""
    started: dict[str, RunningServer] = {}
    try:
        for target in TARGETS:
            started[target] = launch_server(target, *models.get(target).small_flags)
        yield started
    finally:
        for server in started.values():
            stop_server(server)


def addresses(servers: dict[str, RunningServer]) -> dict[str, tuple[str, int]]:
    """Target name -> (host, port) for locust_env."""
    return {target: server.address for target, server in servers.items()}


def wait_every_user(run: LocustProcess, what: str, timeout: float) -> None:
    """Wait for the web UI, then for USERS_PER_TARGET users on every target."""
    poll("the web UI", run.web_ready, timeout=60)
    poll(
        what,
        lambda: run.metrics().users() == dict.fromkeys(TARGETS, USERS_PER_TARGET),
        timeout=timeout,
    )


def successes(metrics: Metrics, target: str) -> int:
    """Successful protocol requests (connects excluded) to a target."""
    totals = metrics.totals()
    return sum(totals[(target, c)][0] - totals[(target, c)][1] for c in PROTOCOL_COMMANDS)


def check_servers_saw_the_same_traffic(before, after, totals) -> None:
    """Each server accepted one connection per user and answered every successful request."""
    for target in TARGETS:
        connects = totals[(target, "connect")][0]
        assert after[target]["connections"] - before[target]["connections"] == connects
        ok = sum(totals[(target, c)][0] for c in PROTOCOL_COMMANDS)
        answered = sum(after[target][c] - before[target][c] for c in PROTOCOL_COMMANDS)
        # A user stopped while waiting for a reply: the server answered, the client never counted.
        assert ok <= answered <= ok + USERS_PER_TARGET, (target, ok, answered)


def counts_by_target(servers) -> dict[str, Any]:
    """Each server's own request counters, by target name."""
    return {target: server_counts(server) for target, server in servers.items()}


def run_headless_to_success(tmp_path, name: str, args: list[str], servers) -> tuple[Any, dict]:
    """Run Locust to its end against the servers; it must exit 0 and report every row."""
    run = run_to_end(tmp_path, name, args, locust_env(addresses(servers)))
    totals = csv_totals(tmp_path / f"{Path(args[args.index('--csv') + 1]).name}_stats.csv")
    assert set(totals) == {(target, command) for target in TARGETS for command in COMMANDS}
    return run, totals


@pytest.mark.locust
@pytest.mark.slow
def test_headless_run_loads_all_targets_with_100_users_each_and_no_failures(servers, tmp_path):
    before = counts_by_target(servers)
    # No -u: plugin/locust.conf must give 100 users per target on its own (cwd is tmp_path).
    run, totals = run_headless_to_success(
        tmp_path, "headless", ["--headless", "-t", "12s", "--csv", str(tmp_path / "run")], servers
    )
    assert all(requests > 0 and failures == 0 for requests, failures in totals.values()), totals
    # Every user connected exactly once: 100 per target, none reconnected.
    assert all(totals[(target, "connect")][0] == USERS_PER_TARGET for target in TARGETS)
    with open(tmp_path / "run_stats_history.csv", newline="") as handle:
        peak_users = max(int(row["User Count"]) for row in csv.DictReader(handle))
    assert peak_users == USERS_PER_TARGET * len(TARGETS)
    # The microsecond table: printed at the end and written next to the CSVs, same counts.
    assert "Client-side latency" in run.stdout
    with open(tmp_path / "run_latency.csv", newline="") as handle:
        latency = {(row["target"], row["command"]): row for row in csv.DictReader(handle)}
    counts = {key: (int(row["requests"]), int(row["failures"])) for key, row in latency.items()}
    assert counts == totals
    for row in latency.values():
        percentiles = [int(row[name]) for name in ("p50_us", "p99_us", "p999_us", "max_us")]
        assert percentiles[0] > 0 and percentiles == sorted(percentiles)
    after = counts_by_target(servers)
    check_servers_saw_the_same_traffic(before, after, totals)


@pytest.mark.locust
@pytest.mark.slow
def test_scenario_from_the_environment_sets_the_mix_and_a_given_knob_keeps_its_value(
    servers, tmp_path
):
    prefix = tmp_path / "io"
    run = run_to_end(
        tmp_path,
        "io",
        ["--headless", "-t", "6s", "--sleep-ms", "5", "--csv", str(prefix)],
        locust_env(addresses(servers), LOCUST_SCENARIO="io-wait"),
    )
    totals = csv_totals(tmp_path / "io_stats.csv")
    # io-wait: only /sleep requests (plus each user's connect), to every target.
    assert {command for _, command in totals} == {"sleep", "connect"}, totals
    assert all(totals[(target, "sleep")][0] > 0 for target in TARGETS)
    assert "--sleep-ms 5 (given)" in run.stderr
    assert "--sleep-share 1 (scenario io-wait)" in run.stderr
    assert "--think-ms 0 (scenario io-wait)" in run.stderr


@pytest.mark.locust
@pytest.mark.slow
def test_killed_server_shows_failures_and_users_recover_when_it_returns(tmp_path):
    port = free_port()
    # threaded is killed and restarted on the same port; the others keep serving.
    started = {
        model: launch_server(model, *models.get(model).small_flags)
        for model in models.NAMES
        if model != "threaded"
    }
    started["threaded"] = launch_server("threaded", "--port", str(port))
    prefix = tmp_path / "kill"
    run = start_locust(
        tmp_path,
        "kill",
        ["--autostart", "-t", "300s", "--csv", str(prefix)],
        locust_env(addresses(started)),
        web_port=free_port(),
    )
    try:
        wait_every_user(run, "100 users per target", timeout=60)
        poll("threaded answering", lambda: successes(run.metrics(), "threaded") > 0, timeout=30)

        os.killpg(started["threaded"].proc.pid, signal.SIGKILL)
        started["threaded"].proc.wait(timeout=30)

        def failures_seen() -> bool:
            metrics = run.metrics()
            totals = metrics.totals()
            broken = sum(totals[("threaded", c)][1] for c in PROTOCOL_COMMANDS)
            refused = metrics.value("locust_connect_errors_total", target="threaded")
            return broken > 0 and refused > 0

        poll("failed requests and refused connects", failures_seen, timeout=60)
        started["threaded"] = launch_server("threaded", "--port", str(port))
        answered_before_return = successes(run.metrics(), "threaded")
        poll(
            "all 100 users connected to the restarted server",
            lambda: (
                Metrics.parse(started["threaded"].metrics_text()).value("arena_connections_active")
                == USERS_PER_TARGET
            ),
            timeout=60,
        )
        poll(
            "requests succeeding again",
            lambda: successes(run.metrics(), "threaded") > answered_before_return + 100,
            timeout=60,
        )

        assert run.post("/stop")["success"]
        poll("the test to stop", lambda: run.stats()["state"] == "stopped", timeout=60)
        final = run.metrics()
        assert nonzero(final.totals()) == stats_totals(run.stats())
        code = run.terminate()
    finally:
        run.kill()
        for server in started.values():
            stop_server(server)

    assert code == 1, run.stderr[-3000:]  # failures happened, so Locust exits non-zero
    totals = csv_totals(tmp_path / "kill_stats.csv")
    assert nonzero(final.totals()) == totals
    for (target, command), (requests, failures) in totals.items():
        timed = final.value("locust_request_duration_seconds_count", target=target, command=command)
        assert timed == requests - failures
        if target != "threaded":
            assert failures == 0, (target, command)
    with open(tmp_path / "kill_failures.csv", newline="") as handle:
        failed = {(row["Method"], row["Name"]) for row in csv.DictReader(handle)}
    assert ("threaded", "connect") in failed
    assert {target for target, _ in failed} == {"threaded"}


@pytest.mark.locust
@pytest.mark.slow
def test_distributed_master_aggregates_two_workers_and_passes_knob_changes_on(servers, tmp_path):
    before = counts_by_target(servers)
    master, workers = start_distributed(
        tmp_path,
        ["--autostart", "-t", "300s", "--csv", str(tmp_path / "dist")],
        locust_env(addresses(servers)),
    )
    try:
        wait_every_user(master, "100 users per target over 2 workers", timeout=90)

        def every_command_seen() -> bool:
            # The default mix's commands: /metrics also has zero rows for the others (/db).
            totals = master.metrics().totals()
            return all(totals[(t, c)][0] > 0 for t in TARGETS for c in COMMANDS)

        poll("every target and command on the master", every_command_seen, timeout=60)

        # Edit the running test: a bigger payload must reach the workers' users without a restart.
        edit = {"user_count": "300", "spawn_rate": "100", "payload_bytes": "1000"}
        assert master.post("/swarm", edit)["success"]

        def echo_replies_grew() -> bool:
            entries = master.stats()["stats"]
            return any(e["name"] == "echo" and e["avg_content_length"] > 40 for e in entries)

        poll("1000-byte payloads", echo_replies_grew, timeout=60)

        assert master.post("/stop")["success"]
        poll("the test to stop", lambda: master.stats()["state"] == "stopped", timeout=90)
        poll(
            "/metrics to agree with Locust's own numbers on the master",
            lambda: nonzero(master.metrics().totals()) == stats_totals(master.stats()),
            timeout=30,
        )
        code = master.terminate()
        worker_codes = [worker.wait(timeout=60) for worker in workers]
    finally:
        for process in (master, *workers):
            process.kill()

    assert code == 0, master.stderr[-3000:]
    assert worker_codes == [0, 0]
    totals = csv_totals(tmp_path / "dist_stats.csv")
    assert set(totals) == {(target, command) for target in TARGETS for command in COMMANDS}
    assert all(failures == 0 for _, failures in totals.values()), totals
    with open(tmp_path / "dist_latency.csv", newline="") as handle:
        latency = {
            (r["target"], r["command"]): (int(r["requests"]), int(r["failures"]))
            for r in csv.DictReader(handle)
        }
    assert latency == totals
    after = counts_by_target(servers)
    check_servers_saw_the_same_traffic(before, after, totals)


@pytest.mark.locust
@pytest.mark.slow
def test_processes_flag_runs_forked_workers_and_the_master_adds_them_up(servers, tmp_path):
    prefix = tmp_path / "forked"
    run, totals = run_headless_to_success(
        tmp_path,
        "forked",
        ["--processes", "2", "--headless", "-t", "8s", "--csv", str(prefix)],
        servers,
    )
    assert all(failures == 0 for _, failures in totals.values()), totals
    assert all(totals[(target, "connect")][0] == USERS_PER_TARGET for target in TARGETS)
    with open(tmp_path / "forked_latency.csv", newline="") as handle:
        latency = {
            (r["target"], r["command"]): (int(r["requests"]), int(r["failures"]))
            for r in csv.DictReader(handle)
        }
    assert latency == totals
    assert run.stdout.count("Client-side latency") == 1  # printed by the master only


@pytest.mark.locust
@pytest.mark.slow
def test_headless_run_exits_non_zero_when_requests_fail(tmp_path):
    nobody = {"threaded": ("127.0.0.1", free_port())}
    run_to_end(
        tmp_path,
        "refused",
        [
            "--headless",
            "-t",
            "4s",
            "--targets",
            "threaded",
            "--users-per-target",
            "5",
            "--csv",
            str(tmp_path / "refused"),
        ],
        locust_env(nobody),
        timeout=60,
        expect=1,
    )
    totals = csv_totals(tmp_path / "refused_stats.csv")
    assert set(totals) == {("threaded", "connect")}
    requests, failures = totals[("threaded", "connect")]
    assert requests == failures > 0
    assert "ConnectionRefusedError" in (tmp_path / "refused_failures.csv").read_text()


@pytest.mark.locust
@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--sleep-share", "2"], {}, "--sleep-share: must be a number from 0 to 1, got '2'"),
        (["--threaded-target", "http://127.0.0.1:1"], {}, "must look like tcp://"),
        (["--targets", "threaded,nginx"], {}, "unknown target 'nginx'"),
        ([], {"LOCUST_PAYLOAD_BYTES": "lots"}, "--payload-bytes: must be a whole number"),
        (["--ping-share", "0.5", "--sleep-share", "0.6"], {}, "must not exceed 1"),
        (["--db-ms", "60001"], {}, "--db-ms: must be a whole number from 0 to 60000, got '60001'"),
        ([], {"LOCUST_DB_SHARE": "most"}, "--db-share: must be a number from 0 to 1, got 'most'"),
        (["--db-share", "0.5", "--sleep-share", "0.6"], {}, "+ --db-share must not exceed 1"),
    ],
)
def test_bad_knob_on_the_command_line_stops_locust_before_it_starts(tmp_path, args, env, message):
    run = start_locust(tmp_path, "bad", ["--headless", "-t", "5s", *args], locust_env({}, **env))
    try:
        code = run.wait(timeout=60)
    finally:
        run.kill()
    assert code == 2
    assert message in run.stderr
    assert "Ramping" not in run.stderr


@pytest.mark.locust
@pytest.mark.slow
def test_bad_knob_in_the_web_ui_is_refused_and_nothing_starts(tmp_path):
    run = start_locust(tmp_path, "web", [], locust_env({}), web_port=free_port())
    try:
        poll("the web UI", run.web_ready, timeout=60)
        page = run.get("/")
        # The start form offers 100 users per target.
        assert f'"num_users": {100 * len(models.NAMES)}' in page
        # Every knob in the start form, in the order of KNOBS (Jinja would sort them), and
        # neither of Locust's host warnings.
        positions = [page.index(f'"{knob.dest}": {{"default_value"') for knob in KNOBS]
        assert positions == sorted(positions)
        assert '"override_host_warning": false' in page
        assert '"missing_host_warning": false' in page
        answer = run.post("/swarm", {"user_count": "300", "spawn_rate": "100", "think_ms": "soon"})
        assert answer["success"] is False
        assert "--think-ms must be a number" in answer["message"]
        answer = run.post("/swarm", {"user_count": "3", "spawn_rate": "1", "targets": "apache"})
        assert "unknown target 'apache'" in answer["message"]
        answer = run.post("/swarm", {"user_count": "3", "spawn_rate": "1", "db_ms": "-5"})
        assert "--db-ms must be a whole number from 0 to 60000" in answer["message"]
        assert run.stats()["state"] == "ready"
        assert run.terminate() == 0
    finally:
        run.kill()

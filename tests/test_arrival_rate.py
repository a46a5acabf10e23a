"""Arrival-rate mode (open loop) against real servers and real Locust subprocesses.

The stall test is the issue's: one server, 200 requests/s, the server stopped with SIGSTOP for
2 s in the middle of a 20 s run. On the timetable about 400 requests fall due during the stall
and each one's latency counts from when it was due, so the run's p99 is over a second; the
closed loop at the same rate (10 users thinking ~50 ms) has at most one request per user stuck
in the stall and reports far fewer slow requests. Both figures are printed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gevent
import pytest

from loadtest.plugin.arrivals import Start, Timetable
from loadtest.plugin.client_metrics import render_metrics
from loadtest.plugin.client_stats import ClientStats, latency_rows
from loadtest.plugin.workload import Workload
from services import models
from tests.conftest import RunningServer, launch_server, stop_server
from tests.loadtest_helpers import (
    Metrics,
    free_port,
    locust_env,
    poll,
    server_counts,
    start_distributed,
    start_locust,
)

TARGET = models.NAMES[0]
PROTOCOL_COMMANDS = ("echo", "ping", "sleep", "work")
ONLY_ECHO = ["--ping-share", "0", "--sleep-share", "0", "--work-share", "0", "--targets", TARGET]
RATE = 200
RUN_S = 20
STALL_S = 2.0
STALL_AFTER_S = 8.0  # after the first answers: the stall sits in the middle of the run
SLOW_S = 1.0


# --- the pieces -----------------------------------------------------------------------------


def test_arrival_rate_is_blank_by_default_and_zero_means_the_closed_loop():
    assert not Workload.from_options({}).open_loop
    opened = Workload.from_options({"arrival_rate": "200", "arrival": "uniform"})
    assert (opened.open_loop, opened.arrival_rate, opened.arrival) == (True, 200, "uniform")
    assert "arrival_rate" in opened.given


def test_service_time_and_late_starts_travel_beside_the_latency():
    worker, master = ClientStats(), ClientStats()
    # Due 1.5 s before its answer, served in 2 ms: it waited for a connection.
    worker.record(TARGET, "echo", 1.5, failed=False, service=0.002, late=True)
    worker.record(TARGET, "echo", 0.0004, failed=False, service=0.0003)
    master.merge_message(worker.drain())
    [row] = latency_rows(master)
    assert (row["max_us"], row["service_p99_us"], row["late_starts"]) == (1_500_000, 2000, 1)
    metrics = Metrics.parse(render_metrics(master, {}, [TARGET], {TARGET: 200.0}).decode())
    labels = {"target": TARGET, "command": "echo"}
    assert metrics.value("locust_request_duration_seconds_bucket", le="1.0", **labels) == 1
    assert metrics.value("locust_service_time_seconds_bucket", le="0.0025", **labels) == 2
    assert metrics.value("locust_late_starts_total", **labels) == 1
    assert metrics.value("locust_arrival_rate", target=TARGET) == 200


def test_a_due_start_goes_to_an_open_idle_connection_first_and_waits_late_when_none_is_idle():
    environment = SimpleNamespace(parsed_options=SimpleNamespace(arrival_rate="0"))
    table = Timetable(TARGET, environment)
    table.dispatch(1.0)  # nobody idle: it waits, late
    assert table.backlog == 1
    assert table.take(connected=True) == Start(1.0, late=True)
    cold = gevent.spawn(table.take, False, 5.0)
    warm = gevent.spawn(table.take, True, 5.0)
    gevent.sleep(0)  # both are waiting now
    table.dispatch(2.0)
    assert warm.get(timeout=5) == Start(2.0, late=False)
    table.dispatch(3.0)  # the unopened connection only when no open one is idle
    assert cold.get(timeout=5) == Start(3.0, late=False)
    assert table.take(connected=True, wait_s=0.01) is None  # nothing due: back to the caller


# --- real Locust runs -------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """One real server of the first model."""
    started = launch_server(TARGET, *models.get(TARGET).small_flags)
    try:
        yield started
    finally:
        os.kill(started.proc.pid, signal.SIGCONT)  # never leave it stopped
        stop_server(started)


def answered(metrics: Metrics) -> int:
    """Successful protocol requests (connects excluded) to the target."""
    return int(
        sum(
            metrics.value("locust_request_duration_seconds_count", target=TARGET, command=command)
            for command in PROTOCOL_COMMANDS
        )
    )


def slow_requests(metrics: Metrics) -> int:
    """Successful requests that took more than SLOW_S from their intended start."""
    slow = 0.0
    for command in PROTOCOL_COMMANDS:
        labels = {"target": TARGET, "command": command}
        total = metrics.value("locust_request_duration_seconds_count", **labels)
        fast = metrics.value("locust_request_duration_seconds_bucket", le=repr(SLOW_S), **labels)
        slow += total - fast
    return int(slow)


def run_with_a_stall(tmp_path: Path, name: str, server: RunningServer, args: list[str]) -> Any:
    """Run Locust for RUN_S against the server, stop the server for STALL_S in the middle;
    the final /metrics scrape and the latency rows."""
    run = start_locust(
        tmp_path,
        name,
        ["--autostart", "-t", f"{RUN_S}s", *ONLY_ECHO, *args],
        locust_env({TARGET: server.address}),
        web_port=free_port(),
    )
    try:
        poll("the web UI", run.web_ready, timeout=60)
        poll("the first answers", lambda: answered(run.metrics()) > 0, timeout=60)
        time.sleep(STALL_AFTER_S)  # the stall's place in the run, not a wait for anything
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(STALL_S)  # the stall itself
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        poll("the run to end", lambda: run.stats()["state"] == "stopped", timeout=RUN_S + 60)
        metrics = run.metrics()
        rows = json_rows(run)
        code = run.terminate()
    finally:
        run.kill()
    assert code == 0, run.stderr[-3000:]
    return metrics, rows, run


def server_answers(server: RunningServer) -> float:
    """Requests the server answered, by its own /metrics."""
    counts = server_counts(server)
    return sum(counts[command] for command in PROTOCOL_COMMANDS)


def json_rows(run: Any) -> dict[str, dict[str, Any]]:
    """The latency tab's rows of the target, by command."""
    return {row["command"]: row for row in json.loads(run.get("/latency?format=json"))}


@pytest.mark.locust
@pytest.mark.slow
def test_a_stalled_server_shows_in_the_p99_only_on_the_timetable(server, tmp_path):
    opened, open_rows, open_run = run_with_a_stall(
        tmp_path, "open", server, ["--arrival-rate", str(RATE)]
    )
    # The same rate closed-loop: 10 users, each thinking 25 to 75 ms after every answer.
    closed, closed_rows, _ = run_with_a_stall(
        tmp_path, "closed", server, ["--users-per-target", "10", "--think-ms", "50"]
    )
    figures = {
        "open": (answered(opened), slow_requests(opened), open_rows["echo"]["p99_us"]),
        "closed": (answered(closed), slow_requests(closed), closed_rows["echo"]["p99_us"]),
    }
    print(f"\n(answered, slower than {SLOW_S:g} s, echo p99 µs) per mode: {figures}")
    open_answered, open_slow, open_p99 = figures["open"]
    closed_answered, closed_slow, _ = figures["closed"]
    # About RATE x (RUN_S - ramp-up) requests each; generous, the machine is shared.
    assert open_answered > RATE * RUN_S / 2 and closed_answered > RATE * RUN_S / 4, figures
    assert open_p99 >= SLOW_S * 1_000_000, figures
    assert open_slow >= 100, figures  # ~200 of the ~400 due in the 2 s stall waited over 1 s
    assert closed_slow * 4 <= open_slow, figures
    # The stall's backlog: more requests fell due than there were idle connections.
    assert opened.value("locust_late_starts_total", target=TARGET, command="echo") > 0
    assert opened.value("locust_arrival_rate", target=TARGET) == RATE
    # Locust's own table reports the same corrected latency (whole milliseconds).
    assert f"{TARGET}" in open_run.stdout and "late starts" in open_run.stdout


@pytest.mark.locust
@pytest.mark.slow
def test_the_rate_is_per_target_across_all_workers(server, tmp_path):
    rate, window_s = 50, 10.0
    master, workers = start_distributed(
        tmp_path,
        ["--autostart", "-t", "300s", *ONLY_ECHO, "--arrival-rate", str(rate)],
        locust_env({TARGET: server.address}),
    )
    try:
        poll("the web UI", master.web_ready, timeout=60)
        poll("100 users over 2 workers", lambda: master.metrics().users() == {TARGET: 100}, 90)
        poll("the first answers", lambda: answered(master.metrics()) > 0, timeout=60)
        # Counted by the server itself: no wait for the workers' reports (every 3 s).
        first, started = server_answers(server), time.monotonic()
        time.sleep(window_s)  # the measuring window
        achieved = (server_answers(server) - first) / (time.monotonic() - started)
        assert master.post("/stop")["success"]
        poll("the test to stop", lambda: master.stats()["state"] == "stopped", timeout=90)
        code = master.terminate()
        worker_codes = [worker.wait(timeout=60) for worker in workers]
    finally:
        for process in (master, *workers):
            process.kill()
    print(f"\noffered {rate}/s over 2 workers, the server answered {achieved:.1f}/s")
    # Each worker must schedule half: the full rate on each would show about 2 x rate.
    assert 0.7 * rate <= achieved <= 1.3 * rate, achieved
    assert code == 0 and worker_codes == [0, 0], master.stderr[-3000:]

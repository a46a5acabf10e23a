"""The benchmark shows starvation: connections never answered are counted, flagged and charted."""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from loadtest.bench import harness, loadgen, report
from services import models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PING = loadgen.Request(1, "ping", "ping")  # the test servers echo what they read
# The synthetic results' two servers (any two registered models): one starved, one fair.
STARVED, FAIR = models.NAMES[:2]


@contextmanager
def echo_server(silent_every: int = 0) -> Iterator[int]:
    """A real loopback server in a thread; every `silent_every`-th connection is never answered.

    A silent connection is accepted and read from, so the client's requests are really taken
    off the wire: the server simply never replies, like a starved thread would.
    """
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    stop = threading.Event()

    def serve() -> None:
        accepted = 0
        while not stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                if key.data is None:
                    while True:
                        try:
                            client, _ = listener.accept()
                        except BlockingIOError:
                            break
                        accepted += 1
                        client.setblocking(False)
                        silent = silent_every > 0 and accepted % silent_every == 0
                        selector.register(client, selectors.EVENT_READ, silent)
                    continue
                client = key.fileobj
                try:
                    data = client.recv(65536)
                except (BlockingIOError, ConnectionError):
                    continue
                if not data:
                    selector.unregister(client)
                    client.close()
                elif not key.data:
                    client.sendall(data)  # one request in flight: the reply fits the buffer
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=10)


def run_loadgen(
    port: int, connections: int, duration: float, warmup: float, connect_timeout: float = 10.0
) -> dict:
    """One real load generator run against 127.0.0.1:port."""
    args = loadgen.command(
        loadgen.build(),
        port,
        connections,
        duration,
        warmup,
        [PING],
        connect_timeout=connect_timeout,
    )
    return loadgen.run(args, lambda _marker: None, timeout=duration + warmup + 60)


@pytest.mark.slow
def test_connections_a_server_never_answers_are_counted_and_the_run_is_flagged_starved() -> None:
    with echo_server(silent_every=3) as port:
        result = run_loadgen(port, connections=12, duration=1.0, warmup=0.2)
    fairness = result["fairness"]
    assert fairness["connections"] == 12
    assert fairness["answered_connections"] == 8  # connections 3, 6, 9 and 12 are silent
    assert fairness["starved"] is True
    assert fairness["requests_per_connection"]["min"] == 0
    assert fairness["requests_per_connection"]["max"] > 0
    # The silent connections have waited since the fixed start: warm-up plus the window.
    assert fairness["longest_wait_unanswered"] is True
    assert 1.0 <= fairness["longest_wait_s"] < 30
    assert fairness["longest_wait_s"] == fairness["longest_unanswered_wait_s"]
    assert sum(result["errors"].values()) == 0  # waiting is not an error: it is starvation


@pytest.mark.slow
def test_a_server_that_answers_everyone_is_not_flagged() -> None:
    with echo_server() as port:
        result = run_loadgen(port, connections=20, duration=1.0, warmup=0.2)
    fairness = result["fairness"]
    assert fairness["answered_connections"] == 20 and fairness["starved"] is False
    assert fairness["requests_per_connection"]["min"] >= 1
    assert 0 < fairness["longest_wait_s"] < 1.0
    assert result["connected"] == 20 and sum(result["errors"].values()) == 0


@pytest.mark.slow
def test_connections_that_cannot_connect_are_counted_and_starved() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_loadgen(port, connections=5, duration=0.3, warmup=0.0, connect_timeout=0.3)
    assert result["errors"]["connect"] >= 5
    assert result["fairness"]["answered_connections"] == 0
    assert result["fairness"]["starved"] is True
    assert result["fairness"]["longest_wait_unanswered"] is True


def _rep(answered: int, wait: float, unanswered: bool, per_connection: tuple[int, int]) -> dict:
    return {
        "rps": 1000.0,
        "requests": 1000,
        "server_cpu_s": 1.0,
        "server_cpu_fraction": 1.0,
        "server_cpu_us_per_request": 20.0,
        "peak_rss_bytes": 50 * 2**20,
        "threads": 1004,
        "loadgen_cpu_s": 0.5,
        "loadgen_cpu_fraction": 0.5,
        "other_cpu_fraction": 0.0,
        "latency_us": {"p50": 5000.0, "p99": 500000.0, "p999": 1000000.0},
        "errors": 0,
        "loadgen_saturated": False,
        "connections": 1000,
        "answered_connections": answered,
        "starved": answered < 1000,
        "requests_per_connection_min": per_connection[0],
        "requests_per_connection_median": per_connection[0],
        "requests_per_connection_max": per_connection[1],
        "longest_wait_s": wait,
        "longest_wait_unanswered": unanswered,
    }


def synthetic_results() -> dict:
    """Two servers under one scenario: STARVED starved in one of two runs, FAIR fair."""
    starved = [_rep(352, 5.93, True, (0, 240)), _rep(1000, 0.8, False, (3, 90))]
    fair = [_rep(1000, 0.031, False, (50, 61)), _rep(1000, 0.029, True, (52, 60))]
    runs = [
        {
            "scenario": "echo64-c1000",
            "target": name,
            "family": name,
            "kind": "ours",
            "command": name,
            "reps": reps,
            "median": harness.summarize(reps),
        }
        for name, reps in ((STARVED, starved), (FAIR, fair))
    ]
    return {
        "meta": {
            "date": "2026-11-28 15:00 UTC",
            "pinning": "not pinned",
            "reps": 2,
            "duration_s": 5.0,
            "warmup_s": 1.0,
            "work_rounds": 1000,
            "work_round_ns": 50.0,
            "mix": "echo",
            "loadgen_saturation_threshold": 0.9,
            "noisy_retries": 2,
            "ceiling": None,
            "machine": {
                "cpu_model": "Test CPU",
                "cores": 2,
                "memory_bytes": 2**30,
                "system": "Linux",
                "python": "3.12",
            },
        },
        "scenarios": {
            "echo64-c1000": {"title": "echo 64 B, 1000 conns", "connections": 1000, "echo_size": 64}
        },
        "families": [STARVED, FAIR],
        "targets": [
            {"name": name, "family": name, "kind": "ours", "command": name}
            for name in (STARVED, FAIR)
        ],
        "runs": runs,
    }


def test_the_summary_keeps_the_worst_run_of_fairness() -> None:
    median = synthetic_results()["runs"][0]["median"]
    assert median["starved"] is True and median["starved_reps"] == 1
    assert median["answered_connections"] == 352 and median["connections"] == 1000
    assert median["longest_wait_s"] == 5.93 and median["longest_wait_unanswered"] is True
    assert (median["requests_per_connection_min"], median["requests_per_connection_max"]) == (
        0,
        240,
    )


def test_bench_md_shows_answered_connections_the_longest_wait_and_flags_starvation(
    tmp_path: Path,
) -> None:
    markdown = report.write_markdown(synthetic_results(), tmp_path).read_text()
    rows: dict[str, str] = {}
    for line in markdown.splitlines():  # the first row per server: the scenario's table
        if line.startswith((f"| {STARVED} |", f"| {FAIR} |")):
            rows.setdefault(line.split(" | ")[0], line)
    assert "| 352/1000 ⚠ | 0\u2013240 | still waiting after 5.9 s |" in rows[f"| {STARVED}"]
    assert "| 1000/1000 | 50\u201361 | 31 ms |" in rows[f"| {FAIR}"]
    flag = (
        f"⚠ {STARVED}: 352/1000 connections answered; a request still waiting after 5.9 s "
        "(1 of 2 runs starved)"
    )
    assert f"> **{flag}**" in markdown  # under the scenario's table
    assert f"⚠ {STARVED} (echo 64 B, 1000 conns): 352/1000 connections answered" in markdown
    assert f"{FAIR}:" not in markdown and "No run starved" not in markdown


def test_bench_md_says_so_when_no_run_starved(tmp_path: Path) -> None:
    results = synthetic_results()
    results["runs"] = results["runs"][1:]
    markdown = report.write_markdown(results, tmp_path).read_text()
    assert "No run starved a connection" in markdown and f"⚠ {STARVED}" not in markdown


def test_results_without_fairness_figures_still_render(tmp_path: Path) -> None:
    results = synthetic_results()
    for run in results["runs"]:
        for key in ("answered_connections", "starved", "longest_wait_s"):
            del run["median"][key]
    markdown = report.write_markdown(results, tmp_path).read_text()
    assert "| - | - | - |" in markdown


def test_the_fairness_chart_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "fairness.png"
    report.write_fairness_chart(synthetic_results(), path)
    assert path.read_bytes()[:8] == PNG_MAGIC

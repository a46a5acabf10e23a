"""`/db` against a real PostgreSQL on every model: replies, order, metrics, held connections.

PostgreSQL is a throwaway cluster from the machine's binaries (the `postgres` fixture,
loadtest/tools/postgres.py); servers are real subprocesses on 127.0.0.1 port 0.
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest

from services import models
from tests.conftest import MODELS, RunningServer, launch_server, small_flags, stop_server
from tests.server_helpers import LineClient, exchange, scrape, wait_for_metrics


def db_flags(name: str) -> tuple[str, ...]:
    """A small run of the model; the pool's thread variant is a model of its own here."""
    return small_flags(name)


@pytest.fixture(scope="module", params=MODELS)
def db_server(request, postgres) -> Iterator[RunningServer]:
    """One server per model with the database, shared by this module's tests."""
    running = launch_server(request.param, *db_flags(request.param), env=postgres.env())
    yield running
    stop_server(running)


DB_CASES = [
    (b"/db 0", b"\n"),
    (b"/db 0 hi there", b"HI THERE\n"),
    (b"/db 5 x", b"X\n"),
    (b"/db 0  a", b" A\n"),  # TEXT starts after the single space following the number
    (b"/db 007 lead", b"LEAD\n"),  # leading zeros allowed, as for /sleep
    (b"/db 0 /not a command", b"/NOT A COMMAND\n"),
]


@pytest.mark.parametrize(("line", "reply"), DB_CASES)
def test_db_answers_like_sleep_after_a_round_trip(db_server, line, reply):
    assert exchange(db_server, line + b"\n", 1) == reply


def test_pipelined_db_requests_are_answered_in_order(db_server):
    payload = b"/db 30 first\n/db 0 second\nthird\n/ping\n/db 1 fifth\n"
    assert exchange(db_server, payload, 5) == b"FIRST\nSECOND\nTHIRD\nPONG\nFIFTH\n"


@pytest.mark.parametrize("line", [b"/db", b"/db ", b"/db -1", b"/db abc", b"/db 60001", b"/db 1.5"])
def test_bad_db_arguments_are_refused_before_any_query(db_server, line):
    with LineClient(db_server.address) as client:
        assert client.request(line).startswith(b"ERR bad-argument usage: /db MS [TEXT]")
        assert client.request(b"still open") == b"STILL OPEN\n"


def test_db_requests_are_counted_and_timed(db_server):
    for _ in range(5):
        assert exchange(db_server, b"/db 1 x\n", 1) == b"X\n"
    metrics = wait_for_metrics(
        db_server, lambda m: m.value("arena_requests_total", command="db", outcome="ok") >= 5
    )
    model = models.target(db_server.model)[0].name
    assert metrics.value("arena_server_info", model=model, db_driver="default") == 1
    if metrics.sum("arena_server_info", executor="process") == 1:
        return  # process workers own their pools: their query figures stay in the workers
    assert metrics.value("arena_db_pool_size") == 20
    assert metrics.value("arena_db_query_seconds_count") >= 5
    assert metrics.value("arena_db_pool_wait_seconds_count") >= 5
    assert 1 <= metrics.value("arena_db_connections_open") <= 20
    assert metrics.value("arena_db_errors_total", kind="unavailable") == 0


def test_the_server_holds_no_more_connections_than_its_pool(db_server, postgres):
    """Twenty-five clients at once against a pool of 20: PostgreSQL sees at most 20 of ours."""
    clients = [LineClient(db_server.address) for _ in range(25)]
    try:
        for client in clients:
            client.send(b"/db 50 x\n")
        for client in clients:
            assert client.read_line() == b"X\n"
    finally:
        for client in clients:
            client.close()
    model = models.target(db_server.model)[0].name
    rows = postgres.admin_query(
        f"SELECT count(*) FROM pg_stat_activity WHERE application_name = 'arena-{model}'"
    )
    held = int(rows[0][0])
    assert 1 <= held <= 20, held


# -- the seed's warning: a driver the model cannot switch around stalls every connection ------

WARNED = [name for name in MODELS if "blocking" in models.target(name)[0].db_drivers]


def first_to_answer(slow: socket.socket, fast: socket.socket) -> str | None:
    """Which of two sockets has a reply first: 'slow' or 'fast'; None when both were readable
    by the time this process woke (a blocked server answers the echo microseconds after the
    query: on a busy machine the wake-up can come after both, and the order is then lost)."""
    with selectors.DefaultSelector() as selector:
        selector.register(slow, selectors.EVENT_READ, "slow")
        selector.register(fast, selectors.EVENT_READ, "fast")
        events = selector.select(timeout=30)
        assert events, "neither connection was answered within 30 s"
        return None if len(events) > 1 else str(events[0][0].data)


def slow_then_echo(server) -> str | None:
    """A 1.5 s query, then an echo once the query is in flight: which was answered first."""
    with LineClient(server.address) as slow, LineClient(server.address) as fast:
        slow.send(b"/db 1500 slow\n")
        # In flight once the pool counts it in use (the metrics thread is an OS thread:
        # it answers while a blocking driver holds the loop).
        wait_for_metrics(server, lambda m: m.value("arena_db_connections_in_use") == 1)
        fast.send(b"echo\n")
        first = first_to_answer(slow.sock, fast.sock)
        assert slow.read_line() == b"SLOW\n"
        assert fast.read_line() == b"ECHO\n"
    wait_for_metrics(server, lambda m: m.value("arena_db_connections_in_use") == 0)
    return first


@pytest.mark.slow
@pytest.mark.parametrize("name", WARNED)
@pytest.mark.parametrize(
    ("driver", "echo_first"), [("default", True), ("blocking", False), ("blocking-fixed", True)]
)
def test_a_blocking_driver_holds_every_connection_while_a_query_waits(
    postgres, name, driver, echo_first
):
    """An echo sent while a 1.5 s query is in flight: answered first unless the driver blocks."""
    server = launch_server(name, "--db-driver", driver, env=postgres.env())
    try:
        with LineClient(server.address) as warm:
            assert warm.request(b"/db 0 warm") == b"WARM\n"  # the pool holds a connection
        first = None
        for _ in range(3):  # at most three tries, until one shows the order
            first = slow_then_echo(server)
            if first is not None:
                break
        assert first == ("fast" if echo_first else "slow")
        metrics = scrape(server)
        assert metrics.value("arena_server_info", db_driver=driver) == 1
    finally:
        stop_server(server)

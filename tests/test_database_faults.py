"""`/db` when the database fails: unreachable, stopped mid-run, exhausted, and at shutdown.

Every test uses a real PostgreSQL (the `postgres` fixture, or one of its own where it stops it)
and real servers; a `/db` that fails answers an error on a connection that stays open, and
nothing else the server does is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from loadtest.tools import procs
from loadtest.tools.postgres import Postgres
from services import models
from tests.conftest import MODELS, launch_server, small_flags, stop_server
from tests.server_helpers import LineClient, wait_for, wait_for_metrics

pytestmark = pytest.mark.slow

UNAVAILABLE = b"ERR backend-unavailable "
BUSY = b"ERR backend-busy "
DB_TIMEOUT = 1.0  # the servers' --db-timeout here: connect, and wait for a free connection
# A reply may take the query, a connect timeout and a wait for a connection; far more than that
# is a hang. Generous, for a shared machine.
REPLY_TIMEOUT = 15.0


def free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def clients_running(
    client: Callable[[int], None], count: int, stop: threading.Event
) -> Iterator[None]:
    """`count` threads running `client(index)` until the block ends (then `stop` is set)."""
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(REPLY_TIMEOUT * 2)


def held_connections(postgres: Postgres, name: str) -> int:
    """Connections PostgreSQL has open for a model's servers (by application_name)."""
    model = models.target(name)[0].name
    rows = postgres.admin_query(
        f"SELECT count(*) FROM pg_stat_activity WHERE application_name = 'arena-{model}'"
    )
    return int(rows[0][0])


@pytest.mark.parametrize("name", MODELS)
def test_an_unreachable_database_fails_only_db_and_the_server_stays_healthy(name):
    env = {
        "ARENA_DB_URL": f"postgresql://arena@127.0.0.1:{free_port()}/arena",
        "ARENA_DB_PASSWORD": "unused",
        "ARENA_DB_TIMEOUT": str(DB_TIMEOUT),
    }
    server = launch_server(name, *small_flags(name), env=env)
    try:
        with LineClient(server.address, timeout=REPLY_TIMEOUT) as client:
            assert client.request(b"/db 0 x").startswith(UNAVAILABLE)
            assert client.request(b"hello") == b"HELLO\n"
            assert client.request(b"/sleep 1 slept") == b"SLEPT\n"
            assert client.request(b"/db 5").startswith(UNAVAILABLE)  # the same connection
        assert procs.ping(*server.address)  # what the healthcheck asks
        metrics = wait_for_metrics(
            server,
            lambda m: m.value("arena_protocol_errors_total", code="backend-unavailable") >= 2,
        )
        assert metrics.value("arena_requests_total", command="db", outcome="error") >= 2
        assert server.proc.poll() is None
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("name", MODELS)
def test_a_database_outage_answers_unavailable_and_heals_within_two_seconds(name):
    """PostgreSQL stopped for 5 s under 100 clients, then started again on the same port."""
    with Postgres() as postgres:
        env = {**postgres.env(), "ARENA_DB_TIMEOUT": str(DB_TIMEOUT)}
        server = launch_server(name, *small_flags(name), env=env)
        stop = threading.Event()
        replies: Counter[str] = Counter()
        problems: list[str] = []
        lock = threading.Lock()

        def client(index: int) -> None:
            """Alternate /db and echo until told to stop (bounded by the test's own steps)."""
            try:
                with LineClient(server.address, timeout=REPLY_TIMEOUT) as line_client:
                    number = 0
                    while not stop.is_set() and number < 100_000:
                        number += 1
                        text = f"c{index}n{number}".encode()
                        reply = line_client.request(b"/db 5 " + text)
                        kind = (
                            "ok"
                            if reply == text.upper() + b"\n"
                            else "unavailable"
                            if reply.startswith(UNAVAILABLE)
                            else "busy"
                            if reply.startswith(BUSY)
                            else f"unexpected {reply[:60]!r}"
                        )
                        echo = line_client.request(b"echo " + text)
                        with lock:
                            replies[kind] += 1
                            if echo != b"ECHO " + text.upper() + b"\n":
                                problems.append(f"echo answered {echo[:60]!r}")
            except (OSError, AssertionError) as error:
                with lock:
                    problems.append(f"client {index}: {error!r}")

        try:
            with clients_running(client, 100, stop):
                wait_for(lambda: replies["ok"] >= 200, what="200 /db answered before the outage")
                postgres.stop()
                down_at = time.monotonic()
                wait_for(
                    lambda: replies["unavailable"] >= 1, what="/db answered unavailable while down"
                )
                remaining = 5.0 - (time.monotonic() - down_at)
                if remaining > 0:
                    stop.wait(remaining)  # the outage lasts 5 s, as the issue sets it
                ok_before_restart = replies["ok"]
                postgres.start()
                wait_for(
                    lambda: replies["ok"] > ok_before_restart + 50,
                    timeout=REPLY_TIMEOUT,
                    what="/db answered again after the restart",
                )
                # Probe on a fresh connection: the first success after the database is back.
                with LineClient(server.address, timeout=REPLY_TIMEOUT) as probe:
                    assert probe.request(b"/db 0 back") == b"BACK\n"
            assert not problems, problems[:5]
            assert not any(kind.startswith("unexpected") for kind in replies), replies
            assert replies["unavailable"] >= 1
            pool = 1 * 2 if name == "pool" else 20  # process workers: one connection each
            assert held_connections(postgres, name) <= pool
            assert server.proc.poll() is None
        finally:
            stop_server(server)


def test_db_succeeds_within_two_seconds_of_the_database_returning():
    """The issue's bound: the first /db after PostgreSQL is back succeeds within 2 s."""
    with Postgres() as postgres:
        env = {**postgres.env(), "ARENA_DB_TIMEOUT": str(DB_TIMEOUT)}
        server = launch_server("threaded", env=env)
        try:
            with LineClient(server.address, timeout=REPLY_TIMEOUT) as client:
                assert client.request(b"/db 0 up") == b"UP\n"  # an idle connection in the pool
                postgres.stop()
                assert client.request(b"/db 0 down").startswith(UNAVAILABLE)
                postgres.start()
                back_at = time.monotonic()
                reply = client.request(b"/db 0 again")
                while reply.startswith(UNAVAILABLE) and time.monotonic() - back_at < 2.0:
                    reply = client.request(b"/db 0 again")
                assert reply == b"AGAIN\n", reply
                assert time.monotonic() - back_at < 2.0
        finally:
            stop_server(server)


EXHAUSTIBLE = [name for name in MODELS if name != "pool"]  # see the test's docstring


@pytest.mark.parametrize("name", [*EXHAUSTIBLE, "pool-thread"])
def test_an_exhausted_pool_answers_busy_and_keeps_the_connection(postgres, name):
    """One connection in the pool, held by a long query: the next /db is busy after the wait.

    The process pool is left out: each worker owns one connection and runs one task at a time,
    so a /db waits in the executor's queue, never for a database connection.
    """
    model = models.target(name)[0]
    extra = ("--workers", "4") if model.name == "pool" else ()
    server = launch_server(
        name, *extra, "--db-pool", "1", "--db-timeout", "0.5", env=postgres.env()
    )
    try:
        with (
            LineClient(server.address, timeout=REPLY_TIMEOUT) as holder,
            LineClient(server.address, timeout=REPLY_TIMEOUT) as other,
        ):
            holder.send(b"/db 3000 held\n")
            wait_for_metrics(server, lambda m: m.value("arena_db_connections_in_use") == 1)
            assert other.request(b"/db 0 x").startswith(BUSY)
            assert other.request(b"still here") == b"STILL HERE\n"
            assert holder.read_line() == b"HELD\n"
            assert other.request(b"/db 0 now") == b"NOW\n"
        metrics = wait_for_metrics(
            server, lambda m: m.value("arena_db_errors_total", kind="busy") >= 1
        )
        assert metrics.value("arena_protocol_errors_total", code="backend-busy") >= 1
    finally:
        stop_server(server)


@pytest.mark.parametrize("name", MODELS)
def test_sigterm_lets_queries_in_flight_finish_closes_the_pool_and_exits_0(postgres, name):
    server = launch_server(name, *small_flags(name), "--grace", "10", env=postgres.env())
    clients = [LineClient(server.address, timeout=REPLY_TIMEOUT) for _ in range(4)]
    try:
        for client in clients:
            client.send(b"/db 1000 finished\n")
        # Every query in flight before the signal (the pool's process workers run two).
        in_flight = 2 if models.target(name)[0].name == "pool" else 4
        wait_for(lambda: held_connections(postgres, name) >= in_flight, what="queries in flight")
        server.proc.send_signal(signal.SIGTERM)
        for client in clients:
            assert client.read_line() == b"FINISHED\n"
        assert server.proc.wait(REPLY_TIMEOUT) == 0
    finally:
        for client in clients:
            client.close()
        stop_server(server)
    wait_for(lambda: held_connections(postgres, name) == 0, what="the pool's connections closed")


def test_a_killed_pool_worker_heals_and_leaks_no_database_connection(postgres):
    server = launch_server("pool", "--workers", "2", "--executor", "process", env=postgres.env())
    stop = threading.Event()
    problems: list[str] = []

    def client(index: int) -> None:
        try:
            with LineClient(server.address, timeout=REPLY_TIMEOUT) as line_client:
                for number in range(10_000):
                    if stop.is_set():
                        return
                    text = f"c{index}n{number}".encode()
                    reply = line_client.request(b"/db 20 " + text)
                    if reply != text.upper() + b"\n" and not reply.startswith(b"ERR server-busy "):
                        problems.append(f"{reply[:80]!r}")
        except OSError as error:
            problems.append(f"client {index}: {error!r}")

    try:
        with clients_running(client, 20, stop):
            wait_for(lambda: held_connections(postgres, "pool") == 2, what="both workers connected")
            victim = worker_pid(server)
            os.kill(victim, signal.SIGKILL)
            metrics = wait_for_metrics(
                server, lambda m: m.value("arena_pool_worker_restarts_total") >= 1
            )
            assert metrics.value("arena_pool_worker_restarts_total") == 1
            before = metrics.value("arena_requests_total", command="db", outcome="ok")
            wait_for_metrics(
                server,
                lambda m: m.value("arena_requests_total", command="db", outcome="ok") > before + 20,
            )
        assert not problems, problems[:5]
        # The dead worker's connection is gone with it; the new ones hold one each.
        wait_for(
            lambda: held_connections(postgres, "pool") <= 2,
            what="no more connections than the live workers",
        )
    finally:
        stop_server(server)


def worker_pid(server) -> int:
    """A live worker process of a pool server (a child of its forkserver)."""
    import psutil

    server_process = psutil.Process(server.proc.pid)
    for child in server_process.children(recursive=True):
        if child.ppid() != server.proc.pid:  # the forkserver's children are the workers
            return int(child.pid)
    raise AssertionError("no worker process found")

"""Scrapes fold only changed tallies, by delta, and stay exact (issue 9, part 5)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import pytest

from services import protocol
from services.session import ServerStats, Session, Tally
from tests.conftest import MODELS, small_flags
from tests.server_helpers import LineClient, scrape, wait_for_metrics

ECHO = protocol.Answer(protocol.ECHO, b"X\n")
BAD = protocol.Answer(protocol.SLEEP, b"ERR bad-argument\n", "bad-argument")


class FakeSocket:
    """Enough of a socket for ServerStats: closing it is all it does."""

    def close(self) -> None:
        """Nothing to close."""


def open_sessions(stats: ServerStats, count: int) -> list[Session]:
    """Register `count` sessions on fake sockets."""
    sessions = [stats.open_session(FakeSocket(), 100) for _ in range(count)]  # type: ignore[arg-type]
    assert all(sessions)
    return sessions  # type: ignore[return-value]


def expect(total: Tally, echoes: int, errors: int, received: int, sent: int) -> None:
    """The folded totals equal the traffic recorded, exactly."""
    assert total.requests[protocol.ECHO * 2] == echoes
    assert total.requests[protocol.SLEEP * 2 + 1] == errors
    assert total.errors.get("bad-argument", 0) == errors
    assert sum(total.durations[protocol.ECHO].counts) == echoes
    assert sum(total.durations[protocol.SLEEP].counts) == errors
    assert total.received == received
    assert total.sent == sent


def test_scrape_folds_each_change_once_and_close_folds_the_rest():
    stats = ServerStats(10)
    first, second = open_sessions(stats, 2)
    first.tally.record(ECHO, 0.001)
    first.tally.received += 5
    expect(stats.snapshot(), 1, 0, 5, 0)
    expect(stats.snapshot(), 1, 0, 5, 0)  # nothing new: nothing folded twice
    first.tally.sent += 2  # bytes counted outside record() are seen too
    second.tally.record(BAD, 0.002)
    expect(stats.snapshot(), 1, 1, 5, 2)
    first.tally.record(ECHO, 0.001)
    stats.close_session(first, "client")  # the unscraped rest is folded at close
    stats.close_session(second, "client")
    total = stats.snapshot()
    expect(total, 2, 1, 5, 2)
    assert total.durations[protocol.ECHO].total == pytest.approx(0.002)
    assert not stats.sessions


def test_snapshot_is_a_copy():
    stats = ServerStats(10)
    (session,) = open_sessions(stats, 1)
    session.tally.record(ECHO, 0.001)
    taken = stats.snapshot()
    session.tally.record(ECHO, 0.001)
    stats.snapshot()
    assert taken.requests[protocol.ECHO * 2] == 1


def start_os_thread(target: Callable[..., None], *args: object) -> Callable[[float], None]:
    """Start an OS thread, also where gevent patched `threading` (importing Locust does that in
    this test process): a green "thread" spinning in scrape_loop would never let the others run.
    Returns a function that waits up to `timeout` seconds for the thread to end."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        thread = threading.Thread(target=target, args=args)
        thread.start()
        return thread.join
    finished = monkey.get_original("_thread", "allocate_lock")()
    finished.acquire()

    def run() -> None:
        try:
            target(*args)
        finally:
            finished.release()

    monkey.get_original("_thread", "start_new_thread")(run, ())

    def join(timeout: float) -> None:
        if finished.acquire(timeout=timeout):
            finished.release()

    return join


def test_records_racing_scrapes_and_closes_are_counted_exactly():
    """Owner threads record while another scrapes; each total is bounded and the last exact.

    Many connections with a request or two each: a lost flag would lose a connection's *last*
    request (a later one would carry it), so the last requests must race the scrapes.
    """
    threads, per_thread, passes = 4, 1500, 2
    stats = ServerStats(threads * per_thread)
    sessions = open_sessions(stats, threads * per_thread)
    done = threading.Event()  # only polled (is_set), so a green one is fine too
    seen: list[int] = []

    def serve(mine: list[Session], index: int) -> None:
        counting_bytes = index % 2  # the others change nothing but what record() counts
        for number in range(passes * len(mine)):
            tally = mine[number % len(mine)].tally
            if counting_bytes:
                tally.received += 3
            tally.record(BAD if number % 10 == 0 else ECHO, 0.0001)
            if counting_bytes:
                tally.sent += 2
        if index == 1:  # some connections close while scrapes go on
            for session in mine[: len(mine) // 2]:
                stats.close_session(session, "client")

    def scrape_loop() -> None:
        while not done.is_set():
            seen.append(sum(stats.snapshot().requests))

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: inside record(), inside the fold
    try:
        join_scraper = start_os_thread(scrape_loop)
        joins = [
            start_os_thread(serve, sessions[index * per_thread : (index + 1) * per_thread], index)
            for index in range(threads)
        ]
        for join in joins:
            join(60)
        done.set()
        join_scraper(60)
    finally:
        sys.setswitchinterval(previous)
    records = threads * per_thread * passes
    assert len(seen) > 1 and seen == sorted(seen) and seen[-1] <= records
    errors = records // 10
    byte_records = records // 2
    expect(stats.snapshot(), records - errors, errors, byte_records * 3, byte_records * 2)
    for session in list(stats.sessions.values()):
        stats.close_session(session, "client")
    expect(stats.snapshot(), records - errors, errors, byte_records * 3, byte_records * 2)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_counters_stay_exact_as_connections_open_idle_and_close_across_scrapes(
    server_factory, model
):
    server = server_factory(model, *small_flags(model))
    batches, per_batch = 6, 40
    held: list[LineClient] = []
    sent = received = 0
    try:
        for batch in range(batches):
            clients = [LineClient(server.address) for _ in range(per_batch)]
            for number, client in enumerate(clients):
                assert client.request(b"b%d c%d" % (batch, number)) == b"B%d C%d\n" % (
                    batch,
                    number,
                )
                if number % 4 == 0:
                    assert client.request(b"/ping") == b"PONG\n"
            scrape(server)  # a scrape between every batch, while connections idle
            held.extend(clients)
            for client in held[: per_batch // 2]:  # close some of the older ones
                sent, received = sent + client.sent_bytes, received + client.received_bytes
                client.close()
            del held[: per_batch // 2]
            scrape(server)
    finally:
        for client in held:
            sent, received = sent + client.sent_bytes, received + client.received_bytes
            client.close()
    metrics = wait_for_metrics(server, lambda m: m.value("arena_connections_active") == 0)
    connections = batches * per_batch
    assert metrics.value("arena_connections_total") == connections
    assert metrics.sum("arena_requests_total", command="echo", outcome="ok") == connections
    assert metrics.sum("arena_requests_total", command="ping", outcome="ok") == connections // 4
    assert metrics.sum("arena_requests_total", outcome="error") == 0
    assert metrics.value("arena_request_duration_seconds_count", command="echo") == connections
    assert metrics.value("arena_received_bytes_total") == sent
    assert metrics.value("arena_sent_bytes_total") == received
    assert metrics.sum("arena_connections_closed_total") == connections

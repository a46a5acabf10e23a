"""The threaded server's turns: requests in arrival order above --turns-above connections.

`--turns-above 0` makes every request take its turn, so these tests exercise the hand-over on a
few connections: concurrent clients all served correctly, a client that never reads holds up
nobody, a connection that ends while holding the turn gives it back.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.reliability_helpers import (
    connect,
    poll_metrics,
    push_until_stalled,
    reset,
    scrape,
)
from tests.test_reliability import SLOW_PAYLOADS, assert_serves, run_active_clients

ALWAYS = ("--turns-above", "0")


@pytest.fixture
def turns_server(server_factory):
    """A threaded server on which every request takes its turn."""
    return server_factory("threaded", *ALWAYS, "--idle-timeout", "120")


def test_concurrent_clients_take_turns_and_all_are_answered(turns_server):
    """20 clients x 50 checked requests: every reply right, and turns were handed over."""
    assert run_active_clients(turns_server, 20, 50) == 1000
    metrics = scrape(turns_server)
    assert metrics.sum("arena_turn_handovers_total") > 0, "no request ever waited for a turn"
    assert metrics.sum("arena_requests_total") >= 1000


def test_turns_stay_off_below_the_threshold(server_factory):
    """With the default threshold (256), 20 clients never queue for a turn."""
    server = server_factory("threaded")
    assert run_active_clients(server, 20, 50) == 1000
    assert scrape(server).sum("arena_turn_handovers_total") == 0


@pytest.mark.slow
def test_a_client_that_never_reads_holds_up_nobody(turns_server):
    """A stalled reply gives its turn back before waiting: the others are still served."""
    slow = connect(turns_server.address, receive_buffer=16384)
    try:
        sent, stalled = push_until_stalled(
            slow, SLOW_PAYLOADS["echo"], limit=64 * 1024 * 1024, stall=3.0, timeout=120.0
        )
        assert stalled, f"the server read all {sent} bytes from a client that never reads"
        assert run_active_clients(turns_server, 10, 20) == 200
    finally:
        reset(slow)
    assert_serves(turns_server)


def test_connections_that_end_mid_request_give_their_turn_back(turns_server):
    """Clients that quit or reset right after a request leave no turn held."""

    def quit_or_reset(index: int) -> None:
        with connect(turns_server.address) as sock:
            sock.sendall(b"/quit\n" if index % 2 else b"/work 20000 bye\n")
            if index % 2 == 0:
                reset(sock)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(quit_or_reset, range(40)))
    poll_metrics(
        turns_server, "every connection closed", lambda m: m.sum("arena_connections_active") == 0
    )
    assert run_active_clients(turns_server, 10, 20) == 200
    assert_serves(turns_server)

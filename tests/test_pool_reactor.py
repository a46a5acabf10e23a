"""The pool's reactor in-process: real socketpairs, a real thread executor, no subprocess.

The test thread is the reactor thread: it hands the server one end of each socketpair
(`PoolServer.adopt`, what an accept does) and turns the loop by hand (`dispatch`, then
`submit_ready`), so a failure points at the step that went wrong. The batching policy itself
(`batching.plan_tasks`, `throttled`) is checked without sockets first.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from services import protocol
from services.config import Settings
from services.servers.batching import MAX_UNSENT_OUTPUT, is_slow, plan_tasks, throttled
from services.servers.pool import BATCH_FAILED_REPLY, WAKE, Connection, PoolServer

DEADLINE = 10.0  # seconds for anything the reactor waits on (a thread-pool task): generous


# -- the policy, without sockets -------------------------------------------------------------


def test_cheap_batches_share_one_task_per_worker_and_slow_ones_go_alone():
    batches = [[b"a"], [b"/sleep 1"], [b"/ping"], [b"b", b"/work 5 x"], [b"c"], [b"d"]]
    # Slow first, in order; then the four cheap batches in two shares of two.
    assert plan_tasks(batches, workers=2) == [[1], [3], [0, 2], [4, 5]]


def test_fewer_cheap_batches_than_workers_make_one_task_each():
    assert plan_tasks([[b"a"], [b"b"]], workers=8) == [[0], [1]]
    assert plan_tasks([], workers=2) == []


def test_slow_means_a_sleep_or_work_command_with_its_argument():
    assert is_slow([b"x", b"/sleep 10"]) and is_slow([b"/work 1"])
    assert not is_slow([b"/sleeper", b"/ping", b"//sleep 1"])


def test_a_client_is_throttled_only_past_the_unsent_limit():
    assert not throttled(MAX_UNSENT_OUTPUT)
    assert throttled(MAX_UNSENT_OUTPUT + 1)


# -- the reactor over socketpairs ------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[PoolServer]:
    """A pool server with two thread workers, never started: the test turns its loop."""
    pool = PoolServer(
        Settings(model="pool", executor="thread", workers=2, line_limit=64, idle_timeout=60)
    )
    pool.wake_reader.setblocking(False)
    pool.selector.register(pool.wake_reader, selectors.EVENT_READ, WAKE)
    yield pool
    for connection in list(pool.connections.values()):
        pool.close(connection, "shutdown")
    pool.pool.end()
    pool.selector.close()


def connect(server: PoolServer) -> tuple[Connection, socket.socket]:
    """A connection the server serves, and the client's end of it."""
    ours, theirs = socket.socketpair()
    connection = server.adopt(ours)
    assert connection is not None
    theirs.settimeout(DEADLINE)
    return connection, theirs


def turn(server: PoolServer, until: Callable[[], bool], what: str, submit: bool = True) -> None:
    """Run the reactor's loop (events, then submissions unless not `submit`) until `until()`."""
    deadline = time.monotonic() + DEADLINE
    while not until():
        assert time.monotonic() < deadline, f"the reactor never got to: {what}"
        server.dispatch(0.01)
        if submit and server.ready:
            server.submit_ready()


def read_lines(client: socket.socket, count: int) -> list[bytes]:
    """Exactly `count` reply lines (the server has sent them by now)."""
    data = b""
    while data.count(b"\n") < count:
        chunk = client.recv(65536)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data.splitlines(keepends=True)


def test_cheap_lines_of_many_connections_share_one_task_per_worker(server):
    pairs = [connect(server) for _ in range(6)]
    for index, (_connection, client) in enumerate(pairs):
        client.sendall(b"hello %d\n/ping\n" % index)
    turn(server, lambda: all(c.pending for c, _ in pairs), "reading every line", submit=False)
    before = server.submissions_total
    server.submit_ready()
    assert server.submissions_total - before == 2  # six connections, two workers: two tasks
    turn(server, lambda: not server.submissions, "delivering both tasks")
    for index, (_connection, client) in enumerate(pairs):
        assert read_lines(client, 2) == [b"HELLO %d\n" % index, b"PONG\n"]


def test_a_slow_request_goes_alone_and_does_not_hold_up_the_others(server):
    slow, slow_client = connect(server)
    cheap = [connect(server) for _ in range(3)]
    slow_client.sendall(b"/sleep 300 zzz\n")
    for _connection, client in cheap:
        client.sendall(b"quick\n")
    everyone = [slow, *(c for c, _ in cheap)]
    turn(server, lambda: all(c.pending for c in everyone), "reading", submit=False)
    before = server.submissions_total
    server.submit_ready()
    assert server.submissions_total - before == 3  # the sleep alone, the cheap ones in two
    turn(server, lambda: all(not c.inflight for c, _ in cheap), "answering the cheap lines")
    assert slow.inflight == 1, "the cheap replies waited for the /sleep"
    for _connection, client in cheap:
        assert read_lines(client, 1) == [b"QUICK\n"]
    turn(server, lambda: not slow.inflight, "answering the /sleep")
    assert read_lines(slow_client, 1) == [b"ZZZ\n"]


def test_a_client_that_does_not_read_stops_being_read_until_it_catches_up(server):
    connection, client = connect(server)
    client.setblocking(False)
    line = b"x" * 60 + b"\n"  # under the 64-byte limit; the echo doubles nothing, so many lines
    sent, unsent = 0, b""
    deadline = time.monotonic() + DEADLINE
    while not throttled(len(connection.output)):
        assert time.monotonic() < deadline, f"never throttled ({len(connection.output)} unsent)"
        if not unsent:
            unsent = line * 1000
        with contextlib.suppress(BlockingIOError):
            count = client.send(unsent)  # the rest next time: lines stay whole on the stream
            sent, unsent = sent + count, unsent[count:]
        server.dispatch(0.01)
        if server.ready:
            server.submit_ready()
    assert not connection.interest & selectors.EVENT_READ, "a throttled client is still read"
    assert connection.interest & selectors.EVENT_WRITE
    # The client reads everything: the output drains, reading and answering resume. Each
    # complete line comes back as a reply of the same length (a partial last line waits).
    expected = sent - sent % len(line)
    received = 0
    while received < expected:
        assert time.monotonic() < deadline + DEADLINE, f"{received} of {expected} bytes came back"
        with contextlib.suppress(BlockingIOError):
            while chunk := client.recv(1 << 20):
                received += len(chunk)
        server.dispatch(0.01)
        if server.ready:
            server.submit_ready()
    assert received == expected
    assert connection.interest & selectors.EVENT_READ


def test_an_overlong_line_is_answered_after_the_lines_before_it_then_closed(server):
    connection, client = connect(server)
    client.sendall(b"one\ntwo\n" + b"y" * 100 + b"\nthree\n")
    turn(server, lambda: connection.sock.fileno() < 0, "closing the connection")
    replies = b""
    while chunk := client.recv(65536):
        replies += chunk
    assert replies == b"ONE\nTWO\n" + protocol.line_too_long_reply(64)
    assert server.stats.close_reasons["line-too-long"] == 1
    assert server.stats.folded.errors == {"line-too-long": 1}


def test_a_task_that_raises_twice_is_answered_server_busy_and_the_connection_stays(
    server, monkeypatch, caplog
):
    connection, client = connect(server)
    real = protocol.answer_batches

    def buggy(batches: list[list[bytes]], *rest: object) -> list[list[protocol.Answer]]:
        if any(b"boom" in line for batch in batches for line in batch):
            raise RuntimeError("injected bug")
        return real(batches, *rest)

    monkeypatch.setattr(protocol, "answer_batches", buggy)
    client.sendall(b"boom\nfine\n")
    turn(server, lambda: connection.tally.errors.get("server-busy") == 2, "giving up on it")
    assert read_lines(client, 2) == [BATCH_FAILED_REPLY, BATCH_FAILED_REPLY]
    assert server.retried_requests == 2  # the batch ran once more before the answer
    assert server.stats.internal_errors == {"worker": 2}
    assert sum("a task raised" in r.getMessage() for r in caplog.records) == 2
    # The connection is still served.
    client.sendall(b"after\n")
    turn(server, lambda: connection.tally.requests != [0] * len(connection.tally.requests), "")
    assert read_lines(client, 1) == [b"AFTER\n"]
    assert connection.sock.fileno() >= 0


def test_quit_is_answered_and_closes_with_its_reason(server):
    connection, client = connect(server)
    client.sendall(b"bye now\n/quit\nnever answered\n")
    turn(server, lambda: connection.sock.fileno() < 0, "closing after /quit")
    replies = b""
    while chunk := client.recv(65536):
        replies += chunk
    assert replies.splitlines()[0] == b"BYE NOW"
    assert len(replies.splitlines()) == 2  # the /quit reply, and nothing for the line after it
    assert server.stats.close_reasons["quit"] == 1

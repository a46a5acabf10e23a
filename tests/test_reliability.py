"""The servers under hostile and long-running conditions, on every model, against real processes.

Each behaviour of issue 5 has a test here: slow readers, idle hordes, partial lines, connection
churn, garbage input (with a hypothesis property over the wire), and descriptor exhaustion.
The bounds the tests enforce are stated next to them and in docs/RELIABILITY.md. No test asserts
a duration: every wait polls with a deadline, and a deadline only turns a hang into a failure.
"""

from __future__ import annotations

import random
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from loadtest.tools.procs import Metrics
from services import protocol
from services.session import READ_SIZE
from tests.conftest import MODELS, RunningServer, small_flags
from tests.reliability_helpers import (
    MIB,
    connect,
    ensure_descriptors,
    expected_exchange,
    is_slow_request,
    poll,
    poll_metrics,
    push_until_stalled,
    read_exactly,
    read_until_closed,
    request,
    reset,
    scrape,
    server_fds,
    server_rss,
    wait_all_closed_by_server,
)

# Idle connections per model in the horde test: a thread each costs more than a greenlet or a
# selector entry, so the threaded server gets a fifth of the horde.
IDLE_HORDE = 5000
IDLE_HORDE_BY_MODEL = {"threaded": 1000}
ACTIVE_CLIENTS = 100
REQUESTS_PER_ACTIVE_CLIENT = 20

# Bounds (docs/RELIABILITY.md). Each slow reader may grow the server by at most this much...
SLOW_READERS = 4
SLOW_READER_RSS_BOUND = 16 * MIB
# ...and the server may hold at most this many of its bytes read but not yet answered out to
# the kernel: 64 KiB read + its replies on threaded/gevent (sendall blocks the reader), and
# 256 KiB of pending input or output plus the batches in flight on pool (PAUSE_READING_AT).
UNANSWERED_BOUND = 2 * MIB
CHURN_CYCLES = 20_000
CHURN_THREADS = 4
CHURN_RSS_BOUND = 16 * MIB
# Descriptors the server may hold above its baseline once churn is over (a log file rotating,
# a lazily opened /proc file): anything more is a leak that grows with the cycles.
FD_SLACK = 3


def start(server_factory, model: str, *args: str) -> RunningServer:
    """A server of `model` with the test's flags (the pool with 2 workers, as on 2 cores)."""
    return server_factory(model, *small_flags(model), *args)


def assert_serves(server: RunningServer) -> None:
    """A fresh client is answered, and the process is alive."""
    assert server.proc.poll() is None, f"server exited:\n{server.log_text()}"
    with connect(server.address) as sock:
        assert request(sock, b"/ping") == b"PONG\n"
        assert request(sock, b"still here") == b"STILL HERE\n"


def wait_open(server: RunningServer, at_least: int, why: str) -> None:
    """Poll until the server holds at least `at_least` connections."""
    poll_metrics(server, why, lambda m: m.sum("arena_connections_active") >= at_least)


def wait_none_open(server: RunningServer, why: str) -> Metrics:
    """Poll until the server holds no connection; returns that scrape."""
    return poll_metrics(server, why, lambda m: m.sum("arena_connections_active") == 0)


def assert_closed_when_idle(
    server: RunningServer, sockets: list[socket.socket], idle_timeout: float, what: str
) -> Metrics:
    """The server closes every socket at the idle timeout without sending it a byte, and counts
    each close as idle; returns the scrape that saw them all closed."""
    outcome = wait_all_closed_by_server(sockets, timeout=idle_timeout + 60.0)
    assert outcome["data"] == 0, f"{what}: {outcome}"
    metrics = wait_none_open(server, "every idle close to be counted")
    assert metrics.sum("arena_connections_closed_total", reason="idle") >= len(sockets)
    return metrics


def ping_from_new_clients(server: RunningServer, count: int, clients: list[socket.socket]) -> None:
    """Open `count` connections that each send /ping, added to `clients` (the caller closes)."""
    for _ in range(count):
        sock = connect(server.address)
        sock.sendall(b"/ping\n")
        clients.append(sock)


def wait_logged(server: RunningServer, text: str) -> None:
    """Poll the server's log until it holds `text`."""
    poll(f"{text!r} in the server's log", lambda: text in server.log_text(), timeout=30.0)


def report(record_property, name: str, value: object) -> None:
    """Show a measured figure in the test output and in the JUnit XML."""
    print(f"\n[reliability] {name} = {value}")
    record_property(name, value)


def run_active_clients(server: RunningServer, clients: int, requests: int) -> int:
    """`clients` concurrent connections each doing `requests` checked round trips; returns
    how many replies were right."""

    def one_client(index: int) -> int:
        right = 0
        with connect(server.address) as sock:
            for number in range(requests):
                text = b"client %d request %d" % (index, number)
                right += request(sock, text) == text.upper() + b"\n"
        return right

    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(one_client, range(clients)))


# -- slow readers ----------------------------------------------------------------------------

SLOW_PAYLOADS = {
    # 1000-byte echo lines: replies as large as the requests.
    "echo": (b"e" * 999 + b"\n") * 64,
    # 2-byte unknown commands: each answered by an 83-byte error, a 40x amplification.
    "amplified-errors": b"/\n" * 32768,
}


@pytest.mark.slow
@pytest.mark.parametrize("payload", SLOW_PAYLOADS.keys())
@pytest.mark.parametrize("model", MODELS)
def test_slow_readers_are_paused_while_others_are_served(
    server_factory, model, payload, record_property
):
    server = start(server_factory, model, "--idle-timeout", "120")
    assert_serves(server)
    baseline_rss = server_rss(server.proc.pid)

    # Tiny receive buffers on the slow clients, so the kernel cannot hide much of the backlog.
    slow = [connect(server.address, receive_buffer=16384) for _ in range(SLOW_READERS)]
    try:
        with ThreadPoolExecutor(SLOW_READERS) as pool:
            pushes = list(
                pool.map(
                    lambda sock: push_until_stalled(
                        sock, SLOW_PAYLOADS[payload], limit=64 * MIB, stall=3.0, timeout=120.0
                    ),
                    slow,
                )
            )
        for sent, stalled in pushes:
            assert stalled, f"the server read all {sent} bytes from a client that never reads"
        # Meanwhile everyone else is served.
        assert run_active_clients(server, 10, 20) == 200
        metrics = scrape(server)
        grown = server_rss(server.proc.pid) - baseline_rss
        report(
            record_property,
            f"{model}.{payload}.pushed_before_stall_bytes",
            [sent for sent, _ in pushes],
        )
        report(
            record_property,
            f"{model}.{payload}.rss_growth_per_slow_reader_bytes",
            grown // SLOW_READERS,
        )
        assert grown < SLOW_READERS * SLOW_READER_RSS_BOUND, (
            f"RSS grew by {grown / MIB:.1f} MiB for {SLOW_READERS} slow readers "
            f"(bound {SLOW_READER_RSS_BOUND / MIB:.0f} MiB each)"
        )
        if payload == "echo":
            unanswered = metrics.sum("arena_received_bytes_total") - metrics.sum(
                "arena_sent_bytes_total"
            )
            report(
                record_property,
                f"{model}.echo.unanswered_bytes_per_slow_reader",
                unanswered // SLOW_READERS,
            )
            assert unanswered <= SLOW_READERS * UNANSWERED_BOUND
    finally:
        for sock in slow:
            reset(sock)
    wait_none_open(server, "the slow readers' resets to be counted")
    assert_serves(server)


# -- idle hordes -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_idle_horde_is_closed_at_the_idle_timeout_while_active_clients_are_served(
    server_factory, model, record_property
):
    horde = IDLE_HORDE_BY_MODEL.get(model, IDLE_HORDE)
    idle_timeout = 8.0
    ensure_descriptors(horde + ACTIVE_CLIENTS)  # before the server starts: it inherits the limit
    server = start(server_factory, model, "--idle-timeout", str(idle_timeout))
    assert_serves(server)
    baseline_rss = server_rss(server.proc.pid)

    idle = []
    try:
        for _ in range(horde):
            idle.append(connect(server.address))
        wait_open(server, horde, f"{horde} idle connections to be accepted")
        per_connection = (server_rss(server.proc.pid) - baseline_rss) / horde
        report(record_property, f"{model}.rss_per_idle_connection_bytes", round(per_connection))

        answered = run_active_clients(server, ACTIVE_CLIENTS, REQUESTS_PER_ACTIVE_CLIENT)
        assert answered == ACTIVE_CLIENTS * REQUESTS_PER_ACTIVE_CLIENT
        # Reported, not asserted: how many were still open depends on the machine's speed.
        report(
            record_property,
            f"{model}.idle_connections_open_after_active_phase",
            scrape(server).sum("arena_connections_active"),
        )

        assert_closed_when_idle(server, idle, idle_timeout, "idle connections received bytes")
        assert_serves(server)
    finally:
        for sock in idle:
            sock.close()


# -- partial lines ---------------------------------------------------------------------------

PARTIAL_CLIENTS = 200
PARTIAL_BYTES = {"few": b"abc", "large": b"p" * 20_000}


@pytest.mark.parametrize("model", MODELS)
def test_partial_lines_hold_only_their_bytes_and_close_at_the_idle_timeout(
    server_factory, model, record_property
):
    idle_timeout = 3.0
    server = start(server_factory, model, "--idle-timeout", str(idle_timeout))
    assert_serves(server)
    clients = []
    try:
        # First as empty idle connections, to measure what a connection costs by itself...
        for _ in range(PARTIAL_CLIENTS):
            clients.append(connect(server.address))
        wait_open(server, PARTIAL_CLIENTS, "the clients to be accepted")
        empty_rss = server_rss(server.proc.pid)
        # ...then each sends the start of a line and stops.
        partials = [PARTIAL_BYTES["few" if i % 2 else "large"] for i in range(PARTIAL_CLIENTS)]
        for sock, partial in zip(clients, partials, strict=True):
            sock.sendall(partial)
        total = sum(map(len, partials))
        poll_metrics(
            server,
            "every partial byte to be read",
            lambda m: m.sum("arena_received_bytes_total") >= total,
        )
        held = server_rss(server.proc.pid) - empty_rss
        report(record_property, f"{model}.partial_lines_rss_growth_bytes", held)
        report(record_property, f"{model}.partial_lines_bytes_sent", total)
        # Their bytes, twice over for allocator rounding, plus 4 MiB of noise: a server that
        # reserved a line-limit or read-size buffer per connection would hold 13 MiB more.
        assert held <= 2 * total + 4 * MIB, f"held {held} bytes for {total} partial bytes"

        metrics = assert_closed_when_idle(
            server, clients, idle_timeout, "a partial line was answered"
        )
        assert metrics.sum("arena_requests_total") == 2  # assert_serves' only: no partial line
        assert_serves(server)
    finally:
        for sock in clients:
            sock.close()


# -- churn -----------------------------------------------------------------------------------


def churn(server: RunningServer, cycles: int, threads: int) -> int:
    """Connect, request, close `cycles` times over `threads` threads; returns the failures.

    Every other cycle ends with /quit, so the server closes first; the rest close client-first.
    """

    def worker(count: int, offset: int) -> int:
        failures = 0
        for number in range(offset, offset + count):
            try:
                with connect(server.address) as sock:
                    if number % 2:
                        ok = request(sock, b"/ping") == b"PONG\n"
                        ok = ok and request(sock, b"/quit") == b"BYE\n"
                    else:
                        ok = request(sock, b"churn %d" % number) == b"CHURN %d\n" % number
                failures += not ok
            except OSError:
                failures += 1
        return failures

    share = cycles // threads
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(worker, [share] * threads, range(0, cycles, share)))


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_churn_returns_descriptors_to_baseline_and_bounds_memory(
    server_factory, model, record_property
):
    server = start(server_factory, model, "--idle-timeout", "60")
    assert churn(server, 1000, CHURN_THREADS) == 0  # warm-up: caches, thread stacks, arenas
    wait_none_open(server, "the warm-up connections to close")
    baseline_fds = server_fds(server.proc.pid)
    baseline_rss = server_rss(server.proc.pid)
    before = scrape(server)

    assert churn(server, CHURN_CYCLES, CHURN_THREADS) == 0

    after = wait_none_open(server, "every churned connection to close")
    fds = poll(
        "descriptors back to baseline",
        lambda: (n := server_fds(server.proc.pid)) <= baseline_fds + FD_SLACK and n,
        timeout=30.0,
    )
    grown = server_rss(server.proc.pid) - baseline_rss
    report(record_property, f"{model}.churn_cycles", CHURN_CYCLES)
    report(record_property, f"{model}.churn_rss_growth_bytes", grown)
    report(record_property, f"{model}.churn_fds_before_after", f"{baseline_fds}/{fds}")
    assert grown < CHURN_RSS_BOUND, f"RSS grew by {grown / MIB:.1f} MiB over {CHURN_CYCLES} cycles"
    served = after.sum("arena_connections_total") - before.sum("arena_connections_total")
    assert served == CHURN_CYCLES
    quits = after.sum("arena_connections_closed_total", reason="quit") - before.sum(
        "arena_connections_closed_total", reason="quit"
    )
    assert quits == CHURN_CYCLES // 2
    assert_serves(server)


# -- garbage ---------------------------------------------------------------------------------

GARBAGE_LINE_LIMIT = 100
# Pieces that random bytes rarely hit but that matter to a line protocol.
INTERESTING_PIECES = [
    b"",
    b"/ping",
    b"/quit",
    b"/ping x",
    b"/",
    b"//x",
    b"/PING",
    b"\x00" * 5,
    b"\xff\xfe\xc3(",
    b"\xed\xa0\x80",
    b"abc\r",
    b"\r",
    b"\r\r",
    b"a\rb",
    b"x" * GARBAGE_LINE_LIMIT,
    b"y" * (GARBAGE_LINE_LIMIT + 1),
    b"/sleep",
    b"/sleep 0 z",
    b"/work 5 w",
    b"/sleep -1",
]
garbage_streams = st.lists(
    st.one_of(st.binary(max_size=160), st.sampled_from(INTERESTING_PIECES)), max_size=12
).map(b"\n".join)


@pytest.mark.parametrize("model", MODELS)
def test_any_bytes_are_answered_per_protocol_or_closed_and_counted(server_factory, model):
    server = start(server_factory, model, "--line-limit", str(GARBAGE_LINE_LIMIT))
    before = scrape(server)
    counted: dict[str, int] = {}

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(garbage_streams, st.booleans())
    @example(b"/ping\n/quit\nafter /quit", True)
    @example(b"before\n" + b"y" * (GARBAGE_LINE_LIMIT + 1) + b"\nafter", True)
    @example(b"z" * (GARBAGE_LINE_LIMIT + 1), False)  # overlong without a newline
    @example(b"\x00\xff\r\n/bogus\n/ping x\n/sleep x\r\r", False)
    def exchange(stream: bytes, finish_line: bool) -> None:
        stream += b"\n" if finish_line else b""
        assume(not is_slow_request(stream))
        expected = expected_exchange(stream, GARBAGE_LINE_LIMIT)
        with connect(server.address) as sock:
            sock.sendall(stream)
            if not expected.closes:
                sock.shutdown(socket.SHUT_WR)  # half-close: the server answers, then sees EOF
            replies, _ended = read_until_closed(sock)
        assert replies == expected.replies
        for code, count in expected.errors.items():
            counted[code] = counted.get(code, 0) + count

    exchange()
    assert server.proc.poll() is None, server.log_text()
    after = wait_none_open(server, "every connection to close")
    for code in protocol.ERROR_CODES:
        seen = after.sum("arena_protocol_errors_total", code=code) - before.sum(
            "arena_protocol_errors_total", code=code
        )
        assert seen == counted.get(code, 0), f"{code}: counted {seen}, sent {counted.get(code)}"
    assert_serves(server)


def seeded_random_stream(size: int, seed: int) -> bytes:
    """Random bytes from a fixed seed, without lines that would sleep, work or quit."""
    generator = random.Random(seed)
    stream = generator.randbytes(size)
    lines = [
        line for line in stream.split(b"\n") if not line.startswith((b"/sleep", b"/work", b"/quit"))
    ]
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("model", MODELS)
def test_garbage_never_crashes_the_server(server_factory, model):
    server = start(server_factory, model)
    before = scrape(server)

    # A megabyte of seeded random bytes (a line every 256 bytes on average): answered exactly.
    stream = seeded_random_stream(1 << 20, seed=5)
    expected = expected_exchange(stream, protocol.DEFAULT_LINE_LIMIT)
    assert not expected.closes
    with connect(server.address) as sock:
        sender = threading.Thread(target=sock.sendall, args=(stream,), daemon=True)
        sender.start()  # send and read at once: neither side may block the other
        replies = read_exactly(sock, len(expected.replies))
        sender.join(30.0)
    assert replies == expected.replies

    # NULs, invalid UTF-8 and \r without \n are data; a \r right before \n is dropped.
    odd = b"\x00\x00\x00\n\xff\xfe\xc3(abc\n\xed\xa0\x80\nab\rcd\r\n\r\r\r\n"
    with connect(server.address) as sock:
        sock.sendall(odd)
        assert read_exactly(sock, len(odd) - 2) == (
            b"\x00\x00\x00\n\xff\xfe\xc3(ABC\n\xed\xa0\x80\nAB\rCD\n\r\r\n"
        )

    # \r forever without \n is one endless line: refused at the limit, without a newline.
    with connect(server.address) as sock:
        endless = b"\r" * (protocol.DEFAULT_LINE_LIMIT + READ_SIZE)
        sender = threading.Thread(target=_send_ignoring_reset, args=(sock, endless), daemon=True)
        sender.start()
        replies, _ended = read_until_closed(sock)
        sender.join(30.0)
        assert replies == protocol.line_too_long_reply(protocol.DEFAULT_LINE_LIMIT)

    # A 1 MB line: ERR line-too-long, then the server closes (maybe with a reset, as the rest
    # of the megabyte is unread).
    with connect(server.address) as sock:
        sender = threading.Thread(
            target=_send_ignoring_reset, args=(sock, b"L" * MIB + b"\n"), daemon=True
        )
        sender.start()
        replies, _ended = read_until_closed(sock)
        sender.join(30.0)
        assert replies == protocol.line_too_long_reply(protocol.DEFAULT_LINE_LIMIT)

    # A reset in the middle of a large reply: 30 MB of replies asked for, a little read, RST.
    with connect(server.address, receive_buffer=65536) as sock:
        push_until_stalled(sock, b"r" * 59_999 + b"\n", limit=30 * MIB, stall=2.0, timeout=60.0)
        sock.setblocking(True)
        sock.settimeout(20.0)
        assert read_exactly(sock, 100_000) == b"R" * 59_999 + b"\n" + b"R" * 40_000
        reset(sock)

    after = wait_none_open(server, "the reset to be counted")

    def delta(name: str, **labels: str) -> float:
        return after.sum(name, **labels) - before.sum(name, **labels)

    assert delta("arena_connections_closed_total", reason="reset") >= 1
    assert delta("arena_connections_closed_total", reason="line-too-long") == 2
    assert delta("arena_protocol_errors_total", code="line-too-long") == 2
    assert delta("arena_protocol_errors_total", code="unknown-command") == expected.errors.get(
        "unknown-command", 0
    )
    assert delta("arena_received_bytes_total") >= len(stream) + len(odd)
    assert_serves(server)


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    """Send a payload the server may refuse half-way (it closes after an overlong line)."""
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server closed after the line-too-long reply: expected


# -- descriptor exhaustion -------------------------------------------------------------------

SPARE_SERVER_FDS = 12
EXHAUSTING_CLIENTS = 32
EXHAUSTION_HOLD = 2.0  # seconds the server stays out of descriptors
# The shortest pause between two failed accepts (base.accept_failed): a server that retried
# without backing off would fail thousands of times while out of descriptors.
MIN_ACCEPT_BACKOFF = 0.1


@pytest.mark.parametrize("model", MODELS)
def test_accept_emfile_is_logged_backed_off_and_recovered(server_factory, model, record_property):
    server = start(server_factory, model, "--idle-timeout", "120")
    assert_serves(server)
    wait_none_open(server, "the first clients to close")
    # Leave the running server only a few spare descriptors (prlimit(2) on its pid).
    limit = server_fds(server.proc.pid) + SPARE_SERVER_FDS
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))

    clients = []
    try:
        # The kernel completes every handshake; the server can accept only some of them.
        exhausted_at = time.monotonic()
        ping_from_new_clients(server, EXHAUSTING_CLIENTS, clients)
        wait_logged(server, "accept() failed")
        assert server.proc.poll() is None, server.log_text()
        # Stay out of descriptors for a while: the server must back off, not spin on accept().
        time.sleep(max(0.0, exhausted_at + EXHAUSTION_HOLD - time.monotonic()))
        # Free descriptors: the clients accepted first (and a few more) go away...
        waiting = clients[-SPARE_SERVER_FDS // 2 :]
        for sock in clients[: -SPARE_SERVER_FDS // 2]:
            sock.close()
        # ...and those that waited in the backlog are served.
        for sock in waiting:
            assert read_exactly(sock, 5) == b"PONG\n"
        assert_serves(server)
        metrics = scrape(server)
        exhausted_for = time.monotonic() - exhausted_at  # every failure counted happened in it
        failures = metrics.sum("arena_accept_errors_total", errno="EMFILE")
        report(record_property, f"{model}.accept_emfile_errors", failures)
        report(
            record_property,
            f"{model}.accept_failed_log_lines",
            server.log_text().count("accept() failed"),
        )
        assert failures > 0
        # An upper bound only: a slow machine retries less often, never more.
        assert failures <= exhausted_for / MIN_ACCEPT_BACKOFF + 2, (
            f"{failures:g} failed accepts in {exhausted_for:.1f} s: no back-off"
        )
    finally:
        for sock in clients:
            sock.close()


# -- thread exhaustion (threaded only: the other models start no thread per connection) ------

THREAD_ROOM = 40 * MIB  # address space left to the server: room for a few 8 MiB thread stacks
CLIENTS_BEYOND_THREADS = 10


def test_threaded_keeps_accepting_after_a_thread_cannot_start(server_factory):
    server = start(server_factory, "threaded", "--idle-timeout", "120")
    assert_serves(server)
    # Cap the running server's address space (prlimit(2)): soon no thread stack fits, and
    # `Thread.start()` raises RuntimeError("can't start new thread").
    address_space = psutil.Process(server.proc.pid).memory_info().vms + THREAD_ROOM
    # Only the soft limit: raising it back needs no privilege.
    resource.prlimit(server.proc.pid, resource.RLIMIT_AS, (address_space, resource.RLIM_INFINITY))
    clients = []
    try:
        ping_from_new_clients(server, CLIENTS_BEYOND_THREADS, clients)
        wait_logged(server, "can't start new thread")
        # Threads can start again.
        resource.prlimit(
            server.proc.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
        # Every client is answered or closed by the server; none is left hanging...
        for sock in clients:
            replies, _ended = read_until_closed_or_answered(sock)
            assert replies in (b"PONG\n", b"") or replies.startswith(b"ERR server-busy"), replies
        # ...and new clients are served.
        assert_serves(server)
    finally:
        for sock in clients:
            sock.close()


def read_until_closed_or_answered(sock: socket.socket) -> tuple[bytes, str]:
    """The first reply line, or what came before the server closed; fails on a timeout."""
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return data, "eof"
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    except TimeoutError:
        raise AssertionError(
            f"the server neither answered nor closed this connection (got {data!r})"
        ) from None
    return data, "answered"

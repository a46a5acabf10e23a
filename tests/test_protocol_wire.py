"""Protocol v1 over real sockets, byte for byte, on every model (docs/PROTOCOL.md)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from services import models
from tests.conftest import MODELS, RunningServer, launch_server, small_flags, stop_server
from tests.server_helpers import LineClient, exchange, scrape, wait_for_metrics


@pytest.fixture(scope="module", params=MODELS)
def wire_server(request) -> Iterator[RunningServer]:
    """One server per model shared by this module's tests (each test opens its own connections).

    Sharing keeps the module fast: the tests here only need a default server, and every test
    uses fresh connections, so they cannot disturb each other.
    """
    running = launch_server(request.param, *small_flags(request.param))
    yield running
    stop_server(running)


# Framing and echo ---------------------------------------------------------------------------

ECHO_CASES = [
    (b"hello world\n", b"HELLO WORLD\n"),
    (b"Hello, World! 123 _-+=~\n", b"HELLO, WORLD! 123 _-+=~\n"),
    (b"ALREADY UPPER\n", b"ALREADY UPPER\n"),
    (b"abc\r\n", b"ABC\n"),  # one \r before \n is dropped
    (b"abc\r\r\n", b"ABC\r\n"),  # only one
    (b"a\rb\n", b"A\rB\n"),  # a \r elsewhere is data
    (b"\n", b"\n"),  # empty line -> empty line
    (b"\r\n", b"\n"),
    (b"  spaced  out  \n", b"  SPACED  OUT  \n"),
    (b"\tTab\x0bvt\x0cff\n", b"\tTAB\x0bVT\x0cFF\n"),
]


@pytest.mark.parametrize(("request_bytes", "reply"), ECHO_CASES)
def test_echo_upper_cases_ascii_letters_and_keeps_framing(wire_server, request_bytes, reply):
    assert exchange(wire_server, request_bytes, 1) == reply


def test_echo_upper_cases_only_ascii_letters_in_arbitrary_bytes(wire_server):
    # NUL bytes, invalid UTF-8, bytes >= 0x80: all unchanged; only a-z change.
    garbage = b"x\x00nul\xff\xfe\xc3\xa9t\xe9\x80\x7fend\x00"
    expected = b"X\x00NUL\xff\xfe\xc3\xa9T\xe9\x80\x7fEND\x00\n"
    assert exchange(wire_server, garbage + b"\n", 1) == expected


def test_echo_of_every_byte_value_except_newline(wire_server):
    every_byte = bytes(value for value in range(256) if value != 0x0A)
    # Start with a letter so the line is plain text, end with one so no trailing \r is dropped.
    line = b"q" + every_byte + b"z"
    expected = (
        b"Q"
        + bytes(value - 32 if 0x61 <= value <= 0x7A else value for value in every_byte)
        + b"Z\n"
    )
    assert exchange(wire_server, line + b"\n", 1) == expected


# Commands -----------------------------------------------------------------------------------

COMMAND_CASES = [
    (b"/ping", b"PONG\n"),
    (b"/ping\r", b"PONG\n"),
    (b"/sleep 0", b"\n"),
    (b"/sleep 0 hi there", b"HI THERE\n"),
    (b"/sleep 10 x", b"X\n"),
    (b"/sleep 0  a", b" A\n"),  # TEXT starts after the single space following the number
    (b"/sleep 0 ", b"\n"),  # empty TEXT
    (b"/sleep 007 lead", b"LEAD\n"),  # leading zeros allowed
    (b"/sleep 0 /not a command", b"/NOT A COMMAND\n"),
    (b"/work 0 a", b"A\n"),
    (b"/work 1000 abc def", b"ABC DEF\n"),
    (b"/work 5", b"\n"),
    (b"/work 00000000000000000000000010 z", b"Z\n"),
    (b"//hello", b"/HELLO\n"),
    (b"//", b"/\n"),
    (b"//ping", b"/PING\n"),
    (b"///x", b"//X\n"),
]


@pytest.mark.parametrize(("line", "reply"), COMMAND_CASES)
def test_command_replies(wire_server, line, reply):
    assert exchange(wire_server, line + b"\n", 1) == reply


def test_work_and_sleep_accept_their_maximum(wire_server):
    # /work 10000000 is the documented maximum (about half a second of CPU here).
    assert exchange(wire_server, b"/work 10000000 max\n", 1) == b"MAX\n"


def test_quit_says_bye_then_closes(wire_server):
    with LineClient(wire_server.address) as client:
        client.send(b"/quit\n")
        assert client.read_line() == b"BYE\n"
        assert client.read_until_closed() == b""


def test_quit_stops_a_pipeline(wire_server):
    with LineClient(wire_server.address) as client:
        client.send(b"one\n/quit\nnever answered\n/ping\n")
        assert client.read_lines(2) == [b"ONE\n", b"BYE\n"]
        assert client.read_until_closed() == b""


# Errors -------------------------------------------------------------------------------------

# Lines answered `ERR CODE ...`, grouped by code.
UNKNOWN_COMMANDS = [
    b"/PING",  # commands are case-sensitive
    b"/nope",
    b"/",
    b"/pingx",
    b"/ sleep 1",
]
BAD_ARGUMENTS = [
    b"/ping x",
    b"/ping ",
    b"/quit now",
    b"/sleep",
    b"/sleep ",
    b"/sleep abc",
    b"/sleep -1",
    b"/sleep +5",
    b"/sleep 1x",
    b"/sleep 1.5",
    b"/sleep  5",  # two spaces: the number is missing
    b"/sleep 60001",
    b"/sleep 99999999999999999999999999999999",
    "/sleep \u0663".encode(),  # a non-ASCII digit
    b"/work",
    b"/work x",
    b"/work 10000001",
    b"/work -5",
]
ERROR_CASES = [(line, b"unknown-command") for line in UNKNOWN_COMMANDS] + [
    (line, b"bad-argument") for line in BAD_ARGUMENTS
]


@pytest.mark.parametrize(("line", "code"), ERROR_CASES)
def test_error_replies_and_the_connection_stays_open(wire_server, line, code):
    with LineClient(wire_server.address) as client:
        reply = client.request(line)
        assert reply.startswith(b"ERR " + code + b" "), reply
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1
        # Both codes keep the connection usable.
        assert client.request(b"/ping") == b"PONG\n"
        assert client.request(b"still here") == b"STILL HERE\n"


def test_sleep_range_is_checked_on_the_value_not_the_digit_count(wire_server):
    # Leading zeros are allowed, so the range applies to the number, not its spelling.
    reply = exchange(wire_server, b"/sleep 060001\n", 1)
    assert reply.startswith(b"ERR bad-argument ")
    assert exchange(wire_server, b"/sleep 0000000000000000000000 ok\n", 1) == b"OK\n"


# Line limit (default 65536) -----------------------------------------------------------------


def test_line_of_exactly_the_default_limit_is_answered(wire_server):
    line = b"a" * 65536
    assert exchange(wire_server, line + b"\n", 1) == b"A" * 65536 + b"\n"


def test_line_of_limit_with_carriage_return_counts_the_cr(wire_server):
    line = b"b" * 65535 + b"\r"
    assert exchange(wire_server, line + b"\n", 1) == b"B" * 65535 + b"\n"
    with LineClient(wire_server.address) as client:
        client.send(b"b" * 65536 + b"\r\n")
        reply = client.read_line()
        assert reply.startswith(b"ERR line-too-long ")
        assert client.read_until_closed() == b""


def test_line_over_the_default_limit_is_refused_and_closed(wire_server):
    with LineClient(wire_server.address) as client:
        client.send(b"before\n" + b"c" * 65537 + b"\nafter\n")
        assert client.read_line() == b"BEFORE\n"
        reply = client.read_line()
        assert reply.startswith(b"ERR line-too-long ")
        assert client.read_until_closed() == b""


def test_endless_line_without_newline_is_refused_without_waiting_for_the_newline(wire_server):
    # The server must give up once the limit is passed, not buffer until a newline arrives.
    with LineClient(wire_server.address) as client:
        client.send(b"d" * 200_000)
        reply = client.read_line()
        assert reply.startswith(b"ERR line-too-long ")
        assert client.read_until_closed() == b""


# Pipelining and ordering --------------------------------------------------------------------


def test_thousand_pipelined_requests_in_one_send_are_answered_in_order(wire_server):
    requests, replies = [], []
    for number in range(1000):
        kind = number % 5
        if kind == 0:
            requests.append(b"line %d abc" % number)
            replies.append(b"LINE %d ABC\n" % number)
        elif kind == 1:
            requests.append(b"/ping")
            replies.append(b"PONG\n")
        elif kind == 2:
            requests.append(b"/sleep 0 s%d" % number)
            replies.append(b"S%d\n" % number)
        elif kind == 3:
            requests.append(b"/work 10 w%d" % number)
            replies.append(b"W%d\n" % number)
        else:
            requests.append(b"//slash %d" % number)
            replies.append(b"/SLASH %d\n" % number)
    with LineClient(wire_server.address) as client:
        client.send(b"".join(line + b"\n" for line in requests))
        assert client.read_lines(1000) == replies


def test_pipelined_slow_request_keeps_order(wire_server):
    with LineClient(wire_server.address) as client:
        client.send(b"/sleep 200 first\nsecond\n/work 1000 third\n/ping\n")
        assert client.read_lines(4) == [b"FIRST\n", b"SECOND\n", b"THIRD\n", b"PONG\n"]


def test_request_split_across_many_sends_is_one_request(wire_server):
    with LineClient(wire_server.address) as client:
        for piece in (b"/sl", b"eep 0 ", b"sp", b"lit\r", b"\n"):
            client.send(piece)
        assert client.read_line() == b"SPLIT\n"
        client.send(b"a\nb")
        assert client.read_line() == b"A\n"
        client.send(b"c\n")
        assert client.read_line() == b"BC\n"


def test_errors_inside_a_pipeline_keep_their_place(wire_server):
    with LineClient(wire_server.address) as client:
        client.send(b"x\n/bogus\ny\n/sleep nope\nz\n")
        lines = client.read_lines(5)
    assert lines[0] == b"X\n"
    assert lines[1].startswith(b"ERR unknown-command ")
    assert lines[2] == b"Y\n"
    assert lines[3].startswith(b"ERR bad-argument ")
    assert lines[4] == b"Z\n"


def test_half_closed_client_still_gets_every_reply(wire_server):
    with LineClient(wire_server.address) as client:
        client.send(b"/sleep 100 first\n/ping\nlast\n")
        client.sock.shutdown(socket.SHUT_WR)  # "no more requests", as `nc -N` does
        assert client.read_lines(3) == [b"FIRST\n", b"PONG\n", b"LAST\n"]
        assert client.read_until_closed() == b""


def test_half_close_while_a_request_runs_still_answers_later_lines(wire_server):
    received_before = scrape(wire_server).value("arena_received_bytes_total")
    with LineClient(wire_server.address) as client:
        client.send(b"/sleep 300 running\n")
        wait_for_metrics(
            wire_server,
            lambda m: m.value("arena_received_bytes_total") >= received_before + client.sent_bytes,
        )
        client.send(b"queued\n")  # arrives while the sleep runs
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_lines(2) == [b"RUNNING\n", b"QUEUED\n"]
        assert client.read_until_closed() == b""


# Clients that misbehave ---------------------------------------------------------------------


def test_client_reset_mid_request_does_not_take_the_server_down(wire_server):
    for _ in range(5):
        doomed = LineClient(wire_server.address)
        doomed.send(b"/sleep 100 lost\n")
        doomed.reset()
        partial = LineClient(wire_server.address)
        partial.send(b"half a li")
        partial.reset()
    with LineClient(wire_server.address) as client:
        assert client.request(b"/ping") == b"PONG\n"
        assert client.request(b"/sleep 150 alive") == b"ALIVE\n"
    assert wire_server.proc.poll() is None


def test_client_that_closes_without_reading_replies_does_not_hurt_others(wire_server):
    rude = LineClient(wire_server.address)
    rude.send(b"big " * 10_000 + b"\n" + b"/work 1000\n" * 100)
    rude.close()
    with LineClient(wire_server.address) as client:
        assert client.request(b"fine") == b"FINE\n"
    assert wire_server.proc.poll() is None


def test_metrics_endpoint_answers_while_serving(wire_server):
    with LineClient(wire_server.address) as client:
        assert client.request(b"/ping") == b"PONG\n"
        metrics = scrape(wire_server)
    assert metrics.value("arena_server_info", model=models.target(wire_server.model)[0].name) == 1

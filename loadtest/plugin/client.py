"""A TCP line client for Locust: one request, one validated reply line, one request event.

Rules it keeps (see docs/LOADTEST.md):
- every socket has a timeout, for connecting and for each reply;
- a reply is read to its newline and compared with the exact expected text; a wrong reply is a
  failure whose message shows both;
- on any error the socket is closed at once and the next request reconnects, so a dead socket is
  never reused (Locust's ``events.request.measure()`` would swallow the error and keep it); the
  one exception is a database error reply (``ERR backend-unavailable ...``, ``ERR backend-busy
  ...``): a whole line was read and the server keeps the connection open, so the failure is
  counted, named by that line, and the connection kept;
- connecting is timed and reported as its own row (name ``connect``);
- the name is resolved again at every connect and one of its addresses taken in turn, so the
  users of one target spread over every replica behind its name (Docker's DNS returns each
  replica's address; a replica that comes or goes is seen at the next connect, and one that
  refuses is passed over for the next address);
- it never raises into the task: every outcome becomes exactly one request event.

In arrival-rate mode (``loadtest.plugin.arrivals``) a request has an *intended* start on a
timetable:
the latency reported (Locust's response time) runs from that instant, so time spent waiting for
a free connection or behind a stalled server counts; the service time (send to answer) travels
beside it in the event's context (``SERVICE_S``), with ``LATE`` saying that no connection was
free when the request was due.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

# The protocol's own list (the Locust image ships services/protocol.py).
from services.protocol import BACKEND_REPLIES

if TYPE_CHECKING:
    from loadtest.plugin.arrivals import Start

CONNECT = "connect"
READ_SIZE = 65536
# A reply may be longer than expected only by an error message; more than this is a broken stream.
REPLY_SLACK = 1024
# Keys of a request event's context (read by loadtest.plugin.exporter).
SERVICE_S = "service_s"  # seconds from sending the request to reading its reply
LATE = "late_start"  # an arrival-rate start that found no free connection when it was due
# Error replies to /db after which the server keeps the connection open (docs/PROTOCOL.md): the
# database failed, not the stream, so reconnecting would only add a connect per failure.
BACKEND_ERRORS = tuple(code.encode() for code in BACKEND_REPLIES)
# A failure's name in Locust's tables is its text: bounded, so a broken server cannot flood them.
BACKEND_ERROR_LIMIT = 200
# (host, port) -> every address it stands for now, in any order.
Resolver = Callable[[str, int], list[tuple[str, int]]]
# One turn counter per name in this process: the users of one target take its replicas in turn,
# whatever the other targets do (one shared counter would skew with three targets on three
# replicas). next() on itertools.count is atomic, so threads and greenlets may share it.
_turns: dict[tuple[str, int], Iterator[int]] = {}


def resolve(host: str, port: int) -> list[tuple[str, int]]:
    """Every TCP address `host` resolves to now (getaddrinfo, so /etc/hosts and DNS count)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(str(info[4][0]), int(info[4][1])) for info in infos]


def addresses_in_turn(
    address: tuple[str, int], resolver: Resolver = resolve
) -> list[tuple[str, int]]:
    """The name's current addresses, starting with the next one in turn (the rest are the
    fallbacks, in order: `localhost` may name ::1 where only 127.0.0.1 listens)."""
    # Sorted, so the turn does not depend on the order a DNS server shuffled the records into.
    addresses = sorted(set(resolver(*address)))
    if not addresses:
        raise OSError(f"{address[0]} resolves to no address")
    start = next(_turns.setdefault(address, itertools.count())) % len(addresses)
    return addresses[start:] + addresses[:start]


def connect_first(
    addresses: list[tuple[str, int]], timeout: float
) -> tuple[socket.socket, tuple[str, int]]:
    """A connection to the first of `addresses` that accepts one, and that address; the last
    error when none does."""
    error: OSError = OSError("no address to connect to")
    for address in addresses:
        try:
            return socket.create_connection(address, timeout=timeout), address
        except OSError as refused:
            error = refused
    raise error


class ReplyError(Exception):
    """The server answered, but not with what the protocol promises."""


class WrongReply(ReplyError):
    """The reply line differs from the expected text."""

    def __init__(self, command: str, expected: bytes, actual: bytes) -> None:
        super().__init__(
            f"wrong reply to {command}: expected {shorten(expected)} got {shorten(actual)}"
        )


class BackendError(ReplyError):
    """The server's database failed this request (``ERR backend-...``); the connection is fine."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply[:BACKEND_ERROR_LIMIT].decode("ascii", "replace"))

    def __repr__(self) -> str:
        # Locust names a failure by the exception's repr: show the server's line as it is.
        return str(self)


def is_backend_error(reply: bytes) -> bool:
    """Whether `reply` (without its newline) is one of the database's error replies."""
    code = reply.removeprefix(b"ERR ").partition(b" ")[0]
    return reply.startswith(b"ERR ") and code in BACKEND_ERRORS


class ConnectionClosed(ReplyError):
    """The server closed the connection before a whole reply line arrived."""


class ReplyTooLong(ReplyError):
    """No newline within the expected length plus slack."""


def shorten(data: bytes, limit: int = 60) -> str:
    """A readable, bounded rendering of a reply for failure messages."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[: limit - 16]!r}...{data[-12:]!r} ({len(data)} bytes)"


class LineClient:
    """One connection to one target; reconnects lazily after any failure."""

    def __init__(
        self,
        target: str,
        address: tuple[str, int],
        request_event: Any,
        connect_timeout: float = 10.0,
        resolver: Resolver = resolve,
    ) -> None:
        self.target = target
        self.address = address
        self.resolver = resolver
        # The replica the current connection went to (None before the first connect).
        self.peer: tuple[str, int] | None = None
        self.connect_timeout = connect_timeout
        self.consecutive_connect_failures = 0
        self._request_event = request_event
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    @property
    def connected(self) -> bool:
        """Whether a socket is open (it is dropped after any failure)."""
        return self._sock is not None

    def retarget(self, address: tuple[str, int]) -> None:
        """Point at a new address; the current connection (if any) is closed."""
        if address != self.address:
            self.close()
            self.address = address

    def close(self) -> None:
        """Close the connection; the next request opens a fresh one."""
        sock, self._sock = self._sock, None
        self._buffer.clear()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def request(
        self,
        command: str,
        line: bytes,
        expected: bytes,
        timeout: float,
        start: Start | None = None,
    ) -> bool:
        """Send one line, read one reply line, check it; fire one request event. True on success.

        `start` is the request's place in the timetable in arrival-rate mode: the latency
        reported then counts from when it was due, connecting included.
        """
        if self._sock is None and not self._connect():
            return False
        sock = self._sock
        assert sock is not None
        start_time = time.time()
        started = time.perf_counter()
        intended, late = (start.due, start.late) if start is not None else (started, False)
        start_time -= started - intended
        try:
            sock.settimeout(timeout)
            sock.sendall(line)
            reply = self._read_line(sock, len(expected) + REPLY_SLACK)
            answered = time.perf_counter()
            if reply != expected:
                if is_backend_error(reply):
                    raise BackendError(reply)
                raise WrongReply(command, expected, reply)
        except Exception as error:  # every failure is reported, none escapes the task
            answered = time.perf_counter()
            # After any other error the stream position is unknown: never reuse this socket.
            if not isinstance(error, BackendError):
                self.close()
            context = {SERVICE_S: answered - started, LATE: late}
            self._fire(command, answered - intended, 0, start_time, error, context)
            return False
        context = {SERVICE_S: answered - started, LATE: late}
        self._fire(command, answered - intended, len(reply) + 1, start_time, None, context)
        return True

    def missed(self, command: str, intended: float, error: Exception) -> None:
        """Report an arrival-rate start that waited for a connection longer than its timeout."""
        waited = time.perf_counter() - intended
        start_time = time.time() - waited
        self._fire(command, waited, 0, start_time, error, {SERVICE_S: 0.0, LATE: True})

    def _connect(self) -> bool:
        start_time = time.time()
        started = time.perf_counter()
        try:
            candidates = addresses_in_turn(self.address, self.resolver)
            sock, self.peer = connect_first(candidates, self.connect_timeout)
            # Request/reply traffic: do not let Nagle hold back a small request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except Exception as error:  # reported as a failed connect, never raised
            self.consecutive_connect_failures += 1
            self._fire(CONNECT, time.perf_counter() - started, 0, start_time, error)
            return False
        self.consecutive_connect_failures = 0
        self._sock = sock
        self._buffer.clear()
        self._fire(CONNECT, time.perf_counter() - started, 0, start_time, None)
        return True

    def _read_line(self, sock: socket.socket, limit: int) -> bytes:
        searched = 0
        while True:
            newline = self._buffer.find(b"\n", searched)
            if newline >= 0:
                reply = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                return reply
            if len(self._buffer) > limit:
                raise ReplyTooLong(f"no newline within {limit} bytes of reply")
            searched = len(self._buffer)
            chunk = sock.recv(READ_SIZE)
            if not chunk:
                raise ConnectionClosed("server closed the connection before replying")
            self._buffer += chunk

    def _fire(
        self,
        name: str,
        elapsed: float,
        length: int,
        start_time: float,
        error: Exception | None,
        context: dict[str, Any] | None = None,
    ) -> None:
        self._request_event.fire(
            request_type=self.target,
            name=name,
            response_time=elapsed * 1000.0,
            response_length=length,
            exception=error,
            context=context if context is not None else {SERVICE_S: elapsed, LATE: False},
            start_time=start_time,
            url=None,
        )

"""Helpers for the reliability tests: process probes, descriptor limits, raw misbehaving clients.

Everything here is bounded: every wait has a deadline and every loop a count, so a server that
misbehaves fails the test instead of hanging it.
"""

from __future__ import annotations

import resource
import selectors
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from loadtest.tools import procs
from loadtest.tools.procs import poll_until as poll  # noqa: F401  (re-exported for the tests)
from services import protocol
from tests.server_helpers import poll_metrics as poll_metrics
from tests.server_helpers import scrape as scrape

MIB = 1024 * 1024
# A reply this late means the server is stuck, not slow (generous for a loaded 2-core CI box).
REPLY_TIMEOUT = 20.0
# Descriptors the test process itself needs beyond the connections it opens (pytest, pipes...).
SPARE_DESCRIPTORS = 200


# -- the server as a set of processes, and its metrics ---------------------------------------


def server_rss(pid: int) -> int:
    """Resident memory of the server and its workers, in bytes."""
    return procs.tree_rss(pid)


def server_fds(pid: int) -> int:
    """Open descriptors of the server process (workers own no sockets)."""
    return procs.proc_sample(pid).fds


# -- descriptors -----------------------------------------------------------------------------


def ensure_descriptors(count: int) -> None:
    """Raise this process's RLIMIT_NOFILE (servers started later inherit it) or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + SPARE_DESCRIPTORS
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(
            f"needs {needed} open files but the hard RLIMIT_NOFILE is {hard} "
            f"(raise it, e.g. `ulimit -Hn {needed}` or LimitNOFILE= in the service)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# -- raw clients -----------------------------------------------------------------------------


def connect(
    address: tuple[str, int], timeout: float = REPLY_TIMEOUT, receive_buffer: int | None = None
) -> socket.socket:
    """A client socket (optionally with a small receive buffer, set before the handshake)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """Read `size` bytes; fails on EOF first (the socket's timeout bounds each read)."""
    chunks, missing = [], size
    while missing:
        chunk = sock.recv(min(missing, 1 << 20))
        if not chunk:
            raise AssertionError(f"EOF after {size - missing} of {size} bytes")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def read_until_closed(sock: socket.socket, limit: int = 64 * MIB) -> tuple[bytes, str]:
    """Everything until the server ends the connection, and how it ended ('eof' or 'reset')."""
    chunks, received = [], 0
    while received <= limit:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)
        received += len(chunk)
    raise AssertionError(f"more than {limit} bytes and the connection is still open")


def request(sock: socket.socket, line: bytes) -> bytes:
    """Send one request line and read exactly one reply line."""
    sock.sendall(line + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"EOF before a whole reply; got {reply!r}")
        reply += chunk
    return reply


def reset(sock: socket.socket) -> None:
    """Abort with a TCP RST (SO_LINGER 0), like a client that crashed."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def push_until_stalled(
    sock: socket.socket, chunk: bytes, limit: int, stall: float, timeout: float
) -> tuple[int, bool]:
    """Send `chunk` repeatedly without reading until `limit` bytes went out or no byte went
    out for `stall` seconds; returns (bytes sent, stalled). `timeout` bounds the whole push."""
    sock.setblocking(False)
    sent, offset = 0, 0
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        while sent < limit and time.monotonic() < deadline:
            if not selector.select(stall):
                return sent, True
            try:
                count = sock.send(chunk[offset:] if offset else chunk)
            except BlockingIOError:
                continue
            sent += count
            offset = (offset + count) % len(chunk)
    return sent, False


def wait_all_closed_by_server(socks: Iterable[socket.socket], timeout: float) -> dict[str, int]:
    """Wait until the server has ended every connection; count how each ended.

    Returns {'eof': n, 'reset': n, 'data': n}: 'data' counts connections that received bytes
    (an idle connection must receive nothing before its EOF).
    """
    outcome = {"eof": 0, "reset": 0, "data": 0}
    pending = list(socks)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for sock in pending:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        remaining = len(pending)
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{remaining} of {len(pending)} connections still open after {timeout} s"
                )
            for key, _ in selector.select(min(left, 1.0)):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data, ended = b"", "reset"
                else:
                    ended = "eof"
                if data:
                    outcome["data"] += 1
                    continue
                outcome[ended] += 1
                selector.unregister(sock)
                remaining -= 1
    return outcome


# -- the protocol as an oracle ---------------------------------------------------------------


@dataclass
class Expected:
    """What a server must send back for a byte stream, and the errors it must count."""

    replies: bytes
    errors: dict[str, int]
    closes: bool  # the server ends the connection itself (/quit or line-too-long)


def expected_exchange(stream: bytes, line_limit: int) -> Expected:
    """Replies for a complete stream per docs/PROTOCOL.md, computed with the pure protocol module.

    Only the complete lines are answered; a partial line longer than the limit also closes.
    """
    *lines, partial = stream.split(b"\n")
    replies, errors = [], {}
    for line in lines:
        if len(line) > line_limit:
            break
        answer = protocol.answer(line[:-1] if line.endswith(b"\r") else line)
        replies.append(answer.reply)
        if answer.error:
            errors[answer.error] = errors.get(answer.error, 0) + 1
        if answer.close:
            return Expected(b"".join(replies), errors, True)
    else:
        if len(partial) <= line_limit:
            return Expected(b"".join(replies), errors, False)
    replies.append(protocol.line_too_long_reply(line_limit))
    errors["line-too-long"] = errors.get("line-too-long", 0) + 1
    return Expected(b"".join(replies), errors, True)


def is_slow_request(stream: bytes) -> bool:
    """Whether a stream asks for a /sleep or /work long enough to slow a test down."""
    for line in stream.split(b"\n"):
        command, _, rest = line.rstrip(b"\r").partition(b" ")
        number = rest.partition(b" ")[0]
        if command in (b"/sleep", b"/work") and number.isdigit() and int(number) > 1000:
            return True
    return False

"""Small client-side helpers for the black-box server tests: line sockets and scraped metrics."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable

import pytest

from loadtest.tools import procs

# Long enough for a loaded 2-core CI machine, short enough that a hung server fails the test
# instead of eating the whole pytest timeout.
REPLY_TIMEOUT = 15.0


class LineClient:
    """A blocking TCP client that sends raw bytes and reads reply lines, always with a timeout."""

    def __init__(self, address: tuple[str, int], timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buffer = b""
        self.sent_bytes = 0
        self.received_bytes = 0

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes exactly as given (one sendall, so pipelined lines leave together)."""
        self.sock.sendall(data)
        self.sent_bytes += len(data)

    def _fill(self) -> bool:
        """Read once more into the buffer; False on end of stream (EOF or a reset)."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        if not data:
            return False
        self.received_bytes += len(data)
        self.buffer += data
        return True

    def read_line(self) -> bytes:
        """One reply line including its newline; fails the test on EOF before a full line."""
        while b"\n" not in self.buffer:
            if not self._fill():
                raise AssertionError(f"connection ended before a full line; got {self.buffer!r}")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read_lines(self, count: int) -> list[bytes]:
        """Exactly `count` reply lines, in order."""
        return [self.read_line() for _ in range(count)]

    def request(self, line: bytes) -> bytes:
        """Send one request line (newline added) and return its reply line."""
        self.send(line + b"\n")
        return self.read_line()

    def read_until_closed(self) -> bytes:
        """Everything the server still sends until it ends the connection (EOF or reset)."""
        while self._fill():
            pass
        rest, self.buffer = self.buffer, b""
        return rest

    def is_closed_by_server(self) -> bool:
        """True if the server has ended the connection, without waiting (peeks, reads nothing)."""
        previous = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(previous)

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0, then close), like a crashed client."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        """Close normally (FIN)."""
        self.sock.close()


def exchange(server, payload: bytes, reply_lines: int) -> bytes:
    """Send raw bytes on a fresh connection and return exactly `reply_lines` reply lines."""
    with LineClient(server.address) as client:
        client.send(payload)
        return b"".join(client.read_lines(reply_lines))


def expected_echo(text: bytes) -> bytes:
    """The protocol's echo: ASCII a-z upper-cased, every other byte unchanged, newline added."""
    return text.upper() + b"\n"


# One /metrics page parsed with prometheus_client's parser (the toolkit's; every test uses it).
Metrics = procs.Metrics


def scrape(server) -> Metrics:
    """Scrape the server's /metrics once and parse it."""
    return Metrics(server.metrics_text())


def poll_metrics(
    server,
    what: str,
    condition: Callable[[Metrics], bool],
    timeout: float = 30.0,
    interval: float = 0.1,
) -> Metrics:
    """Scrape until `condition` holds; returns that scrape (on timeout the last one is shown)."""
    last: list[Metrics] = []

    def check() -> Metrics | None:
        last[:] = [scrape(server)]
        return last[0] if condition(last[0]) else None

    return procs.poll_until(
        what, check, timeout, interval, explain=lambda: last[0].text if last else ""
    )


def wait_for_metrics(
    server, predicate: Callable[[Metrics], bool], timeout: float = 20.0, interval: float = 0.05
) -> Metrics:
    """Scrape until `predicate` holds (bounded); returns the scrape that satisfied it."""
    return poll_metrics(server, "a metrics condition", predicate, timeout, interval)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test with `what` when the deadline passes."""
    procs.poll_until(what, predicate, timeout, 0.05)


def promtool_check(text: str) -> str:
    """Run `promtool check metrics` on exposition text; return its output (empty when clean).

    Skips when promtool is missing, except in CI (env CI set), where it must run.
    """
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (Debian package `prometheus`)")
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).decode(errors="replace").strip()
    assert result.returncode == 0, f"promtool exit {result.returncode}: {output}"
    return output


# Live processes of a server's session: the server and its workers, even re-parented ones
# (every server the tests start leads its own session).
processes_in_session = procs.session_members

"""Small client-side helpers for the black-box server tests: line sockets and scraped metrics."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

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


def expected_echo(text: bytes) -> bytes:
    """The protocol's echo: ASCII a-z upper-cased, every other byte unchanged, newline added."""
    return text.upper() + b"\n"


class Metrics:
    """One scrape of Prometheus text, indexed by sample name (e.g. `arena_requests_total`)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def has(self, name: str) -> bool:
        """Whether any sample with this exact name was exposed."""
        return name in self.samples

    def matching(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Samples of `name` whose labels include every given label."""
        return [
            (sample_labels, value)
            for sample_labels, value in self.samples.get(name, [])
            if all(sample_labels.get(key) == wanted for key, wanted in labels.items())
        ]

    def sum(self, name: str, **labels: str) -> float:
        """Sum of the matching samples; 0 when none is exposed (an untouched labelled counter)."""
        return sum(value for _, value in self.matching(name, **labels))

    def value(self, name: str, **labels: str) -> float:
        """The single matching sample's value; fails when there is not exactly one."""
        found = self.matching(name, **labels)
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return found[0][1]

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value the given label takes on the samples of `name`."""
        return {labels[label] for labels, _ in self.samples.get(name, []) if label in labels}


def scrape(server) -> Metrics:
    """Scrape the server's /metrics once and parse it."""
    return Metrics(server.metrics_text())


def wait_for_metrics(
    server, predicate: Callable[[Metrics], bool], timeout: float = 20.0, interval: float = 0.05
) -> Metrics:
    """Scrape until `predicate` holds (bounded); returns the scrape that satisfied it."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(server)
        if predicate(metrics):
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics condition not met within {timeout} s:\n{metrics.text}")
        time.sleep(interval)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail the test with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


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


def processes_in_session(session_id: int) -> list[int]:
    """Live (non-zombie) processes whose session is `session_id`: a server and its workers.

    The test launcher starts each server in a new session, so this finds every process it
    forked, even after they were re-parented.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue  # the process ended while we looked
        # Fields after the command name (which may hold spaces or parentheses).
        fields = stat[stat.rindex(b")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == session_id and state != b"Z":
            found.append(int(entry))
    return found

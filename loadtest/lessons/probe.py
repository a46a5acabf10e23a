"""The blocked-loop probe: which echoes waited for the rest of a /work that was running.

A p99 cannot tell a loop that stops for a long request from a fast one that stops less often:
it depends on how many echoes a model fits between blocks. This probe looks at the mechanism
itself. One connection asks for a long /work again and again; a few others send echoes with a
short pause between them. Every request's send and reply times are kept (one clock, one
process), and afterwards each echo *sent while a /work was running* (after the /work's start,
with enough of it left) is classed: answered before that /work's reply, or only after it (its
wait covered the rest of the /work). An event loop that computes /work inline answers none of
them before; OS threads, preempted every switch interval, answer nearly all.

Standard library only; one thread with `selectors`, pinned to the load generator's core by the
caller (`loadtest.lessons.rig.measure_probe`), so its own scheduling never sits on the server's
core. It waits for every reply before it returns: the echoes that waited for the last /work
count too. Over repetitions the counts add up (`combine`).
"""

from __future__ import annotations

import selectors
import socket
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ECHO_LINE = b"probe\n"
# A /work is "running" from its send plus this lead (the request still crossing the loopback,
# the server finishing the echo it was on) to its reply.
LEAD_S = 0.002
# An echo "answered before" the /work came back at least this long before its reply; closer
# than this the two replies are one wake-up of the client apart.
SAME_WAKE_S = 0.001


# The figures that add up over repetitions (counts); the others are medians of them.
COUNTS = (
    "work_requests",
    "echo_requests",
    "echoes_during_work",
    "echoes_waited_whole_work",
    "probe_errors",
)


@dataclass(frozen=True)
class Probe:
    """What one probe run sends: the /work's rounds, the time left that makes an echo count,
    and the echo connections with their pause between a reply and the next request."""

    work_rounds: int
    left_s: float
    echo_connections: int = 8
    echo_pause_s: float = 0.002


@dataclass
class Connection:
    """One probe connection: its socket, what it sent, what came back."""

    sock: socket.socket
    kind: str  # "work" or "echo"
    line: bytes
    sent_at: float = 0.0
    buffer: bytes = b""
    resume_at: float = 0.0  # an echo connection sends its next request from then
    pause_s: float = 0.0  # between a reply and the next request (echo connections)
    waiting: bool = False
    spans: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered) per reply


@dataclass(frozen=True)
class Reading:
    """What the probe saw: every /work and echo span, and how the echoes during a /work ended."""

    work_spans: tuple[tuple[float, float], ...]
    echo_spans: tuple[tuple[float, float], ...]
    during: int  # echoes sent while a /work ran with at least `left_s` of it to go
    covered: int  # of those, answered only after that /work's reply (they waited for all of it)
    left_s: float
    errors: int
    replies: tuple[int, ...] = ()  # replies per connection, the /work connection first

    @property
    def covered_share(self) -> float:
        """The share of echoes sent during a /work whose wait covered the rest of it."""
        return self.covered / self.during if self.during else 0.0

    def as_figures(self) -> dict:
        """The probe's figures, as lessons.json stores them."""
        work_ms = sorted((end - start) * 1000 for start, end in self.work_spans)
        return {
            "work_requests": len(self.work_spans),
            "work_median_ms": round(work_ms[len(work_ms) // 2], 1) if work_ms else 0.0,
            "echo_requests": len(self.echo_spans),
            "echoes_during_work": self.during,
            "echoes_waited_whole_work": self.covered,
            "covered_share": round(self.covered_share, 3),
            "left_ms": round(self.left_s * 1000, 1),
            "probe_errors": self.errors,
        }


def latency_us(spans: Sequence[tuple[float, float]]) -> dict[str, float]:
    """The spans' latency in microseconds, with the keys of the load generator's histograms."""
    values = sorted((end - start) * 1e6 for start, end in spans)
    if not values:
        return dict.fromkeys(("p50", "p90", "p99", "p999", "p9999", "min", "max", "mean"), 0.0)

    def rank(share: float) -> float:
        return round(values[min(len(values) - 1, int(share * len(values)))], 2)

    return {
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "p9999": rank(0.9999),
        "min": round(values[0], 2),
        "max": round(values[-1], 2),
        "mean": round(statistics.fmean(values), 2),
    }


def combine(readings: Sequence[Mapping]) -> dict:
    """The figures of several repetitions (`Reading.as_figures`) as one: the counts summed, the
    covered share of the sums (each echo weighs the same, whichever repetition saw it), the
    /work median and the time left the repetitions' medians."""
    combined: dict = {key: sum(reading[key] for reading in readings) for key in COUNTS}
    during, covered = combined["echoes_during_work"], combined["echoes_waited_whole_work"]
    combined["covered_share"] = round(covered / during, 3) if during else 0.0
    for key in ("work_median_ms", "left_ms"):
        combined[key] = statistics.median(reading[key] for reading in readings)
    return combined


def classify(
    work_spans: list[tuple[float, float]], echo_spans: list[tuple[float, float]], left_s: float
) -> tuple[int, int]:
    """Of the echoes sent while a /work ran with >= `left_s` of it still to go: how many, and
    how many were answered only once that /work had come back."""
    during = covered = 0
    for sent, answered in echo_spans:
        for start, end in work_spans:
            if start + LEAD_S <= sent <= end - left_s:
                during += 1
                if answered >= end - SAME_WAKE_S:
                    covered += 1
                break
    return during, covered


def run(
    port: int,
    work_rounds: int,
    seconds: float,
    left_s: float,
    echo_connections: int = 8,
    echo_pause_s: float = 0.002,
    host: str = "127.0.0.1",
    timeout_s: float = 30.0,
) -> Reading:
    """Probe a server on `port` for `seconds` (raises OSError when it cannot connect)."""
    selector = selectors.DefaultSelector()
    work_line = f"/work {work_rounds}\n".encode()
    connections = [_connect(host, port, "work", work_line, 0.0, selector)]
    connections += [
        _connect(host, port, "echo", ECHO_LINE, echo_pause_s, selector)
        for _ in range(echo_connections)
    ]
    errors = 0
    try:
        now = time.perf_counter()
        deadline, give_up = now + seconds, now + seconds + timeout_s
        for connection in connections:
            _send(connection, now)
        while now < give_up:
            if now >= deadline and not any(c.waiting for c in connections):
                # Every reply is in, the echoes that waited for the last /work included:
                # leaving them out would drop only waits that covered it.
                break
            for key, _ in selector.select(timeout=0.001):
                errors += _receive(key.data, time.perf_counter())
            now = time.perf_counter()
            if now < deadline:
                for connection in connections:
                    if not connection.waiting and now >= connection.resume_at:
                        _send(connection, now)
    finally:
        for connection in connections:
            selector.unregister(connection.sock)
            connection.sock.close()
        selector.close()
    work = [span for c in connections if c.kind == "work" for span in c.spans]
    echo = [span for c in connections if c.kind == "echo" for span in c.spans]
    during, covered = classify(work, echo, left_s)
    replies = tuple(len(c.spans) for c in connections)
    return Reading(tuple(work), tuple(echo), during, covered, left_s, errors, replies)


def _connect(
    host: str, port: int, kind: str, line: bytes, pause_s: float, selector: selectors.BaseSelector
) -> Connection:
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    connection = Connection(sock, kind, line, pause_s=pause_s)
    selector.register(sock, selectors.EVENT_READ, connection)
    return connection


def _send(connection: Connection, now: float) -> None:
    connection.sock.send(connection.line)  # a few bytes: the socket takes them at once
    connection.sent_at = now
    connection.waiting = True


def _receive(connection: Connection, now: float) -> int:
    """Read what arrived; record one span per complete reply. Returns the errors seen."""
    data = connection.sock.recv(65536)
    if not data:
        raise ConnectionError(f"the server closed a {connection.kind} connection")
    connection.buffer += data
    errors = 0
    while b"\n" in connection.buffer:
        reply, connection.buffer = connection.buffer.split(b"\n", 1)
        if reply.startswith(b"ERR"):
            errors += 1
        connection.spans.append((connection.sent_at, now))
        connection.waiting = False
        connection.resume_at = now + connection.pause_s
    return errors

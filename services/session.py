"""What every model uses for one connection: framing, counting, and the registry of connections.

`LineFramer` cuts bytes into bounded lines, `Tally` counts what one connection did (plain
integers, no locks: only the connection's own thread, greenlet or reactor writes it, and
`ServerStats` folds it into running totals at scrape and close time), `Session` is one accepted
connection and `ServerStats` the registry of them all. The blocking session loop that threads and
greenlets run lives in `services.blocking`; the pool's reactor (`services.servers.pool`) drives
the same framer, protocol and tally from events instead.

How a scrape stays cheap and exact (`ServerStats.snapshot`): the totals are kept folded in one
`Tally`; a scrape folds only the live tallies that changed since their last fold, by delta (the
value read once, minus the value last folded, which is then remembered). `Tally.record` sets a
`changed` flag after its counts; the fold clears it *before* reading, so a request racing the
scrape is either read now or flagged again and read next time: never lost, never counted twice,
without a lock on the hot path. Byte counters are compared directly (the models add to them
outside `record`). An idle connection costs a flag and two integer comparisons per scrape.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import compress
from operator import add, ne, sub

from services import protocol
from services.buckets import DURATION_BUCKETS

READ_SIZE = 65536
CLOSE_REASONS = (
    "client",
    "quit",
    "idle",
    "line-too-long",
    "reset",
    "overload",
    "shutdown",
    "error",
)
log = logging.getLogger("arena.session")


class LineFramer:
    """Splits a byte stream into request lines no longer than `limit` bytes."""

    __slots__ = ("limit", "partial")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.partial = b""

    def feed(self, data: bytes) -> tuple[list[bytes], bool]:
        """Add received bytes; return the complete lines (\r dropped) and whether the limit broke.

        When the limit broke, the lines are those before the overlong one; the caller answers
        them, then replies `line-too-long` and closes.
        """
        if self.partial:
            data = self.partial + data
        else:
            end = len(data) - 1
            if data.find(b"\n") == end and end <= self.limit:
                # The common case, one whole request in one read: no split, no scan.
                return [data[:-2] if data.endswith(b"\r\n") else data[:-1]], False
        lines = data.split(b"\n")
        partial = lines.pop()
        limit = self.limit
        overflow = False
        if len(data) > limit:  # only then can a line be too long: skip the scan otherwise
            overflow = len(partial) > limit
            if lines and max(map(len, lines)) > limit:
                overflow = True
                lines = lines[: next(i for i, line in enumerate(lines) if len(line) > limit)]
            if overflow:
                partial = b""  # the connection is closing: hold nothing more
        self.partial = partial
        if b"\r" in data:
            lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        return lines, overflow


class Histogram:
    """Bucket counts and a sum, like a Prometheus histogram without labels or locks."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    def add(self, other: Histogram) -> None:
        """Fold another histogram's observations into this one."""
        self.counts = list(map(add, self.counts, other.counts))
        self.total += other.total


_ZERO_COUNTS = [0] * (len(DURATION_BUCKETS) + 1)
_SLOTS = range(2 * len(protocol.COMMANDS))  # indexes of Tally.requests


class FoldMark:
    """What was folded so far from one live tally: its values as last read."""

    __slots__ = ("counts", "errors", "received", "requests", "sent", "totals")

    def __init__(self) -> None:
        self.requests = [0] * (2 * len(protocol.COMMANDS))
        self.errors: dict[str, int] = {}
        # Shared zero lists until a command's histogram is first folded (never mutated).
        self.counts = [_ZERO_COUNTS] * len(protocol.COMMANDS)
        self.totals = [0.0] * len(protocol.COMMANDS)
        self.received = 0
        self.sent = 0


class Tally:
    """What one connection did: requests by command and outcome, errors, durations, bytes."""

    __slots__ = ("changed", "durations", "errors", "mark", "received", "requests", "sent")

    def __init__(self) -> None:
        self.requests = [0] * (2 * len(protocol.COMMANDS))  # [command * 2 + failed]
        self.errors: dict[str, int] = {}
        self.durations = [Histogram() for _ in protocol.COMMANDS]
        self.received = 0
        self.sent = 0
        # Requests or errors counted since the last fold into the server's totals.
        self.changed = False
        # What was folded so far (None: nothing yet); only ServerStats touches it, under its lock.
        self.mark: FoldMark | None = None

    def record(self, answer: protocol.Answer, seconds: float) -> None:
        """Count one answered request that took `seconds` from read to reply."""
        command, _reply, error, _close = answer
        # The histogram before the request count, the flag last: the order a fold relies on.
        histogram = self.durations[command]  # Histogram.observe, inlined: this is per request
        histogram.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        histogram.total += seconds
        if error is None:
            self.requests[command * 2] += 1
        else:
            self.requests[command * 2 + 1] += 1
            self.errors[error] = self.errors.get(error, 0) + 1
        self.changed = True  # last: a fold that cleared the flag before these counts sees it again

    def count_error(self, code: str) -> None:
        """Count a protocol error that answered no request (line-too-long, server-busy)."""
        self.errors[code] = self.errors.get(code, 0) + 1
        self.changed = True

    def add(self, other: Tally) -> None:
        """Fold another tally into this one."""
        self.requests = list(map(add, self.requests, other.requests))
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count
        for mine, theirs in zip(self.durations, other.durations, strict=True):
            mine.add(theirs)
        self.received += other.received
        self.sent += other.sent

    def copy(self) -> Tally:
        """A new tally with the same counts."""
        twin = Tally()
        twin.add(self)
        return twin

    def fold_into(self, total: Tally) -> None:
        """Add to `total` what this tally counted since its last fold (under the stats lock).

        Each value is read once; the value read is both what the delta is taken from and what
        is remembered, so an increment racing the fold is folded now or next time, exactly once.
        Only the histograms of commands whose request counts changed are read: `record` counts
        the histogram before the request, so a request count read here implies its histogram
        entry, read after it. A connection that made one more echo folds two short lists.
        """
        self.changed = False  # before reading: a record() racing this fold flags it again
        mark = self.mark
        if mark is None:
            mark = self.mark = FoldMark()
        received, sent = self.received, self.sent
        total.received += received - mark.received
        total.sent += sent - mark.sent
        mark.received, mark.sent = received, sent
        before = mark.requests
        if self.requests != before:
            requests = self.requests[:]  # a C-level copy: atomic with respect to other threads
            total.requests = list(map(add, total.requests, map(sub, requests, before)))
            mark.requests = requests
            folded_counts, folded_totals = mark.counts, mark.totals
            for index in {slot >> 1 for slot in compress(_SLOTS, map(ne, requests, before))}:
                live, into = self.durations[index], total.durations[index]
                counts = live.counts[:]
                into.counts = list(map(add, into.counts, map(sub, counts, folded_counts[index])))
                folded_counts[index] = counts
                seconds = live.total
                # Float deltas: the sum of seconds is exact up to rounding (counts are exact).
                into.total += seconds - folded_totals[index]
                folded_totals[index] = seconds
        if self.errors != mark.errors:
            errors = dict(self.errors)
            for code, count in errors.items():
                total.errors[code] = total.errors.get(code, 0) + count - mark.errors.get(code, 0)
            mark.errors = errors


class Session:
    """One accepted connection: its socket, framer, tally and idle bookkeeping.

    The steps between two waits are written here once for every model: `take` frames what was
    read, `respond` answers and counts lines, `settle` counts answers made elsewhere (a pool
    worker), `refuse_overlong` is the limit's last reply. The models differ only in how they
    wait for bytes, for a request, and for the socket to take the reply.
    """

    __slots__ = ("busy", "close_reason", "framer", "last_active", "overflow", "sock", "tally")

    def __init__(self, sock: socket.socket, line_limit: int) -> None:
        self.sock = sock
        self.framer = LineFramer(line_limit)
        self.tally = Tally()
        self.last_active = time.monotonic()
        # A request is being answered: the idle timeout does not apply. (The pool's reactor
        # knows this from its batch in flight and does not keep this flag.)
        self.busy = False
        self.close_reason: str | None = None  # set by whoever decides to end the connection
        # A line broke the limit: answer the lines before it, then refuse it and close.
        self.overflow = False

    def take(self, data: bytes) -> list[bytes]:
        """Count received bytes and frame them into complete lines (sets `overflow`)."""
        self.tally.received += len(data)
        lines, overflow = self.framer.feed(data)
        if overflow:
            self.overflow = True
        return lines

    def respond(
        self,
        lines: list[bytes],
        answer: Callable[[bytes], protocol.Answer],
        started: float,
        clock: Callable[[], float] | None,
    ) -> tuple[bytes, bool]:
        """Answer lines in order, counting each (timed from `started` when `clock` is given).

        Stops after a line that closes the connection; returns the replies and whether it does.
        """
        record = self.tally.record
        if len(lines) == 1:  # one request per read: no list of replies, no join
            result = answer(lines[0])
            record(result, clock() - started if clock else 0.0)
            return result.reply, result.close
        replies = []
        for line in lines:
            result = answer(line)
            record(result, clock() - started if clock else 0.0)
            replies.append(result.reply)
            if result.close:
                return b"".join(replies), True
        return b"".join(replies), False

    def settle(self, answers: list[protocol.Answer], seconds: float) -> tuple[bytes, bool]:
        """Count answers made elsewhere (a pool worker); the replies and whether it closes."""
        record = self.tally.record
        for result in answers:
            record(result, seconds)
        return b"".join(result.reply for result in answers), answers[-1].close

    def refuse_overlong(self) -> bytes:
        """Count the line that broke the limit and return its reply (the caller then closes)."""
        self.tally.count_error("line-too-long")
        return protocol.line_too_long_reply(self.framer.limit)

    def interrupt(self, reason: str, how: int = socket.SHUT_RDWR) -> None:
        """End the connection from outside its loop: its blocked read returns EOF."""
        self.close_reason = self.close_reason or reason
        try:
            self.sock.shutdown(how)
        except OSError:
            pass  # already gone


def os_lock() -> threading.Lock:
    """A lock of the OS even under gevent's monkey-patching, where `threading.Lock` is green.

    The metrics server reads the stats from a native thread (services.metrics), which must never
    block on a gevent lock. Greenlets may take an OS lock as long as they do not yield while
    holding it: the stats lock is held only for dictionary and counter updates.
    """
    monkey = sys.modules.get("gevent.monkey")  # imported only if the gevent model patched
    if monkey is not None:
        try:
            if monkey.is_module_patched("threading"):
                lock: threading.Lock = monkey.get_original("_thread", "allocate_lock")()
                return lock
        except (AttributeError, ImportError, KeyError):
            log.warning("gevent's original locks are unavailable: the stats lock is a green one")
    return threading.Lock()


@dataclass
class ServerStats:
    """Every connection of one server: the live sessions and the running totals."""

    max_connections: int
    sessions: dict[int, Session] = field(default_factory=dict)
    # Every closed connection, plus each live one up to its last fold (see the module doc).
    folded: Tally = field(default_factory=Tally)
    connections_total: int = 0
    rejected: int = 0
    close_reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    accept_errors: dict[str, int] = field(default_factory=dict)
    # Unexpected exceptions by where they were caught: a bug contained, not a crash.
    internal_errors: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    # Held only when a connection opens or closes and while scraping, never per request: it
    # keeps a closing connection from being counted both live and closed in one scrape, and
    # serializes folds. An OS lock, because the metrics thread may be a native one (gevent).
    lock: threading.Lock = field(default_factory=os_lock)
    all_closed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.all_closed = threading.Condition(self.lock)

    def open_session(
        self, sock: socket.socket, line_limit: int, factory: type[Session] | None = None
    ) -> Session | None:
        """Register a new connection, or None when the connection limit is reached."""
        with self.lock:
            if len(self.sessions) >= self.max_connections:
                self.rejected += 1
                self.folded.count_error("server-busy")
                return None
            session = (factory or Session)(sock, line_limit)
            self.sessions[id(session)] = session
            self.connections_total += 1
            return session

    def close_session(self, session: Session, reason: str) -> None:
        """Close the socket and fold the rest of the connection's tally into the totals."""
        with contextlib.suppress(OSError):
            session.sock.close()
        with self.lock:
            if self.sessions.pop(id(session), None) is None:
                return
            tally = session.tally
            if tally.mark is None:
                self.folded.add(tally)  # never scraped while live: add it whole, as cheap as ever
            else:
                tally.fold_into(self.folded)
                tally.mark = None
            self.close_reasons[session.close_reason or reason] += 1
            if not self.sessions:
                self.all_closed.notify_all()

    def count_accept_error(self, name: str) -> None:
        """Count one failed accept() by errno name."""
        with self.lock:
            self.accept_errors[name] = self.accept_errors.get(name, 0) + 1

    def count_internal_error(self, where: str) -> None:
        """Count one unexpected exception caught at `where` (session, reactor, ...)."""
        with self.lock:
            self.internal_errors[where] = self.internal_errors.get(where, 0) + 1

    def snapshot(self) -> Tally:
        """The totals of every connection, closed and live, as one tally (a copy).

        Folds only the live tallies changed since their last fold: an idle connection costs a
        flag check and two integer comparisons, so a scrape stays cheap at 10,000 connections.
        """
        folded = self.folded
        with self.lock:
            for session in self.sessions.values():  # changed only under this lock
                tally = session.tally
                mark = tally.mark
                if mark is None:
                    if tally.changed or tally.received or tally.sent:
                        tally.fold_into(folded)
                elif tally.changed or tally.received != mark.received or tally.sent != mark.sent:
                    tally.fold_into(folded)
            return folded.copy()

    def live(self) -> Iterator[Session]:
        """A stable copy of the live sessions to iterate over."""
        with self.lock:
            return iter(list(self.sessions.values()))

    def wait_all_closed(self, timeout: float) -> bool:
        """Block until every connection is closed or `timeout` passes."""
        with self.lock:
            return self.all_closed.wait_for(lambda: not self.sessions, timeout)

    def sweep_idle(self, idle_timeout: float) -> None:
        """Close connections with no request bytes and no request in progress for too long."""
        deadline = time.monotonic() - idle_timeout
        for session in self.live():
            if not session.busy and session.last_active < deadline:
                session.interrupt("idle")


def reject(sock: socket.socket, max_connections: int) -> None:
    """Tell a connection over the limit that the server is busy, then close it."""
    try:
        sock.setblocking(False)  # a fresh socket's buffer takes the line; never wait for it
        sock.send(protocol.server_busy_reply(max_connections))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()

"""Protocol v1, written once: parse a request line, run it, format the reply.

Pure functions over bytes: no sockets, threads or metrics, so every concurrency model agrees
byte for byte, the tests need no server, and the process pool can pickle `answer_batch`.
The whole specification is in docs/PROTOCOL.md.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Protocol

DEFAULT_LINE_LIMIT = 65536
MAX_SLEEP_MS = 60_000
MAX_WORK_ROUNDS = 10_000_000
# Measured on the project's 2-core machines (CPython 3.12.1, best of 5 CPU-time runs): one round
# of `burn_cpu` costs about 83 ns, so `/work 10000` holds the GIL for about 0.85 ms
# (docs/PROTOCOL.md). The virtual cores' speed drifts: 60-113 ns were seen on other days.
WORK_ROUND_NS = 85

# Request kinds, used as small integers on the hot path and as metric labels at scrape time.
COMMANDS = ("echo", "ping", "sleep", "work", "quit", "unknown", "db")
ECHO, PING, SLEEP, WORK, QUIT, UNKNOWN, DB = range(len(COMMANDS))
ERROR_CODES = (
    "unknown-command",
    "bad-argument",
    "line-too-long",
    "server-busy",
    "backend-unavailable",
    "backend-busy",
    "backend-error",
)
# What a failed `/db` answers, by error code: the connection stays open, the client may retry.
BACKEND_REPLIES = {
    "backend-unavailable": b"ERR backend-unavailable the database cannot be reached; retry later\n",
    "backend-busy": b"ERR backend-busy no database connection was free in time; retry\n",
    "backend-error": b"ERR backend-error the database refused the query\n",
}

PONG = b"PONG\n"
BYE = b"BYE\n"
UNKNOWN_COMMAND = (
    b"ERR unknown-command try /ping, /sleep MS [TEXT], /work N [TEXT], /db MS [TEXT], /quit"
    b" or //TEXT\n"
)


def line_too_long_reply(limit: int) -> bytes:
    """The reply to a line longer than `limit` bytes (the server closes afterwards)."""
    return b"ERR line-too-long a request line may hold at most %d bytes\n" % limit


def server_busy_reply(limit: int) -> bytes:
    """The reply to a connection over the connection limit (the server closes afterwards)."""
    return b"ERR server-busy the server already holds its limit of %d connections\n" % limit


class Database(Protocol):
    """What `/db` needs of a model's database: one query that waits, or an error code."""

    def query(self, milliseconds: int) -> str | None:
        """Wait `milliseconds` inside the database; None, or an ERROR_CODES entry."""
        ...


class Answer(NamedTuple):
    """What the server does with one request line."""

    command: int  # index into COMMANDS
    reply: bytes  # the whole reply line, newline included
    error: str | None = None  # an ERROR_CODES entry when the reply is an error
    close: bool = False  # close the connection after this reply


def _bad_argument(command: int, usage: bytes) -> Answer:
    return Answer(command, b"ERR bad-argument usage: " + usage + b"\n", "bad-argument")


def _parse_number(argument: bytes, maximum: int) -> tuple[int, bytes] | None:
    """Split `NUMBER[ TEXT]`; None when the number is missing, not ASCII digits or too large."""
    digits, _, text = argument.partition(b" ")
    # bytes.isdigit() accepts ASCII digits only; the length check keeps int() cheap and bounded.
    if not digits.isdigit() or len(digits.lstrip(b"0")) > len(str(maximum)):
        return None
    number = int(digits)
    return (number, text) if number <= maximum else None


def burn_cpu(rounds: int) -> int:
    """Do `rounds` steps of pure-Python CPU work while holding the GIL; returns the final state."""
    state = 1
    for _ in range(rounds):
        state = (state * 1103515245 + 12345) & 0xFFFFFFFF
    return state


def _run_command(line: bytes, database: Database | None) -> Answer:
    name, space, argument = line.partition(b" ")
    if name == b"/ping":
        return Answer(PING, PONG) if not space else _bad_argument(PING, b"/ping")
    if name == b"/quit":
        return Answer(QUIT, BYE, close=True) if not space else _bad_argument(QUIT, b"/quit")
    if name == b"/sleep":
        request = sleep_request(line)
        if request is None:
            return _bad_argument(SLEEP, b"/sleep MS [TEXT] with 0 <= MS <= 60000")
        seconds, result = request
        time.sleep(seconds)
        return result
    if name == b"/work":
        parsed = _parse_number(argument, MAX_WORK_ROUNDS) if space else None
        if parsed is None:
            return _bad_argument(WORK, b"/work N [TEXT] with 0 <= N <= 10000000")
        burn_cpu(parsed[0])
        return Answer(WORK, parsed[1].upper() + b"\n")
    if name == b"/db":
        request = db_request(line)
        if request is None:
            return _bad_argument(DB, DB_USAGE)
        milliseconds, result = request
        error = database.query(milliseconds) if database is not None else "backend-unavailable"
        return result if error is None else backend_failed(error)
    return Answer(UNKNOWN, UNKNOWN_COMMAND, "unknown-command")


DB_USAGE = b"/db MS [TEXT] with 0 <= MS <= 60000"


def db_request(line: bytes) -> tuple[int, Answer] | None:
    """A valid `/db MS [TEXT]` line's milliseconds and its answer on success; else None.

    Same argument rules as `/sleep`. The query itself is the model's to run (a thread or a
    greenlet waits in `answer`, an event loop awaits it); `backend_failed` is the reply when it
    fails.
    """
    if not line.startswith(b"/db "):
        return None
    parsed = _parse_number(line[4:], MAX_SLEEP_MS)
    if parsed is None:
        return None
    return parsed[0], Answer(DB, parsed[1].upper() + b"\n")


def backend_failed(code: str) -> Answer:
    """The answer to a `/db` whose query failed with `code` (a backend-* ERROR_CODES entry)."""
    return Answer(DB, BACKEND_REPLIES[code], code)


def answer(line: bytes, database: Database | None = None) -> Answer:
    """Run one request line (without its newline; a trailing \\r already dropped).

    `database` runs `/db`; without one, `/db` answers `ERR backend-unavailable`.
    """
    if not line.startswith(b"/"):
        # bytes.upper() changes ASCII a-z only: exactly the protocol's echo.
        return Answer(ECHO, line.upper() + b"\n")
    if line.startswith(b"//"):
        return Answer(ECHO, line[1:].upper() + b"\n")
    return _run_command(line, database)


def sleep_request(line: bytes) -> tuple[float, Answer] | None:
    """A valid `/sleep MS [TEXT]` line's seconds and answer, without sleeping; else None.

    For an event loop, which must wait with a timer instead of `time.sleep`; any other line,
    a malformed `/sleep` included, is `answer`'s (it does not sleep on those).
    """
    if not line.startswith(b"/sleep "):
        return None
    parsed = _parse_number(line[7:], MAX_SLEEP_MS)
    if parsed is None:
        return None
    return parsed[0] / 1000, Answer(SLEEP, parsed[1].upper() + b"\n")


def answer_batch(lines: list[bytes], database: Database | None = None) -> list[Answer]:
    """Run request lines in order, stopping after one that closes the connection."""
    answers = []
    for line in lines:
        result = answer(line, database)
        answers.append(result)
        if result.close:
            break
    return answers


def answer_batches(
    batches: list[list[bytes]], database: Database | None = None
) -> list[list[Answer]]:
    """Answer several connections' batches in one call (one trip to a pool worker)."""
    return [answer_batch(lines, database) for lines in batches]

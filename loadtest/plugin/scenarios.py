"""The Locust scenarios: every lesson of ``loadtest.lessons.catalog``, then the database ones.

The database lessons (issue 19: ``/db MS [TEXT]``, one PostgreSQL round trip that waits MS ms)
are Locust scenarios only for now: ``make lessons`` has no check for them yet, so they stay out
of the catalog that ``loadtest.lessons`` checks, and this module is the one place Locust (the
knobs, the web UI's Scenario tab, ``--help``) looks a scenario up.

Every scenario presets the database knobs: a catalog lesson gets ``--db-share 0``, so switching
from a database scenario to any other in the edit form never keeps sending ``/db``.

Standard library only: the Locust image imports this file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from loadtest.lessons import catalog
from loadtest.lessons.catalog import DEFAULT_LESSON, STEADY_KNOBS, Lesson

__all__ = ["DEFAULT_LESSON", "LESSONS", "LESSONS_BY_ID", "Lesson", "checked", "get"]

# The committed verdicts of `make lessons` (the Locust image copies this one file in).
CHECKED_RESULTS = Path(__file__).resolve().parents[2] / "results" / "lessons" / "lessons.json"
# How the Scenario tab words each verdict: an inconclusive one is no failure.
VERDICT_WORDS = {
    "holds": "holds",
    "fails": "FAILS",
    "inconclusive": "inconclusive (the machine could not show it; not a failure)",
}

# The servers' database pool holds this many connections unless configured otherwise: the
# scenarios below size their users against it.
DB_POOL_CONNECTIONS = 20
# What a lesson that leaves the database out sends: no /db (the ms is only shown).
NO_DB_KNOBS: Mapping[str, str] = {"db_share": "0", "db_ms": "20"}
_STEADY = {**STEADY_KNOBS, **NO_DB_KNOBS}
_ONLY_ECHO = {"ping_share": "0", "sleep_share": "0", "work_share": "0", "db_share": "0"}
BLOCKING_DRIVER_COMMAND = (
    "ARENA_DB_DRIVER=blocking LOCUST_SCENARIO=undetected-io docker compose up -d"
)

DB_LESSONS: tuple[Lesson, ...] = (
    Lesson(
        "db-wait",
        "db-wait: every request waits 20 ms in PostgreSQL",
        "A real database wait is waiting too: a thread, greenlet or coroutine per connection "
        "overlaps the queries as it overlaps /sleep, a pool of N workers runs only N at a time.",
        "requests/s, client p99, arena_db_connections_in_use and the pool's queue depth per "
        "server.",
        f"with {DB_POOL_CONNECTIONS} users per target (the servers' database pool holds "
        f"{DB_POOL_CONNECTIONS} connections by default, so no query waits for one) threaded, "
        f"gevent and asyncio near {DB_POOL_CONNECTIONS} / 20 ms, 1,000/s each, the pool near "
        "workers / 20 ms with its queue full. Start a new test with it: users per target "
        "cannot change while a test runs. A server without a database answers every request "
        "`ERR backend-unavailable` (failures).",
        {
            **_STEADY,
            **_ONLY_ECHO,
            "db_share": "1",
            "db_ms": "20",
            "think_ms": "0",
            "users_per_target": str(DB_POOL_CONNECTIONS),
        },
    ),
    Lesson(
        "db-pool-bound",
        "db-pool-bound: more queries than database connections",
        "A database connection pool bounds concurrency whatever the model: with more concurrent "
        f"queries than connections (100 users against the servers' pool of "
        f"{DB_POOL_CONNECTIONS} by default), queries queue for a connection.",
        "requests/s, client p99, arena_db_pool_wait_seconds and arena_db_waiting_requests per "
        "server, and the `ERR backend-busy` failures.",
        f"threaded, gevent and asyncio alike, capped near {DB_POOL_CONNECTIONS} connections / "
        "50 ms, 400/s each, however cheap their switching; their p99 grows to about users / "
        "connections x 50 ms (250 ms) as queries queue for a connection, and a query that finds "
        "none free within the pool's timeout (`ARENA_DB_TIMEOUT`, 2 s by default) fails with "
        "`ERR backend-busy`. The pool model is capped by its workers first (workers / 50 ms).",
        {
            **_STEADY,
            **_ONLY_ECHO,
            "db_share": "1",
            "db_ms": "50",
            "think_ms": "0",
            "users_per_target": "100",
        },
    ),
    Lesson(
        "undetected-io",
        "undetected-io: 2 % of requests wait 20 ms in a blocking driver",
        "A database driver the event loop cannot see blocks every connection: a blocking query "
        "holds gevent's hub or asyncio's loop for its whole wait, so no other connection is "
        "served, yet no CPU is spent.",
        f"first start the servers with the blocking driver (`{BLOCKING_DRIVER_COMMAND}`); then "
        "gevent's and asyncio's echo p99 and CPU next to threaded's, and their event-loop "
        "blocked time.",
        "gevent's and asyncio's echo p99 climbs to about the query time (20 ms) while their "
        "CPU stays low, unlike blocked-loop, where the loop is blocked by computing and CPU is "
        "high; threaded's echo p99 stays low (only the querying thread waits). With the default "
        "driver the loops keep serving and echo stays fast.",
        {**_STEADY, **_ONLY_ECHO, "db_share": "0.02", "db_ms": "20", "think_ms": "100"},
    ),
)

LESSONS: tuple[Lesson, ...] = (
    *(replace(lesson, knobs={**NO_DB_KNOBS, **lesson.knobs}) for lesson in catalog.LESSONS),
    *DB_LESSONS,
)
LESSONS_BY_ID: Mapping[str, Lesson] = {lesson.id: lesson for lesson in LESSONS}


def get(lesson_id: str) -> Lesson:
    """The scenario called `lesson_id`; KeyError names the choices."""
    return catalog.get(lesson_id, LESSONS_BY_ID)


def checked(lesson_id: str, results: Path = CHECKED_RESULTS) -> str | None:
    """What `make lessons` last found for this lesson, in one line (None: not checked there,
    or no results to read)."""
    try:
        data = json.loads(results.read_text())
    except (OSError, ValueError):
        return None
    for entry in data.get("lessons", ()):
        if entry.get("id") == lesson_id:
            words = VERDICT_WORDS.get(entry.get("verdict", ""), entry.get("verdict", "?"))
            return f"{words} ({data.get('when', 'undated')}): {entry.get('reason', '')}"
    return None

"""The lessons: each one claim about the models, how to see it live, and how it is checked.

One catalog for two audiences. In the Locust web UI a lesson is a *scenario*: a preset of the
workload knobs (`--scenario io-wait`), with a paragraph saying what to watch on the dashboard.
`python -m loadtest.lessons` runs the same claim against each model alone, with the same CPU
allotment, and prints a verdict (each lesson checked by its module in `loadtest.lessons.claims`).

Standard library only: the Locust image imports this file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# About 1 ms of /work on this project's machines (services.protocol.WORK_ROUND_NS, ~85 ns a round).
WORK_1MS_ROUNDS = 10_000
WORK_100MS_ROUNDS = 1_000_000


@dataclass(frozen=True)
class Lesson:
    """One claim of the arena, its Locust preset and what a user should see."""

    id: str
    title: str  # short, for the select box
    claim: str  # the claim being tested, in one sentence
    watch: str  # what to look at on the dashboard
    expect: str  # what you should see
    knobs: Mapping[str, str] = field(default_factory=dict)  # knob dest -> value (Locust preset)

    @property
    def description(self) -> str:
        """One paragraph: the claim, what to watch, what you should see."""
        return f"{self.claim} Watch: {self.watch} Expect: {self.expect}"


STEADY_KNOBS: Mapping[str, str] = {
    "payload_bytes": "32",
    "ping_share": "0.05",
    "sleep_share": "0.1",
    "sleep_ms": "5",
    "work_share": "0.05",
    "work_rounds": str(WORK_1MS_ROUNDS),
    "think_ms": "100",
    "users_per_target": "100",
    "arrival_rate": "0",  # closed loop: each user waits for its answer, then thinks
}
# Each scenario starts from these and sets what it is about, so switching scenarios in the edit
# form never keeps a share from the previous one.
_ONLY_ECHO = {"ping_share": "0", "sleep_share": "0", "work_share": "0"}

LESSONS: tuple[Lesson, ...] = (
    Lesson(
        "steady",
        "steady: light mixed traffic",
        "Under light load every model keeps up: the concurrency model matters when something "
        "is scarce.",
        "requests/s and client latency per server.",
        "the servers look alike (each user thinks 100 ms between requests).",
        STEADY_KNOBS,
    ),
    Lesson(
        "io-wait",
        "io-wait: every request waits 20 ms",
        "Switching helps waiting: a thread, greenlet or asyncio timer per connection overlaps "
        "the waits, a pool of N workers runs only N at a time.",
        "requests/s, the pool's queue depth and busy workers, client p99.",
        "threaded, gevent and asyncio many times the pool's rate (up to users / 20 ms, "
        "5,000/s each with 100 users, as far as the CPU allows); the pool near workers / "
        "20 ms, its queue full and its p99 in seconds.",
        {**STEADY_KNOBS, **_ONLY_ECHO, "sleep_share": "1", "sleep_ms": "20", "think_ms": "0"},
    ),
    Lesson(
        "cpu-work",
        "cpu-work: every request burns ~1 ms of CPU",
        "Switching does not help computing: threads, greenlets and coroutines share one core "
        "under the GIL; only processes add cores.",
        "requests/s against CPU per server, event-loop blocking on gevent and asyncio.",
        "threaded, gevent and asyncio at about one core's worth (1 ms of CPU each: about 1,000 a "
        "second); a process pool can go past it when it has spare cores. Side by side the "
        "servers share the machine's cores, so `make lessons` checks this claim with one "
        "server at a time.",
        {
            **STEADY_KNOBS,
            **_ONLY_ECHO,
            "work_share": "1",
            "work_rounds": str(WORK_1MS_ROUNDS),
            "think_ms": "0",
        },
    ),
    Lesson(
        "gil-tax",
        "gil-tax: 100 threads take turns on the GIL",
        "Threads contending for the GIL cost CPU: with 100 threads computing, the running one "
        "is interrupted every switch interval and each waiting one wakes to ask for the GIL, "
        "so the CPU per request of a thread per connection rises against one thread, and "
        "against an event loop doing the same work; the shorter the interval, the larger "
        "the tax.",
        "requests/s and CPU per server: CPU / requests/s is each server's CPU per request.",
        "at CPython's 5 ms switch interval (the threaded server's default) threaded close to "
        "gevent and asyncio; at 0.5 ms its CPU per request several times theirs and its rate "
        "below: the waiting threads, woken every interval on the second CPU, burn it asking "
        "for the GIL (on one CPU the kernel's scheduler decides how often they run, and the "
        "tax is smaller). The knob is the threaded server's --switch-interval: "
        "`ARENA_SWITCH_INTERVAL=0.0005 ARENA_SERVER_CPUS=2 docker compose up -d threaded` "
        "(every server container then may use 2 CPUs); "
        "outside Docker, `python -m services threaded --switch-interval 0.0005`.",
        {
            **STEADY_KNOBS,
            **_ONLY_ECHO,
            "work_share": "1",
            "work_rounds": str(WORK_1MS_ROUNDS),
            "think_ms": "0",
        },
    ),
    Lesson(
        "pool-bound",
        "pool-bound: more waits than pool workers",
        "A pool's size bounds its concurrency: with more concurrent waits than workers, "
        "requests queue for a worker.",
        "the pool's queue depth and busy workers, requests/s per server.",
        "the pool capped near workers / 50 ms while threaded, gevent and asyncio serve every "
        "user; the "
        "pool's queue stays full.",
        {**STEADY_KNOBS, **_ONLY_ECHO, "sleep_share": "1", "sleep_ms": "50", "think_ms": "100"},
    ),
    Lesson(
        "many-clients",
        "many-clients: 1000 connections per server",
        "Under many busy connections a fair server answers every one of them: a thread each "
        "costs memory and scheduling, a greenlet or a reactor slot almost nothing.",
        "connections, threads / greenlets, memory, client p99 per server.",
        "1000 connections on each server; threaded holds 1000 threads and more memory. Start "
        "a new test with it: the number of users is raised to 1000 x targets, and users per "
        "target cannot change while a test runs.",
        {**STEADY_KNOBS, **_ONLY_ECHO, "users_per_target": "1000", "think_ms": "500"},
    ),
    Lesson(
        "blocked-loop",
        "blocked-loop: 2 % of requests are ~100 ms of CPU",
        "One blocking call blocks every connection of an event loop: while one request "
        "computes, gevent's hub and asyncio's loop serve nobody (patched or awaited, only I/O "
        "and timers yield); an OS thread is preempted instead.",
        "gevent's and asyncio's event-loop blocked time and echo p99 next to threaded's.",
        "gevent's and asyncio's echo p99 jump to about the /work time (every connection waited "
        "behind it) and their blocked seconds climb; threaded's echo p99 stays lower.",
        {
            **STEADY_KNOBS,
            **_ONLY_ECHO,
            "work_share": "0.02",
            "work_rounds": str(WORK_100MS_ROUNDS),
            "think_ms": "10",
        },
    ),
    Lesson(
        "overload",
        "overload: no think time",
        "Without think time each server runs at its capacity: the models' costs per request show.",
        "requests/s and CPU per server, client latency.",
        "every server at its limit; the differences are the cost of each model's machinery.",
        {**STEADY_KNOBS, "think_ms": "0"},
    ),
)
LESSONS_BY_ID: Mapping[str, Lesson] = {lesson.id: lesson for lesson in LESSONS}

# The database lessons as `python -m loadtest.lessons` checks them (each model alone, against a
# throwaway PostgreSQL). Their Locust presets, under the same ids, are
# loadtest/plugin/scenarios.py's: kept out of LESSONS, which Locust extends with those.
DB_CHECKED: tuple[Lesson, ...] = (
    Lesson(
        "db-wait",
        "db-wait: every request waits 20 ms in PostgreSQL",
        "A real database wait is waiting too: a thread, greenlet or coroutine per connection "
        "overlaps the queries as it overlaps /sleep, up to what the database pool allows; a "
        "pool of N workers runs only N at a time.",
        "requests/s, arena_db_pool_wait_seconds and arena_db_connections_in_use per server.",
        "threaded, gevent and asyncio near database pool / 20 ms (1,000/s with the pool of "
        "20), the worker pool near workers / 20 ms.",
    ),
    Lesson(
        "db-pool-bound",
        "db-pool-bound: the database pool's size sets the rate",
        "A database connection pool bounds concurrency whatever the model: with more "
        "concurrent queries than connections, queries queue for a connection, and the rate "
        "follows the pool's size, not the model's switching.",
        "requests/s, arena_db_pool_wait_seconds and arena_db_connections_in_use.",
        "the rate near pool / query time for each pool size: twice the connections, twice "
        "the rate.",
    ),
    Lesson(
        "undetected-io",
        "undetected-io: a blocking database driver on an event loop",
        "A database driver the event loop cannot see blocks every connection: a blocking query "
        "holds gevent's hub or asyncio's loop for its whole wait, so queries run one at a time "
        "and echo waits behind them, yet no CPU is spent; a driver the loop can wait for (or "
        "helper threads) brings the overlap back.",
        "gevent's and asyncio's echo p99, requests/s and CPU per --db-driver, next to the "
        "same block by /work (blocked-loop).",
        "with --db-driver blocking about 50 queries/s (one 20 ms query at a time), echo p99 "
        "at the query time and little CPU; blocking-fixed up to its helper threads, default "
        "up to the database pool, echo fast.",
    ),
)
DEFAULT_LESSON = "steady"


def get(lesson_id: str, table: Mapping[str, Lesson] = LESSONS_BY_ID) -> Lesson:
    """The lesson called `lesson_id` in `table`; KeyError names the choices."""
    try:
        return table[lesson_id]
    except KeyError:
        choices = ", ".join(table)
        raise KeyError(f"unknown lesson {lesson_id!r}; choose from {choices}") from None

"""Arrival-rate mode: requests start on a timetable, whatever the server does (open loop).

A closed-loop user sends its next request only after the previous answer, so a server that
stalls also stops its clients: the stall is recorded once per user instead of once per request a
real population would have sent (coordinated omission). Here one scheduler per target per Locust
process draws start times at ``--arrival-rate`` (Poisson or evenly spaced) and hands each start to
an idle connection of a pool. The pool is the target's users: each user owns one connection, so
a pool of up to ``--users-per-target`` connections, opened on demand (an idle open connection is
picked before an unopened one, so a light rate keeps to a few warm connections).

- A start that finds no idle connection is *late*: it waits in a queue and is sent as soon as a
  connection frees, its latency still counted from the instant it was due
  (``locust_late_starts_total``). One that waited longer than ``--timeout-s`` fails unsent.
- The rate is per target across all processes: each process schedules the share of its users,
  ``rate x users of the target here / --users-per-target``. Locust splits a class's fixed count
  over its workers, so the shares add up to the rate whatever the number of workers, and follow
  a worker that joins or leaves (the offered rate ramps up with the users at the start).
- The scheduler reads the knobs at every start, so the edit form changes the rate at once; at
  rate 0 the users go back to the closed loop.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import AsyncResult

from loadtest.plugin.workload import KnobError, current_workload

# How long an idle user waits for a start before it rechecks the mode (the knobs may change).
TAKE_WAIT_S = 0.5
# How often an idle scheduler (rate 0) looks at the knobs again.
IDLE_POLL_S = 0.5


@dataclass(frozen=True)
class Start:
    """One scheduled request: when it was due (``time.perf_counter()``) and whether it waited."""

    due: float
    late: bool


class Timetable:
    """The scheduler and the idle connections of one target in this process."""

    def __init__(self, target: str, environment: Any) -> None:
        self.target = target
        self.environment = environment
        self.members: set[int] = set()  # ids of the users (connections) of this target here
        # Waiting users with an open connection, and those without (picked only when no open one
        # is idle); the most recently idle last.
        self._idle: list[AsyncResult] = []
        self._cold: list[AsyncResult] = []
        self._backlog: deque[Start] = deque()  # starts that found no idle connection
        self._greenlet: gevent.Greenlet | None = None

    def join(self, user: object) -> None:
        """A user (one connection) joins the pool; the first one starts the scheduler."""
        self.members.add(id(user))
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)

    def leave(self, user: object) -> None:
        """A user leaves; the last one stops the scheduler and drops the queued starts."""
        self.members.discard(id(user))
        if not self.members:
            greenlet, self._greenlet = self._greenlet, None
            self._backlog.clear()
            if greenlet is not None:
                greenlet.kill(block=False)

    @property
    def backlog(self) -> int:
        """Starts due now that wait for a free connection."""
        return len(self._backlog)

    def take(self, connected: bool, wait_s: float = TAKE_WAIT_S) -> Start | None:
        """The next start for an idle connection (`connected`: it is open): a waiting one, or
        the next due within `wait_s` (None after that, so the caller can recheck the mode)."""
        if self._backlog:
            return self._backlog.popleft()
        waiter: AsyncResult = AsyncResult()
        queue = self._idle if connected else self._cold
        queue.append(waiter)
        try:
            start: Start = waiter.get(timeout=wait_s)
            return start
        except gevent.Timeout:
            return None
        finally:
            if waiter in queue:
                queue.remove(waiter)

    def rate(self) -> float:
        """This process's share of the target's rate, in starts per second."""
        try:
            workload = current_workload(self.environment.parsed_options)
        except KnobError:
            return 0.0
        if self.target not in workload.targets:
            return 0.0
        return workload.arrival_rate * len(self.members) / workload.users_per_target

    def _gap(self, rate: float) -> float:
        workload = current_workload(self.environment.parsed_options)
        if workload.arrival == "uniform":
            return 1.0 / rate
        return random.expovariate(rate)

    def _run(self) -> None:
        due = time.perf_counter()
        while self.members:  # ends with the last user (leave() also kills it)
            rate = self.rate()
            if rate <= 0:
                gevent.sleep(IDLE_POLL_S)
                due = time.perf_counter()
                continue
            due += self._gap(rate)
            delay = due - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            # Behind schedule (a busy CPU, a paused process), the overdue starts go out at once:
            # the timetable never slips, which is the point of the mode.
            self.dispatch(due)

    def dispatch(self, due: float) -> None:
        """Give a start due at `due` to an idle connection, open ones first; else it waits, late."""
        for queue in (self._idle, self._cold):
            while queue:
                waiter = queue.pop()
                if not waiter.ready():
                    waiter.set(Start(due, late=False))
                    return
        self._backlog.append(Start(due, late=True))


_timetables: dict[str, Timetable] = {}


def timetable(target: str, environment: Any) -> Timetable:
    """This process's timetable for a target (made on first use)."""
    table = _timetables.get(target)
    if table is None or table.environment is not environment:
        table = _timetables[target] = Timetable(target, environment)
    return table

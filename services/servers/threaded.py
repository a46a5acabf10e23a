"""Thread per connection: each accepted socket gets an OS thread running the session loop.

The textbook version (socketserver's `ThreadingMixIn`) starves under load: at 1000 busy
clients it answered only about a third of them in 6 s, and the rest waited the whole run
(issue 9). Two things keep the accept thread from getting the GIL often enough, and this
server changes both:

- `threading.Thread.start()` waits until the new thread has run. With hundreds of busy
  threads in line for the GIL, every accepted connection costs the accept thread several
  hand-overs of the GIL: the new thread must get it once, then the accept thread again.
  Session threads are started with `_thread.start_new_thread`, which returns at once. They
  need no `Thread` object: nothing joins them (`stop` waits for the sessions in `ServerStats`
  to close), and `arena_threads` counts the process's OS threads.
- CPython asks a thread to drop the GIL after 5 ms (`sys.setswitchinterval`), and a thread
  waiting for the GIL goes back in line each time that wait times out -- the accept thread
  included, which so waits behind hundreds of session threads. Requests here take
  microseconds, so forced switches add hand-overs without making anyone faster. This server
  sets 50 ms (`--switch-interval`; process-wide; a label of `arena_server_info`).

Measured on the 2-core machine (C load generator, 1000 connections without think time, 1 s
warm-up then a 5 s window, server pinned to one CPU, load generator to the other). The machine
was shared and loud -- other processes took 30-80 % of the server's CPU -- so every figure is a
range over repeated runs, and waits are inflated:

| 1000 busy connections | answered in the window | longest wait |
|---|---|---|
| `Thread.start()`, 5 ms (before) / socketserver textbook | 335-632 / 342 | the whole run |
| `_thread.start_new_thread`, 5 ms | 493-1000 | 2.8 s - the whole run |
| `_thread.start_new_thread`, 20 ms | 999-1000 | 4.5 s - the whole run |
| `_thread.start_new_thread`, 50 ms (this server) | 1000 in 18 of 19 runs (980 once) | 1.2-5.8 s |

The price of 50 ms: a long `/work` keeps the GIL up to 50 ms before the others get a turn.
With 98 echo clients next to 2 clients looping on a ~100 ms `/work`, the echo p99 was 78-94 ms
at 5 ms, 185-203 ms at 20 ms and 255-278 ms at 50 ms; gevent's was 1.0-1.3 s (its loop never
lets go), and the `/work` itself took 0.26-0.75 s on the loaded CPU. `--switch-interval 0.005`
gives the fine-grained preemption back at the cost of starving some busy connections. At 100
connections the interval made no difference that the noise let us see: against the
socketserver textbook in the same benchmark run (`--scenarios echo64`, medians of 3), 0.81-1.08x
(median 0.95x, 8 runs) at 50 ms and 0.81-1.08x (median 1.00x, 3 runs) at 5 ms.

Tried and left out: accepting a burst of up to 64 or 1024 connections per wake-up (poll, then
non-blocking accepts) changed nothing measurable (each `accept()` releases the GIL anyway);
accepting through `ctypes.PyDLL` (`accept4` without releasing the GIL) accepted the 1000
connections in 0.4 s instead of 1-2.4 s, but the waits that followed were the same, so it is
not worth a foreign-function call on the accept path; intervals of 0.1-1 s were no better than
50 ms and would let a long `/work` hold every other client longer.

What is left: with 1000 threads contending for one GIL, the order in which they get it is not
first-come first-served, so a few requests still wait over a second (1.0-1.4 s in quiet runs,
up to 6 s in loud ones; p99 0.4-1 s) although every connection is served. The pool and gevent
servers, which serve every connection from one loop in turn, stay at 47-84 ms when quiet
(docs/RELIABILITY.md; tests/test_fairness.py expects the threaded failure).
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from services.servers.base import BlockingServer
from services.session import Session, serve_blocking

TASKS_DIR = "/proc/self/task"  # one entry per OS thread of this process (Linux)


class ThreadedServer(BlockingServer):
    """The textbook model (socketserver's ThreadingMixIn) with limits, timeouts and metrics."""

    model = "threaded"
    previous_switch_interval: float | None = None

    def serve_in_background(self) -> None:
        """Set the GIL switch interval, then accept and sweep."""
        # Process-wide, so it is set when serving starts (not when the object is built) and
        # given back by `stop`; arena_server_info shows it.
        self.previous_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(self.settings.switch_interval)
        super().serve_in_background()

    def spawn(self, function: Callable[..., None], *args: object) -> threading.Thread:
        """Start a helper daemon thread (accept, sweep): a `Thread`, so `stop` can join it."""
        thread = threading.Thread(target=function, args=args, daemon=True)
        thread.start()
        return thread

    def join(self, task: object, timeout: float) -> None:
        """Wait for a thread."""
        if isinstance(task, threading.Thread):
            task.join(timeout)

    def spawn_session(self, session: Session) -> None:
        """Start the connection's thread without waiting for it to run (see the docstring)."""
        _thread.start_new_thread(serve_blocking, (session, self.stats, self.settings.metrics))

    def stop(self, grace: float) -> None:
        """Stop like every blocking server, then give back the process's switch interval."""
        super().stop(grace)
        if self.previous_switch_interval is not None:
            sys.setswitchinterval(self.previous_switch_interval)

    def info(self) -> dict[str, str]:
        """Labels of arena_server_info, with the GIL switch interval this server set."""
        return {**super().info(), "switch_interval": str(self.settings.switch_interval)}

    def live_threads(self) -> int:
        """OS threads of the process: session threads have no `threading.Thread` object."""
        try:
            return len(os.listdir(TASKS_DIR))
        except OSError:  # not Linux: the helper threads plus one per live connection
            return threading.active_count() + len(self.stats.sessions)

    def extra_metrics(self) -> Iterable[Metric]:
        """Live threads: one per connection plus the accept, sweep and metrics threads."""
        yield GaugeMetricFamily(
            "arena_threads", "Live threads in the server process", value=self.live_threads()
        )

"""Thread per connection: each accepted socket gets an OS thread running the session loop.

The textbook version (socketserver's `ThreadingMixIn`) starves under load: at 1000 busy
clients it answered only about a third of them in 6 s, and the rest waited the whole run
(issue 9). Three changes make every connection served, each for a measured reason:

- `threading.Thread.start()` waits until the new thread has run. With hundreds of busy
  threads in line for the GIL, every accepted connection costs the accept thread several
  hand-overs of the GIL. Session threads are started with `_thread.start_new_thread`, which
  returns at once; nothing joins them (`stop` waits for the sessions in `ServerStats`), and
  `arena_threads` counts the process's OS threads.
- Even then, with 1000 threads ready the GIL is not handed over first-come first-served: a
  thread coming back from `send()` takes it again before threads that have waited for seconds
  (0.3-1.4 s longest waits, some connections never served in noisy runs). Above
  `--turns-above` live connections (256), requests take turns in arrival order
  (`blocking.Turns`): a thread holds the turn from its request's arrival to its reply, the
  others queue on their own locks and are woken by name. A reply the socket cannot take at
  once gives the turn back first, so a client that does not read holds up nobody.
- Turns cost a lock hand-over and a context switch per request, so below the threshold (100
  busy connections, say) the GIL alone decides, as in the textbook.

Measured on the 2-core machine (`python -m loadtest.bench`, C load generator, 1 s warm-up then
a 5 s window, server on one CPU and load generator on the other; 2026-12-02):

| 1000 busy connections | answered in the window | longest wait | requests/s |
|---|---|---|---|
| socketserver textbook | 318-440 of 1000 | still waiting after 6 s | 53-66k |
| `start_new_thread`, no turns | 1000 | 1.26 s | 33k |
| `start_new_thread` + turns (this server) | 1000 | 52-69 ms | 24-30k |

Fairness costs a third of the throughput at 1000 connections (the pool and gevent servers,
which serve every connection from one loop in turn, need no such hand-over). At 100
connections turns are off and the server ran at 0.97-1.11x the textbook's rate in the same runs
(echo 64 B, medians of 3, four A/B runs), metrics on. Measured again as issue 9 asks (median of
the ratios of interleaved pairs, 7 pairs of 2 s, metrics on; `python -m loadtest.bench
--scenarios echo64,echo1k --models threaded --kinds ours,textbook --reps 7 --duration 2`,
2026-12-02 14:48 UTC): 1.14x on echo 64 B, 1.05x on echo 1 KiB. Single pairs ranged from 0.80x
to 1.43x: the two servers do the same work per request (46.8 against 45.4 us of CPU in the full
benchmark), and how 100 threads share the GIL decides the rest, run by run.

The GIL switch interval (`--switch-interval`, CPython's 5 ms by default, a label of
`arena_server_info`) is a trade-off this server leaves at the default: a longer one made the
accept thread and busy connections fairer before turns existed, but lets a long `/work` hold
every other client longer (98 echo clients beside 2 looping on a ~100 ms `/work`: echo p99 78-94
ms at 5 ms, 255-278 ms at 50 ms). With turns, 5 ms served all 1000 connections within 70 ms.

Tried and left out: accepting bursts of 64 or 1024 connections per wake-up (no measurable
effect); accepting or sending through `ctypes.PyDLL` without releasing the GIL (faster accepts,
the same waits, a foreign-function call on the hot path); switch intervals of 0.1-1 s.
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.blocking import Turns, serve_blocking
from services.config import Settings
from services.servers.base import BlockingServer
from services.session import Session

TASKS_DIR = "/proc/self/task"  # one entry per OS thread of this process (Linux)


class ThreadedServer(BlockingServer):
    """The textbook model (socketserver's ThreadingMixIn) with limits, timeouts and metrics."""

    model = "threaded"
    previous_switch_interval: float | None = None

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.turns = Turns(settings.turns_above)

    def serve_in_background(self) -> None:
        """Set the GIL switch interval, then accept and sweep."""
        # Process-wide, so it is set when serving starts (not when the object is built) and
        # given back by `stop`; arena_server_info shows it.
        self.previous_switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(self.settings.switch_interval)
        super().serve_in_background()

    def spawn_session(self, session: Session) -> None:
        """Start the connection's thread without waiting for it to run (see the docstring)."""
        _thread.start_new_thread(
            serve_blocking,
            (session, self.stats, self.settings.metrics, self.database, None, self.turns),
        )

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
        yield CounterMetricFamily(
            "arena_turn_handovers",
            "Requests that waited for their turn in arrival order (above --turns-above)",
            value=self.turns.handovers,
        )

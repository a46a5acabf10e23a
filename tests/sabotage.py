"""Deliberately broken models for the lessons' sabotage tests (tests/test_lesson_sabotage.py).

Each entry is a registered model with only its server (or its set-up before imports) swapped
for a broken one, under the model's own name: `ARENA_EXTRA_MODELS=tests.sabotage:LOCKED_THREADS`
makes every tool, the lessons' runner included, run the broken server as `threaded`
(services/models.py, "An extra model with a registered model's name takes its place"). A lesson
whose check cannot tell the broken server from the real one has a check that cannot fail.

Standard library only, no server imported: `python -m services` reads this file before gevent
monkey-patches. The broken servers are in tests/sabotage_servers.py.
"""

from __future__ import annotations

from dataclasses import replace

from services import models

_SERVERS = "tests.sabotage_servers"


def _registered(name: str) -> models.Model:
    # services.models imports this file while it builds its registry: read the built-in tuple.
    return next(model for model in models.MODELS if model.name == name)


def _broken(name: str, server: str = "", prepare: str | None = None) -> models.Model:
    model = _registered(name)
    return replace(
        model,
        server=f"{_SERVERS}:{server}" if server else model.server,
        prepare=model.prepare if prepare is None else prepare,
    )


# io-wait, gil-tax: every request of the thread per connection takes one global lock.
LOCKED_THREADS = _broken("threaded", "LockedThreadsServer")
# io-wait: gevent patched except `time`, so /sleep's time.sleep blocks the hub.
SLEEPING_HUB = _broken("gevent", prepare=f"{__name__}:patch_all_but_time")
# cpu-work: the thread per connection computes /work in a pool of worker processes.
WORK_IN_PROCESSES = _broken("threaded", "WorkInProcessesServer")
# cores: the process pool quietly runs thread workers.
THREADS_FOR_PROCESSES = _broken("pool", "ThreadsForProcessesServer")
# processes-x-coroutines: asyncio whose worker processes all pin themselves to one CPU.
ONE_CPU_PROCESSES = _broken("asyncio", "OneCpuAsyncioServer")
# pool-bound: the pool ignores --workers.
UNSIZED_POOL = _broken("pool", "UnsizedPoolServer")
# many-clients: at most CAPPED_SESSIONS connections are served, the others wait for a slot.
CAPPED_THREADS = _broken("threaded", "CappedThreadsServer")
# blocked-loop: gevent's /work yields to the hub between slices.
YIELDING_WORK = _broken("gevent", "YieldingWorkServer")
# closed-loop: the server runs in a child process, so stopping the process the runner started
# stalls nothing.
UNSTOPPABLE = _broken("threaded", prepare=f"{_SERVERS}:serve_from_a_child")
# db-wait: the database pool is one connection whatever --db-pool says.
ONE_DB_CONNECTION = _broken("threaded", "OneDatabaseConnectionServer")
# db-pool-bound: the database pool ignores --db-pool.
UNSIZED_DB_POOL = _broken("threaded", "UnsizedDatabasePoolServer")
# undetected-io: gevent's `--db-driver blocking` quietly uses the cooperative driver.
COOPERATIVE_BLOCKING = _broken("gevent", "CooperativeBlockingServer")


def patch_all_but_time() -> None:
    """gevent's monkey-patching with `time` left alone: time.sleep blocks the hub."""
    from gevent import monkey

    monkey.patch_all(time=False)

"""What the private-API adapters found at start-up: each one checked, and which fell back.

A few fast or necessary paths lean on another library's private state, each behind one small
adapter that checks at start-up that what it relies on is there:

- `gevent-io` (`servers/greenlets.py`): gevent sockets' `_sock`, `_wait` and `_read_event`,
  checked with `monkey.is_module_patched("socket")` and a probe on a socketpair. Fallback: the
  socket's own `recv` and `sendall` (about 10 % slower echo).
- `executor-processes` (`servers/executors.py`): `ProcessPoolExecutor._processes`, checked at
  every executor build. Fallback: the pids the warm-up tasks report; a worker's death is then
  noticed only by the requests it fails.
- `gevent-os-primitives` (`metrics.py`): `gevent.monkey.get_original` for an OS thread with OS
  sockets. Fallback: `/metrics` on prometheus_client's green-thread server.

A fallback is loud: a WARNING log line naming the adapter and the reason, and
`arena_adapter_fallback{adapter="..."}` goes from 0 to 1 (docs/METRICS.md). Only the adapters the
running model checked are exported.
"""

from __future__ import annotations

import logging

from services.session import os_lock

log = logging.getLogger("arena.adapters")


class Adapters:
    """Each checked adapter of one server, with the reason it fell back (None: it did not)."""

    def __init__(self) -> None:
        # Checks run at start-up and when an executor is replaced; scrapes read from the metrics
        # thread, a native one even under gevent: an OS lock (see session.os_lock).
        self.lock = os_lock()
        self.checked: dict[str, str | None] = {}

    def works(self, adapter: str) -> None:
        """Record that `adapter` found what it relies on (a later fallback still wins)."""
        with self.lock:
            self.checked.setdefault(adapter, None)

    def fell_back(self, adapter: str, reason: str, logger: logging.Logger = log) -> None:
        """Record, and log once as a warning, that `adapter` fell back because of `reason`."""
        with self.lock:
            first = self.checked.get(adapter) is None
            self.checked[adapter] = reason
        if first:
            logger.warning("adapter %s falls back: %s", adapter, reason)

    def fallbacks(self) -> dict[str, str]:
        """The adapters that fell back, with their reasons."""
        with self.lock:
            return {name: reason for name, reason in self.checked.items() if reason is not None}

    def snapshot(self) -> dict[str, bool]:
        """Every checked adapter -> whether it fell back."""
        with self.lock:
            return {name: reason is not None for name, reason in sorted(self.checked.items())}

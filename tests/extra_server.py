"""The recipe test's model: a `threading.Thread` per connection, the whole of it.

Everything else (protocol, framing, limits, metrics, draining) is the shared session and the
blocking server's lifecycle: a model only says how a connection gets run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from services.servers.base import BlockingServer


class PlainThreadsServer(BlockingServer):
    """A thread per connection, started the textbook way (`Thread.start` waits for it to run)."""

    model = "plainthreads"

    def spawn(self, function: Callable[..., None], *args: object) -> threading.Thread:
        """Run `function` in a new daemon thread."""
        thread = threading.Thread(target=function, args=args, daemon=True)
        thread.start()
        return thread

    def join(self, task: object, timeout: float) -> None:
        """Wait for a thread."""
        if isinstance(task, threading.Thread):
            task.join(timeout)

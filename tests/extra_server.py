"""The recipe test's model: a `threading.Thread` per connection, the whole of it.

Everything else (protocol, framing, limits, metrics, draining) is the shared session and the
blocking server's lifecycle, whose default is a thread per connection started the textbook way
(`Thread.start` waits for it to run): a model only says how a connection gets run, and this one
says nothing more.
"""

from __future__ import annotations

from services.servers.base import BlockingServer


class PlainThreadsServer(BlockingServer):
    """A thread per connection, as `BlockingServer` runs it by default."""

    model = "plainthreads"

"""How does a connection get run? Four answers to one question.

Every server here speaks the same protocol (`services.protocol`) through the same framing and
counting (`services.session`) and has the same lifecycle (`base.Server`: `start()` binds and
returns the real address, `stop(grace)` stops accepting, answers what was already read, closes
the rest). What differs is only the concurrency policy, in the spirit of CPython's
`socketserver` mix-ins and gevent's `spawn` argument:

- `threaded.ThreadedServer` gives each connection an OS thread running the blocking session
  loop. Simple and preemptive: a slow request delays only its own client, but every idle
  connection costs a thread (a stack, a scheduler entry), and the GIL serialises CPU work.
- `pool.PoolServer` keeps every socket in one reactor thread (a selector) and sends each
  request -- not each connection -- to a `concurrent.futures` executor. A pool that ran whole
  connections would serve only `workers` clients and starve the rest; per-request dispatch
  serves them all, and process workers use every core for CPU work. The price: each request
  crosses to a worker and back, and requests queue when every worker is busy.
- `greenlets.GeventServer` runs the same blocking loop as the threaded model, but in a greenlet
  per connection on gevent's event loop (monkey-patched). Idle and waiting connections are
  nearly free and a `/sleep` yields to everyone else -- until a request burns CPU: then the one
  loop is blocked and every client waits, which the loop-lag probe makes visible.
- `eventloop.AsyncioServer` is the same single loop with explicit switching: each connection is
  an `asyncio.Protocol` on one asyncio event loop (uvloop, or the standard one), nothing is
  patched, and control goes back to the loop only where the code says so (a callback returns,
  `/sleep` is a timer). Cheaper per request than greenlets, and just as blocked by `/work`; a
  blocking call that gevent would have patched (`time.sleep`) blocks it too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.config import Settings
    from services.models import Model
    from services.servers.base import Server


def server_class(model: Model) -> type[Server]:
    """Import the model's module now and return its Server class (`Model.server`)."""
    module_name, _, class_name = model.server.partition(":")
    cls: type[Server] = getattr(importlib.import_module(module_name), class_name)
    return cls


def create_server(settings: Settings) -> Server:
    """Build the server for `settings.model`, importing only that model's module."""
    from services import models

    try:
        model = models.get(settings.model)
    except KeyError as error:
        raise ValueError(str(error)) from None
    return server_class(model)(settings)

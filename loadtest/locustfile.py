"""Socket Arena load test: one user class per target server, all driven by one Locust.

    locust -f loadtest/locustfile.py                      # web UI on :8089, 100 users per target
    locust -f loadtest/locustfile.py --headless -t 30s --csv out/run

Knobs, defaults and the /metrics contract: docs/LOADTEST.md.
"""

from __future__ import annotations

import os
import sys

try:
    import loadtest  # noqa: F401 - only checks that the package is importable
except ImportError:  # started from outside the repository: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from locust import events

from loadtest import exporter, users, workload
from loadtest.users import SocketUser


class ThreadedUser(SocketUser):
    """Loads the thread-per-connection server."""

    target = "threaded"


class PoolUser(SocketUser):
    """Loads the reactor + executor pool server."""

    target = "pool"


class GeventUser(SocketUser):
    """Loads the gevent server."""

    target = "gevent"


events.init_command_line_parser.add_listener(workload.add_arguments)
events.init.add_listener(workload.check_options)
events.init.add_listener(exporter.install)
events.test_start.add_listener(users.apply_target_selection)

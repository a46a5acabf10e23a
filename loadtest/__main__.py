"""`python -m loadtest [LOCUST OPTIONS]`: Locust with this project's locustfile and knobs.

Locust prints `--help` before it imports any locustfile (locust issue #2917), so
`locust -f loadtest/plugin/locustfile.py --help` cannot list the knobs a locustfile adds. This runs
Locust's own `main` with the knobs registered first: `python -m loadtest --help` lists Locust's
options and the project's, and every other command line means what it means to `locust`
(`-f loadtest/plugin/locustfile.py` is added when no locustfile is given).
"""

from __future__ import annotations

import os
import sys

from locust import events
from locust.main import main as locust_main

from loadtest.plugin import workload

LOCUSTFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin", "locustfile.py")


def with_locustfile(args: list[str]) -> list[str]:
    """The arguments, with `-f` pointing at the project's locustfile unless one is given."""
    given = any(
        arg in ("-f", "--locustfile") or arg.startswith(("-f", "--locustfile=")) for arg in args
    )
    return args if given else ["-f", LOCUSTFILE, *args]


def main() -> None:
    """Register the knobs, then hand over to Locust (which exits)."""
    events.init_command_line_parser.add_listener(workload.add_arguments)
    sys.argv = ["locust", *with_locustfile(sys.argv[1:])]
    locust_main()


if __name__ == "__main__":
    main()

"""Socket Arena load test: one user class per target server, all driven by one Locust.

    locust -f loadtest/plugin/locustfile.py           # web UI on :8089, 100 users per target
    locust -f loadtest/plugin/locustfile.py --headless -t 30s --csv out/run --scenario io-wait

The user classes are made from the model registry (services/models.py): one per model, named
after it (`ThreadedUser`, `PoolUser`, `GeventUser`, `AsyncioUser`), so a new model needs no
edit here.
Knobs, scenarios, defaults and the /metrics contract: docs/LOADTEST.md and docs/LESSONS.md.
"""

from __future__ import annotations

import os
import sys

try:
    import loadtest  # noqa: F401 - only checks that the package is importable
except ImportError:  # started from outside the repository: make the package importable
    here = os.path.dirname(os.path.abspath(__file__))  # loadtest/plugin: its parent's parent
    sys.path.insert(0, os.path.dirname(os.path.dirname(here)))

from locust import events

from loadtest.plugin import exporter, users, workload
from loadtest.plugin.users import SocketUser
from services import models


def user_class_name(model_name: str) -> str:
    """`threaded` -> `ThreadedUser`, `process-pool` -> `ProcessPoolUser`."""
    words = model_name.replace("_", "-").split("-")
    return "".join(word.capitalize() for word in words) + "User"


# Locust collects the User subclasses it finds in this module's namespace.
for _model in models.MODELS:
    _user = type(
        user_class_name(_model.name),
        (SocketUser,),
        {
            "__doc__": f"Loads the {_model.name} server ({_model.summary}).",
            "__module__": __name__,
            "target": _model.name,
            "host": workload.DEFAULT_ADDRESSES[_model.name],
        },
    )
    globals()[_user.__name__] = _user
del _model, _user

events.init_command_line_parser.add_listener(workload.add_arguments)
events.init.add_listener(workload.check_options)
events.init.add_listener(users.prepare_run)
events.init.add_listener(exporter.install)
events.test_start.add_listener(users.apply_target_selection)

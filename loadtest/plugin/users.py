"""The abstract Locust user that talks the line protocol to one target, and target selection.

A concrete user (in locustfile.py) only names its target. Each user owns one :class:`LineClient`
and, before every request, reads the current workload, so knob changes apply at once.

How many users run: every concrete class has ``fixed_count`` users (``--users-per-target``,
default 100), and classes whose target is not in ``--targets`` get none. Locust's ``-u`` (400 in
locust.conf) is then only a cap: below 100 x targets, Locust spreads it evenly over the targets.
Both are applied when a test starts (:func:`apply_target_selection`), on the master or the
stand-alone runner, which is where Locust decides how many users of each class to run. When the
users per target come from the scenario (the knob is blank), the scenario decides the total:
:func:`scenario_user_count` raises ``-u`` to users per target x targets, so one click on
``many-clients`` runs its 1000 users per target.

In arrival-rate mode (``--arrival-rate``, :mod:`loadtest.plugin.arrivals`) the users of a target are
the connections of a pool: a scheduler hands them starts on a timetable, and each request's
latency counts from the instant it was due. The pool is then always ``--users-per-target``
connections (``-u`` is raised to it, never a cap), since the rate share of a process is
reckoned from its users.

Each concrete class also has its target's address as Locust's ``host`` (:func:`sync_hosts`), so
Locust's web UI neither asks for a host nor offers to override one.
"""

from __future__ import annotations

import itertools
import logging
import random
import string
import time
from typing import Any

from locust import User, task

from loadtest.plugin import arrivals
from loadtest.plugin.client import LineClient
from loadtest.plugin.workload import (
    DEFAULT_USERS_PER_TARGET,
    KnobError,
    Workload,
    current_workload,
    filler,
)

logger = logging.getLogger(__name__)

# A per-process tag plus a per-user serial make each user's payload distinct, so a server that
# mixed up connections would send back another user's text and fail validation.
_PROCESS_TAG = "".join(random.choices(string.ascii_lowercase, k=3))
_user_serials = itertools.count(1)
# After failed connects, wait longer before the next try (capped), so a downed server is not
# hammered by every user at once.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0


class SocketUser(User):
    """One simulated client of one target server."""

    abstract = True
    target: str = ""
    host = ""  # tcp://host:port of the target, kept in step with the knobs by sync_hosts
    fixed_count = DEFAULT_USERS_PER_TARGET

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self._token = f"{_PROCESS_TAG}{next(_user_serials)}".encode()
        self._sequence = 0
        self.client: LineClient | None = None

    def on_start(self) -> None:
        """Create the client; it connects on the first request."""
        workload = current_workload(self.environment.parsed_options)
        self.client = LineClient(
            self.target,
            workload.addresses[self.target],
            self.environment.events.request,
            connect_timeout=workload.timeout_s,
        )
        arrivals.timetable(self.target, self.environment).join(self)

    def on_stop(self) -> None:
        """Close the connection."""
        arrivals.timetable(self.target, self.environment).leave(self)
        if self.client is not None:
            self.client.close()

    def wait_time(self) -> float:
        """Think time from the knobs, or a growing back-off while the target refuses connections."""
        workload = current_workload(self.environment.parsed_options)
        # In arrival-rate mode the timetable paces the requests: no think time.
        think = 0.0 if workload.open_loop else workload.think_ms / 1000 * random.uniform(0.5, 1.5)
        failures = self.client.consecutive_connect_failures if self.client else 0
        if failures:
            backoff = min(BACKOFF_FIRST_S * 2 ** (failures - 1), BACKOFF_MAX_S)
            return max(think, backoff * random.uniform(0.5, 1.0))
        return think

    @task
    def send_one_request(self) -> None:
        """Send one request chosen by the workload shares and check its reply."""
        workload = current_workload(self.environment.parsed_options)
        assert self.client is not None
        self.client.retarget(workload.addresses[self.target])
        self.client.connect_timeout = workload.timeout_s
        if workload.open_loop:
            self._send_when_due(workload)
            return
        command = workload.pick_command(random.random())
        line, expected = workload.build_request(command, self._payload(workload.payload_bytes))
        self.client.request(command, line, expected, workload.reply_timeout(command))

    def _send_when_due(self, workload: Workload) -> None:
        """Arrival-rate mode: wait for the next start of the timetable and send it."""
        assert self.client is not None
        start = arrivals.timetable(self.target, self.environment).take(self.client.connected)
        if start is None:
            return  # nothing due for a while: the task runs again and rechecks the mode
        command = workload.pick_command(random.random())
        waited = time.perf_counter() - start.due
        if waited > workload.timeout_s:
            # Queued behind busy connections for longer than any reply may take: a timeout.
            error = TimeoutError(
                f"no free connection for {waited:.1f} s after the request was due "
                f"(--timeout-s {workload.timeout_s:g}); not sent"
            )
            self.client.missed(command, start.due, error)
            return
        line, expected = workload.build_request(command, self._payload(workload.payload_bytes))
        self.client.request(command, line, expected, workload.reply_timeout(command), start)

    def _payload(self, size: int) -> bytes:
        self._sequence = (self._sequence + 1) % 10
        head = b"%s-%d-" % (self._token, self._sequence)
        if size <= len(head):
            return head[:size]
        return head + filler(size - len(head))


def apply_target_selection(environment: Any, **_kwargs: Any) -> None:
    """Give selected targets' user classes `--users-per-target` users and the others none."""
    workload = current_workload(environment.parsed_options)
    sync_hosts(environment, workload)
    classes = socket_user_classes(environment)
    for cls in classes:
        selected = cls.target in workload.targets
        cls.fixed_count = workload.users_per_target if selected else 0
        # weight 0 too: otherwise Locust would hand any users left over from -u to this class.
        cls.weight = 1 if selected else 0
    wanted = sum(cls.fixed_count for cls in classes)
    num_users = getattr(environment.parsed_options, "num_users", None)
    if num_users is not None and num_users < wanted:
        logger.warning(
            "-u %d is below --users-per-target x targets = %d: spreading %d users over %s",
            num_users,
            wanted,
            num_users,
            ",".join(workload.targets),
        )
    logger.info(
        "scenario %s: targets %s with %d users each; %s",
        workload.scenario,
        ",".join(workload.targets),
        workload.users_per_target,
        ", ".join(
            f"{knob.flag} {value} ({source})" for knob, value, source in workload.knob_values()
        ),
    )


def socket_user_classes(environment: Any) -> list[type[SocketUser]]:
    """The concrete user classes of this Locust that load a target."""
    return [cls for cls in environment.user_classes if issubclass(cls, SocketUser)]


def address_url(address: tuple[str, int]) -> str:
    """(host, port) as the knobs write it: tcp://host:port."""
    host, port = address
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def sync_hosts(environment: Any, workload: Workload | None = None) -> None:
    """Set each user class's `host` to its target's current address."""
    workload = workload or current_workload(environment.parsed_options)
    for cls in socket_user_classes(environment):
        cls.host = address_url(workload.addresses[cls.target])


def scenario_user_count(workload: Workload, user_count: int | None) -> int | None:
    """The number of users to start: at least users per target x targets when the scenario sets
    the users per target or in arrival-rate mode (the pool); `user_count` (Locust's -u, a cap)
    when the knob was given in the closed loop."""
    if "users_per_target" in workload.given and not workload.open_loop:
        return user_count
    return max(user_count or 0, workload.users_per_target * len(workload.targets))


def prepare_run(environment: Any, **_kwargs: Any) -> None:
    """The ``init`` listener: user classes' hosts from the knobs, -u raised for the scenario."""
    options = environment.parsed_options
    if options is None:
        return
    try:
        workload = current_workload(options)
    except KnobError:
        return  # workload.check_options reports it and exits
    sync_hosts(environment, workload)
    given = getattr(options, "num_users", None)
    if given is not None:
        options.num_users = scenario_user_count(workload, given)
        if options.num_users != given:
            logger.info(
                "scenario %s runs %d users per target: %d users instead of -u %d "
                "(give --users-per-target to make -u a cap)",
                workload.scenario,
                workload.users_per_target,
                options.num_users,
                given,
            )

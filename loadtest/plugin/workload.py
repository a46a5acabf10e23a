"""The workload knobs: command-line arguments, validation, and the requests they produce.

Every knob is a Locust custom argument (``--payload-bytes``, also ``LOCUST_PAYLOAD_BYTES`` and a
field in the web UI). Users call :func:`current_workload` before every request, so a value changed
in the web UI's edit form takes effect on the next request without restarting the test. Values are
validated in one place, :meth:`Workload.from_options`, which the command line, the web UI's start
and edit forms and the users all go through; a bad value is refused with a message that names the
knob, the allowed range and the value given.

``--scenario`` picks a scenario of ``loadtest.plugin.scenarios`` (the lessons of
``loadtest.lessons.catalog`` and the database ones); the scenario's preset fills every
workload knob left blank. A knob's default is blank, so a value given anywhere (flag, ``LOCUST_*``
variable, config file, a field typed into the web form) wins over the scenario, and clearing the
field hands the knob back to it. Parsed options keep the knobs as text: Locust's web form casts a
posted value to the type of the stored one, and text is the one type every value (blank too) has.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from loadtest.plugin import locust_adapter, scenarios

# The protocol's limits and /work cost, from the one place they are defined (the Locust image
# ships services/protocol.py, which imports only the standard library).
from services import models
from services.protocol import MAX_SLEEP_MS, MAX_WORK_ROUNDS, WORK_ROUND_NS

logger = logging.getLogger(__name__)

TARGETS = models.NAMES
COMMANDS = ("echo", "ping", "sleep", "work", "db")
CONNECT = "connect"
DEFAULT_ADDRESSES = {model.name: f"tcp://127.0.0.1:{model.port}" for model in models.MODELS}
DEFAULT_USERS_PER_TARGET = 100
LOCUST_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locust.conf")
# The servers' default line limit is 65536 bytes; leave room for "/sleep 60000 " in front of TEXT.
MAX_PAYLOAD_BYTES = 65000
# Arrival-rate mode: requests per second per target (0 = closed loop) and how starts are spaced.
MAX_ARRIVAL_RATE = 100_000
ARRIVALS = ("poisson", "uniform")
WORK_ROUNDS_PER_SECOND = 1e9 / WORK_ROUND_NS


class KnobError(ValueError):
    """A refused knob value; the message names the knob, what is allowed and what was given."""


def _bounded[N: (int, float)](
    convert: Callable[[str], N], kind: str, low: N, high: N
) -> Callable[[object], N]:
    """A knob parser: `convert` the text, then keep it from `low` to `high` (both included)."""

    def show(bound: float) -> str:
        return str(bound) if isinstance(bound, int) else f"{bound:g}"  # 10000000, not 1e+07

    allowed = f"must be {kind} from {show(low)} to {show(high)}"

    def parse(value: object) -> N:
        text = str(value).strip()
        try:
            number = convert(text)
        except ValueError:
            raise KnobError(f"{allowed}, got {text!r}") from None
        if not math.isfinite(number) or not low <= number <= high:
            raise KnobError(f"{allowed}, got {text!r}")
        return number

    return parse


def _integer(low: int, high: int) -> Callable[[object], int]:
    return _bounded(int, "a whole number", low, high)


def _number(low: float, high: float) -> Callable[[object], float]:
    return _bounded(float, "a number", low, high)


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip()
        if text not in choices:
            raise KnobError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _blank_or(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    """A parser that reads a blank value as None: "not given, take it from the scenario"."""

    def parse_or_none(value: object) -> Any:
        if value is None or not str(value).strip():
            return None
        return parse(value)

    return parse_or_none


def _address(value: object) -> str:
    text = str(value).strip()
    parse_address(text)
    return text


def parse_address(text: str) -> tuple[str, int]:
    """Split ``tcp://host:port`` into (host, port); refuse anything else."""
    example = "tcp://127.0.0.1:9001"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise KnobError(f"must look like {example}, got {text!r}") from None
    if parts.scheme != "tcp" or not parts.hostname or port is None or parts.path or parts.query:
        raise KnobError(f"must look like {example}, got {text!r}")
    if not 1 <= port <= 65535:
        raise KnobError(f"port must be from 1 to 65535, got {text!r}")
    return parts.hostname, port


def _target_list(value: object) -> str:
    return ",".join(parse_targets(str(value)))


def parse_targets(text: str) -> tuple[str, ...]:
    """Split ``threaded,pool`` into known, distinct target names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise KnobError(f"must name at least one of {','.join(TARGETS)}, got {text!r}")
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise KnobError(f"unknown target {unknown[0]!r}; choose from {','.join(TARGETS)}")
    if len(set(names)) != len(names):
        raise KnobError(f"names a target twice: {text!r}")
    return names


@dataclass(frozen=True)
class Knob:
    """One custom argument: its flag, default, parser and help text."""

    flag: str
    default: str
    parse: Callable[[object], Any]
    help: str
    # A workload knob: blank by default, and a blank value means "the scenario's preset".
    from_scenario: bool = False
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        """The attribute name in parsed options (and the web UI form field)."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env_var(self) -> str:
        """The environment variable Locust reads it from."""
        return "LOCUST_" + self.dest.upper()


def _workload_knob(flag: str, parse: Callable[[object], Any], text: str) -> Knob:
    return Knob(flag, "", _blank_or(parse), f"{text}; blank = scenario's", from_scenario=True)


SCENARIOS = tuple(lesson.id for lesson in scenarios.LESSONS)
# The order here is the order of `--help`, the docs and the web UI's "Custom parameters": the
# scenario first, then what each user does, then where the users go. The help texts are the web
# form's labels too, on one line: keep them short.
KNOBS: tuple[Knob, ...] = (
    Knob(
        "--scenario",
        scenarios.DEFAULT_LESSON,
        _choice(SCENARIOS),
        "the lesson: sets the workload knobs left blank; see the Scenario tab",
        choices=SCENARIOS,
    ),
    _workload_knob(
        "--think-ms", _number(0, 600_000), "mean ms a user pauses between requests (0.5x-1.5x)"
    ),
    _workload_knob(
        "--arrival-rate",
        _number(0, MAX_ARRIVAL_RATE),
        "requests/s per target on a fixed timetable (open loop); 0 = closed loop",
    ),
    Knob(
        "--arrival",
        ARRIVALS[0],
        _choice(ARRIVALS),
        "how --arrival-rate spaces the starts: poisson (random) or uniform",
        choices=ARRIVALS,
    ),
    _workload_knob("--sleep-share", _number(0, 1), "fraction of requests that are /sleep"),
    _workload_knob("--sleep-ms", _integer(0, MAX_SLEEP_MS), "ms each /sleep waits on the server"),
    _workload_knob("--work-share", _number(0, 1), "fraction of requests that are /work"),
    _workload_knob(
        "--work-rounds", _integer(0, MAX_WORK_ROUNDS), "CPU rounds per /work, ~10,000 a ms"
    ),
    # /db has /sleep's argument rules and cap; the server waits in the database (pg_sleep).
    _workload_knob("--db-share", _number(0, 1), "fraction of requests that are /db"),
    _workload_knob("--db-ms", _integer(0, MAX_SLEEP_MS), "ms each /db waits in the database"),
    _workload_knob("--ping-share", _number(0, 1), "fraction of requests that are /ping"),
    _workload_knob(
        "--payload-bytes",
        _integer(0, MAX_PAYLOAD_BYTES),
        "bytes of text per echo, /sleep, /work, /db",
    ),
    _workload_knob("--users-per-target", _integer(1, 100_000), "users per target, at test start"),
    Knob(
        "--timeout-s",
        "10",
        _number(0.1, 3600),
        "seconds to wait for a connect or a reply (plus what the request asks for)",
    ),
    Knob(
        "--targets",
        ",".join(TARGETS),
        _target_list,
        f"target: which ones to load, {','.join(TARGETS)}; at test start",
    ),
    *(
        Knob(
            f"--{target}-target",
            DEFAULT_ADDRESSES[target],
            _address,
            f"target: the {target} server's address, tcp://host:port",
        )
        for target in TARGETS
    ),
)
KNOBS_BY_DEST = {knob.dest: knob for knob in KNOBS}
# The shares of the request mix, in the order pick_command takes them; echo is the rest.
SHARES = ("ping_share", "sleep_share", "work_share", "db_share")
WORKLOAD_KNOBS = tuple(knob for knob in KNOBS if knob.from_scenario)


def add_arguments(parser: Any, **_kwargs: Any) -> None:
    """Register every knob on Locust's parser and read plugin/locust.conf (lowest priority)."""
    # Locust only looks for ./locust.conf, which depends on the working directory. Reading ours
    # first means ~/.locust.conf, ./locust.conf, --config, env vars and flags all override it.
    locust_adapter.read_config_first(parser, LOCUST_CONF)
    # `python -m loadtest` registers this listener before Locust imports the locustfile, which
    # registers it again: add each knob once.
    known = locust_adapter.known_options(parser)
    for knob in KNOBS:
        locust_adapter.add_argument_once(
            parser,
            knob.flag,
            known,
            default=knob.default,
            type=_argparse_type(knob),
            env_var=knob.env_var,
            help=knob.help,
            include_in_web_ui=True,
            choices=knob.choices,
        )


def check_options(environment: Any, **_kwargs: Any) -> None:
    """Refuse a bad combination of knobs at start-up (an ``init`` listener); exits with status 2."""
    try:
        Workload.from_options(environment.parsed_options)
    except KnobError as error:
        sys.stderr.write(f"locust: error: {error}\n")
        sys.exit(2)


def _argparse_type(knob: Knob) -> Callable[[str], str]:
    # Validate, but keep the text (see the module docstring): Workload.from_options parses it.
    def convert(value: str) -> str:
        try:
            knob.parse(value)
        except KnobError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value.strip()

    convert.__name__ = knob.dest  # argparse names the type in some messages
    return convert


@dataclass(frozen=True)
class Workload:
    """A validated, immutable set of knob values."""

    addresses: Mapping[str, tuple[str, int]]
    targets: tuple[str, ...]
    users_per_target: int
    payload_bytes: int
    ping_share: float
    sleep_share: float
    sleep_ms: int
    work_share: float
    work_rounds: int
    think_ms: float
    timeout_s: float
    db_share: float = 0.0
    db_ms: int = 0
    arrival_rate: float = 0.0
    arrival: str = ARRIVALS[0]
    scenario: str = scenarios.DEFAULT_LESSON
    # The workload knobs given explicitly (not blank), which the scenario did not set.
    given: frozenset[str] = frozenset()

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | Any) -> Workload:
        """Validate knob values from parsed options or a mapping (a web form); raise KnobError."""
        raw = options if isinstance(options, Mapping) else vars(options)
        values: dict[str, Any] = {}
        for knob in KNOBS:
            value = raw.get(knob.dest, knob.default)
            if value is None:
                value = knob.default
            try:
                values[knob.dest] = knob.parse(value)
            except KnobError as error:
                raise KnobError(f"{knob.flag} {error}") from None
        lesson = scenarios.get(values["scenario"])
        given = frozenset(k.dest for k in KNOBS if k.from_scenario and values[k.dest] is not None)
        for knob in KNOBS:
            if knob.from_scenario and values[knob.dest] is None:
                values[knob.dest] = knob.parse(scenario_value(lesson, knob.dest))
        shares = sum(values[dest] for dest in SHARES)
        if shares > 1 + 1e-9:
            raise KnobError(
                f"{' + '.join(KNOBS_BY_DEST[dest].flag for dest in SHARES)} must not exceed 1 "
                f"(the rest is echo), got {shares:g} (scenario {lesson.id}: blank shares are "
                "its own)"
            )
        # Every workload knob, --timeout-s and --arrival keep their parsed value and their name.
        passed = (*(knob.dest for knob in WORKLOAD_KNOBS), "timeout_s", "arrival")
        as_parsed = {dest: values[dest] for dest in passed}
        return cls(
            addresses={t: parse_address(values[f"{t}_target"]) for t in TARGETS},
            targets=parse_targets(values["targets"]),
            scenario=lesson.id,
            given=given,
            **as_parsed,
        )

    def knob_values(self) -> list[tuple[Knob, str, str]]:
        """(knob, value as text, where it came from) for every workload knob, in KNOBS order."""
        rows = []
        for knob in KNOBS:
            if knob.from_scenario:
                source = "given" if knob.dest in self.given else f"scenario {self.scenario}"
                value = getattr(self, knob.dest)
                text = str(value) if isinstance(value, int) else f"{value:g}"
                rows.append((knob, text, source))
        return rows

    @property
    def open_loop(self) -> bool:
        """Arrival-rate mode: requests start on a timetable, not after the previous answer."""
        return self.arrival_rate > 0

    def pick_command(self, draw: float) -> str:
        """Map a uniform draw in [0, 1) to a command according to the shares."""
        threshold = self.ping_share
        if draw < threshold:
            return "ping"
        threshold += self.sleep_share
        if draw < threshold:
            return "sleep"
        threshold += self.work_share
        if draw < threshold:
            return "work"
        threshold += self.db_share
        if draw < threshold:
            return "db"
        return "echo"

    def build_request(self, command: str, text: bytes) -> tuple[bytes, bytes]:
        """The request line (with its newline) and the exact reply expected (without it)."""
        if command == "ping":
            return b"/ping\n", b"PONG"
        if command == "echo":
            # Our text never starts with "/", so it is plain echo (the server upper-cases it).
            return text + b"\n", text.upper()
        if command == "sleep":
            head = b"/sleep %d" % self.sleep_ms
        elif command == "work":
            head = b"/work %d" % self.work_rounds
        elif command == "db":
            head = b"/db %d" % self.db_ms
        else:
            raise ValueError(f"unknown command {command!r}")
        line = head + b" " + text + b"\n" if text else head + b"\n"
        return line, text.upper()

    def reply_timeout(self, command: str) -> float:
        """Seconds to wait for a reply: the base timeout plus what the server is asked to spend."""
        if command == "sleep":
            return self.timeout_s + self.sleep_ms / 1000
        if command == "db":
            # The query's own wait; a wait for a pool connection is within the base timeout.
            return self.timeout_s + self.db_ms / 1000
        if command == "work":
            # Ten times the nominal CPU time: a loaded 2-core box runs the rounds much slower.
            return self.timeout_s + 10 * self.work_rounds / WORK_ROUNDS_PER_SECOND
        return self.timeout_s


def scenario_value(lesson: scenarios.Lesson, dest: str) -> str:
    """A lesson's preset for a workload knob; the default lesson's when the lesson leaves it out."""
    value = lesson.knobs.get(dest)
    if value is None:
        value = scenarios.get(scenarios.DEFAULT_LESSON).knobs[dest]
    return value


@functools.lru_cache(maxsize=8)
def filler(size: int) -> bytes:
    """Lower-case ASCII text of `size` bytes, so the upper-casing echo is actually checked."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz"
    return (alphabet * (size // len(alphabet) + 1))[:size]


class WorkloadCache:
    """Re-validates the knobs only when their raw values change (read before every request)."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._workload: Workload | None = None

    def get(self, options: Any) -> Workload:
        """The workload for these parsed options; the last good one if the new values are bad."""
        raw = vars(options) if options is not None else {}
        key = tuple(raw.get(dest) for dest in KNOBS_BY_DEST)
        if key != self._key or self._workload is None:
            try:
                self._workload = Workload.from_options(raw)
            except KnobError as error:
                if self._workload is None:
                    raise
                logger.error("ignoring bad knob value, keeping the previous workload: %s", error)
            self._key = key
        return self._workload


_cache = WorkloadCache()


def current_workload(options: Any) -> Workload:
    """The validated workload for Locust's parsed options (cached; one per process)."""
    return _cache.get(options)

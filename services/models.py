"""The model registry: every concurrency model of the arena, named once.

Everything that lists the models reads this tuple: the server CLI (`python -m services MODEL`),
the local stack, soak, the benchmark, the Locust users, the compose and dashboard checks and
every parametrized test. A test (tests/test_registry.py) fails when a list of models is written
anywhere else.

Standard library only (services/options.py, its parsers, is too) and no model module imported
here: `python -m services gevent` reads the registry before gevent monkey-patches, and the
Locust image ships these two files without the servers.

Adding a model:
1. its module, `services/servers/<module>.py` (never named after a library it imports), with a
   `Server` subclass whose `model` is the name;
2. one `Model(...)` entry below (the next free host ports, a dashboard colour);
3. its service in `docker-compose.yml` (copy a server service; the port variable is
   `ARENA_<NAME>_PORT`) and in `docker/stack.yml` (replicas `ARENA_<NAME>_REPLICAS`), its
   `LOCUST_<NAME>_TARGET` in both.
The Grafana dashboard and Prometheus's scrape jobs are generated from this registry (colour,
queries, own_metrics' panels, a DNS-discovered job): `make dashboard` rewrites both. The tests
then run every suite on it and check that the compose file and the generated files name it
(docs/ARCHITECTURE.md, "Adding a model"; tests/test_recipe.py proves it on a model of its own).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

from services import options as parse
from services.options import Option

METRICS_PORT_OFFSET = 100  # a model's /metrics port in the local stack: its port + 100
# How a server runs `/db` (services/database.py): the cooperative driver a practitioner picks
# for the model, or, where one thread serves every connection, a blocking driver that stalls it
# (the seed's warning) and the same driver fixed.
DB_DRIVERS = ("default", "blocking", "blocking-fixed")


@dataclass(frozen=True)
class Variant:
    """One way the benchmark and the tests run a model: a name, its flags, its textbook twin."""

    name: str  # e.g. "pool-process"; a model's only variant carries the model's name
    flags: tuple[str, ...] = ()  # added to `python -m services MODEL`
    textbook: str | None = None  # the minimal server it is compared with (loadtest/bench)
    # The server suites (protocol, servers, metrics, reliability) run it too, besides the
    # model's default run: its flags change the code that serves a connection (an event loop).
    suites: bool = False


@dataclass(frozen=True)
class Model:
    """One concurrency model: how to build its server and how the arena shows it."""

    name: str  # CLI argument, compose service, Locust target, Prometheus job
    server: str  # "module:Class" of its Server, imported only when chosen
    summary: str  # one line for --help and the docs
    colour: str  # Grafana's fixed colour for this model in every panel
    port: int  # default host port of the protocol (compose, local stack, Locust targets)
    # What runs one connection: "thread", "greenlet", "reactor" (an event loop handing requests
    # to a pool) or "callbacks" (a Protocol's callbacks on an event loop, requests inline).
    flow: str
    variants: tuple[Variant, ...]  # how the benchmark and the server tests run it
    sized: bool = False  # takes --workers, the size of its pool (the benchmark sets it)
    small_flags: tuple[str, ...] = ()  # flags for a small run on 2 cores (tests, soak)
    own_metrics: tuple[str, ...] = ()  # metric families only this model exposes
    # The --db-driver values it takes: the blocking ones only where one thread runs every
    # connection, so that a blocking call stalls them all (gevent, asyncio).
    db_drivers: tuple[str, ...] = ("default",)
    # Takes --processes N (services/supervisor.py): N copies of it on one port.
    processes: bool = True
    # "module:function" that `python -m services` calls before it imports anything else (gevent
    # must monkey-patch before sockets, threads or locks exist); empty: nothing to prepare.
    prepare: str = ""
    # Why its echo is fast, for the benchmark's reading when it is the fastest (loadtest docs).
    fast_because: str = ""
    # The settings only this model reads (services/config.py adds them to the command line and
    # refuses their flags for any other model); each is a field of config.Settings.
    options: tuple[Option, ...] = ()

    @property
    def blocking(self) -> bool:
        """Each connection has its own flow running the blocking session loop."""
        return self.flow in ("thread", "greenlet")

    @property
    def event_loop(self) -> bool:
        """One event loop runs every connection: it exposes the loop-lag probe's families."""
        return "arena_event_loop_blocked_seconds" in self.own_metrics

    @property
    def metrics_port(self) -> int:
        """The default host port of its /metrics in the local stack: its port + 100."""
        return self.port + METRICS_PORT_OFFSET

    @property
    def env_name(self) -> str:
        """The model's name as it appears in variable names (ARENA_<NAME>_PORT)."""
        return self.name.upper().replace("-", "_")

    def run_prepare(self) -> None:
        """Call the model's `prepare` hook (before the server's modules are imported)."""
        if self.prepare:
            module_name, _, function = self.prepare.partition(":")
            getattr(importlib.import_module(module_name), function)()


# The loop-lag probe's families, which both event-loop models expose (services/servers/looplag.py).
EVENT_LOOP_METRICS = (
    "arena_event_loop_lag_seconds",
    "arena_event_loop_blocked_seconds",
    "arena_event_loop_blocks",
)
# The asyncio model's event loops: libuv's, or the standard library's; uvloop when installed
# (found without importing it: nothing here may load an event loop).
ASYNCIO_LOOPS = ("uvloop", "asyncio")
DEFAULT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def _asyncio_loop(text: str) -> str:
    name = parse.choice(ASYNCIO_LOOPS)(text)
    if name == "uvloop" and DEFAULT_LOOP != "uvloop":
        raise ValueError("uvloop is not installed (pip install uvloop, or choose asyncio)")
    return name


MODELS: tuple[Model, ...] = (
    Model(
        "threaded",
        "services.servers.threaded:ThreadedServer",
        "a thread per connection",
        "blue",
        9001,
        flow="thread",
        variants=(Variant("threaded", textbook="socketserver"),),
        own_metrics=("arena_threads", "arena_turn_handovers"),
        options=(
            Option(
                "switch_interval",
                parse.positive_seconds,
                "seconds a thread may hold the GIL while another waits",
            ),
            Option(
                "turns_above",
                parse.non_negative_int,
                "above this many connections, requests take turns in arrival order",
            ),
        ),
    ),
    Model(
        "pool",
        "services.servers.pool:PoolServer",
        "a reactor; every request runs in a concurrent.futures pool",
        "orange",
        9002,
        flow="reactor",
        variants=(
            Variant("pool-process", ("--executor", "process"), textbook="processpool"),
            Variant("pool-thread", ("--executor", "thread"), textbook="threadpool"),
        ),
        sized=True,
        processes=False,  # its executor's processes already use every core
        small_flags=("--workers", "2"),  # as on the project's 2-core machines
        own_metrics=(
            "arena_pool_workers",
            "arena_pool_busy_workers",
            "arena_pool_queue_depth",
            "arena_pool_inflight_requests",
            "arena_pool_submissions",
            "arena_pool_worker_cpu_seconds",
            "arena_pool_worker_restarts",
            "arena_pool_retried_requests",
        ),
        options=(
            Option(
                "executor",
                parse.choice(("process", "thread")),
                "run requests in process or thread workers",
            ),
            Option(
                "workers",
                parse.positive_int,
                "number of executor workers (default: CPU count)",
            ),
        ),
    ),
    Model(
        "gevent",
        "services.servers.greenlets:GeventServer",
        "a greenlet per connection on gevent's event loop",
        "green",
        9003,
        flow="greenlet",
        variants=(Variant("gevent", textbook="streamserver"),),
        own_metrics=("arena_greenlets", *EVENT_LOOP_METRICS),
        db_drivers=DB_DRIVERS,
        prepare="gevent.monkey:patch_all",
        fast_because=(
            "it waits for a socket to be readable before reading, as an event loop does, "
            "where gevent's own `recv` tries first and fails once per request"
        ),
    ),
    Model(
        "asyncio",
        "services.servers.eventloop:AsyncioServer",
        "a Protocol per connection on one asyncio event loop (--loop uvloop or asyncio)",
        "purple",
        9004,
        flow="callbacks",
        variants=(
            Variant("asyncio", ("--loop", "uvloop"), "uvloop-protocol", suites=True),
            Variant("asyncio-stock", ("--loop", "asyncio"), "asyncio-streams", suites=True),
        ),
        own_metrics=("arena_asyncio_transports", "arena_asyncio_tasks", *EVENT_LOOP_METRICS),
        db_drivers=DB_DRIVERS,
        options=(
            Option(
                "loop",
                _asyncio_loop,
                "event loop, uvloop or asyncio (default: uvloop when installed)",
            ),
        ),
    ),
)
# Models defined outside this file, registered exactly as the ones above:
# ARENA_EXTRA_MODELS=module:attribute[,module:attribute] (each a Model, or a tuple of them). For
# a model kept in a package of its own, and for the suite's proof of the recipe (tests/
# test_recipe.py registers a model written inside the tests and runs the server suites on it).
# An extra model with a registered model's name takes its place, in its place: the lessons'
# sabotage tests (tests/test_lesson_sabotage.py) run a deliberately broken server under a
# model's own name, so every tool treats it as that model.
EXTRA_MODELS_VARIABLE = "ARENA_EXTRA_MODELS"


def _extra_models(spec: str) -> tuple[Model, ...]:
    found: list[Model] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, attribute = item.partition(":")
        value = getattr(importlib.import_module(module_name), attribute)
        found.extend(value if isinstance(value, tuple) else (value,))
    return tuple(found)


def _with_extras(builtin: tuple[Model, ...], extras: tuple[Model, ...]) -> tuple[Model, ...]:
    """The registered models with each extra one in place of its namesake, or appended."""
    replacing = {model.name: model for model in extras}
    kept = tuple(replacing.pop(model.name, model) for model in builtin)
    return kept + tuple(model for model in extras if model.name in replacing)


MODELS = _with_extras(MODELS, _extra_models(os.environ.get(EXTRA_MODELS_VARIABLE, "")))
NAMES: tuple[str, ...] = tuple(model.name for model in MODELS)
# Every variant by name, with the model it runs (the benchmark's families, the server tests).
VARIANTS: dict[str, tuple[Model, Variant]] = {
    variant.name: (model, variant) for model in MODELS for variant in model.variants
}
_BY_NAME = {model.name: model for model in MODELS}
# What the server suites run (tests/conftest.py): each model as it starts by default, plus the
# variants marked `suites` under their own names (the asyncio model on the standard loop).
SUITE_TARGETS: tuple[str, ...] = NAMES + tuple(
    name for name, (_, variant) in VARIANTS.items() if variant.suites and name not in _BY_NAME
)


def get(name: str) -> Model:
    """The model called `name`; KeyError names the choices."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(NAMES)}") from None


def target(name: str) -> tuple[Model, tuple[str, ...]]:
    """A model or a variant by name: its model, and the flags that choose the variant."""
    if name in _BY_NAME:
        return _BY_NAME[name], ()
    if name in VARIANTS:
        model, variant = VARIANTS[name]
        return model, variant.flags
    raise KeyError(f"unknown model or variant {name!r}; choose from {', '.join(VARIANTS)}")

"""`python -m loadtest.tools.dashboard [--check]`: write the Grafana dashboard from the registry.

docker/grafana/dashboards/arena.json is generated (`make dashboard`), never edited by hand: every
per-model piece of it is read from `services.models.MODELS`, so a model added to the registry
shows on the dashboard without a dashboard edit. From the registry come the title, the job
selector of every server-side query (a Prometheus job is a model's name), one colour override
per model in every panel whose series are models (the registry's `colour`) and the intro's list
of models. A panel about metric families only some models expose (their `own_metrics`: the unit
of concurrency, the pool's queue, the event loop) queries exactly the models that list them,
and is left out when none does. What is not about one model (rows, titles, descriptions, units,
layout, the Locust and PostgreSQL queries) is written once below.

Built with grafana-foundation-sdk, Grafana's own dashboards-as-code library, in its build for
Grafana 11.6 (the compose image's Grafana): its builders name and type every field, so a typo
in one is a mypy error rather than a setting Grafana silently ignores. The file therefore has
the schema version of those types, 41 (the hand-kept file had 39; Grafana's two migrations
between them, a non-string `refresh` and `timepicker.time_options`, touch nothing here), and
spells out a few of Grafana's defaults it left implicit (`repeatDirection`, `transparent`,
`percentChangeColorMode`, a link's empty `tags`), which change nothing on screen.

`--check` writes nothing: it exits 1 with a short diff when the committed file differs from
what the registry gives (tests/test_dashboard.py runs it).
"""

from __future__ import annotations

import difflib
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import prometheus, stat, text, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DashboardLink,
    FieldColor,
    Row,
    ThresholdsConfig,
    TimePicker,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard
from grafana_foundation_sdk.models.text import TextMode

from loadtest.tools import cli, scrapes
from services.models import MODELS, Model

DASHBOARD = cli.ROOT / "docker" / "grafana" / "dashboards" / "arena.json"
UID = "socket-arena"  # the home dashboard's address (/d/socket-arena); bookmarks keep working
# The datasource docker/grafana/provisioning/datasources/ provisions, referred to by its uid.
PROMETHEUS = dashboard.DataSourceRef(type_val="prometheus", uid="prometheus")
LOCUST_UI = "http://127.0.0.1:8089"
RATE = "[$__rate_interval]"
# Failed requests per target, 0 (not "no data") for a target that has not failed yet.
LOCUST_FAILURES = (
    f"sum by (target) (rate(locust_failures_total{RATE})) or "
    f"sum by (target) (0 * rate(locust_requests_total{RATE}))"
)
DIFF_LINES = 40  # of --check's diff: enough to see what changed, not the whole file

# The families that count each model's unit of concurrency, in the panel's order, with the word
# its series is called by; a model shows the ones its own_metrics list.
CONCURRENCY_UNITS = (
    ("arena_threads", "threads"),
    ("arena_greenlets", "greenlets"),
    ("arena_asyncio_transports", "transports"),
    ("arena_pool_workers", "workers"),
    ("arena_pool_busy_workers", "busy workers"),
)
POOL_QUEUE = (("arena_pool_inflight_requests", "in flight"), ("arena_pool_queue_depth", "queued"))
LOOP_BLOCKED = "arena_event_loop_blocked_seconds"
LOOP_LAG = "arena_event_loop_lag_seconds"
NUMBER_WORDS = ("No", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")

Query = tuple[str, str]  # (PromQL, legend format)
Item = Row | stat.Panel | text.Panel | timeseries.Panel


def job_selector(models: Sequence[Model]) -> str:
    """The label matcher of these models' Prometheus jobs (a job is named after its model)."""
    names = [model.name for model in models]
    return f'job="{names[0]}"' if len(names) == 1 else f'job=~"{"|".join(names)}"'


def exposing(models: Sequence[Model], family: str) -> list[Model]:
    """The models whose own_metrics include `family`, in registry order."""
    return [model for model in models if family in model.own_metrics]


def and_join(words: Sequence[str], before: str = "") -> str:
    """'a', 'a and b', 'a, b and c', each word after `before`."""
    words = [before + word for word in words]
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def server_quantile(quantile: float, histogram: str, jobs: str) -> str:
    """PromQL: a quantile of a server histogram per model, all its replicas together."""
    return (
        f"histogram_quantile({quantile}, sum by (job, le) "
        f"(rate({histogram}_bucket{{{jobs}}}{RATE})))"
    )


def locust_quantile(quantile: float) -> str:
    """PromQL: a quantile of Locust's request latency per target, connects left out."""
    return (
        f"histogram_quantile({quantile}, sum by (target, le) "
        f'(rate(locust_request_duration_seconds_bucket{{command!="connect"}}{RATE})))'
    )


def colour(name: str) -> dashboard.DynamicConfigValue:
    """The override property that paints a series in one of Grafana's named colours."""
    return dashboard.DynamicConfigValue(
        id_val="color", value=dashboard.FieldColor(dashboard.FieldColorModeId.FIXED, name)
    )


def dashed() -> dashboard.DynamicConfigValue:
    """The override property that dashes a line (the secondary series of a panel)."""
    return dashboard.DynamicConfigValue(
        id_val="custom.lineStyle", value=common.LineStyle(fill="dash", dash=[10, 10])
    )


def with_queries[P: (stat.Panel, timeseries.Panel)](panel: P, queries: Sequence[Query]) -> P:
    """The panel with its range queries, lettered A, B, ... in order, on the Prometheus source."""
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(
            prometheus.Dataquery()
            .datasource(PROMETHEUS)
            .expr(expr)
            .legend_format(legend)
            .ref_id(chr(ord("A") + index))
            .range()
        )
    return panel


def model_colours[P: (stat.Panel, timeseries.Panel)](panel: P, models: Sequence[Model]) -> P:
    """The panel with one override per model: every series whose name starts with the model's
    name (its job, Locust's target, `arena-MODEL` in PostgreSQL) in the model's colour."""
    # Grafana anchors a byRegexp matcher at both ends; a model's name is an identifier (a CLI
    # argument, a compose service), so it needs no escaping inside the pattern. Only at the
    # start: "threaded pool size" is threaded's series, not the pool model's.
    for model in models:
        pattern = f"(arena-)?{model.name}([^a-z0-9_].*)?"
        panel = panel.override_by_regexp(pattern, [colour(model.colour)])
    return panel


def stat_panel(
    title: str, description: str, width: int, unit: str, query: Query, decimals: int | None = None
) -> stat.Panel:
    """A big-number panel: the latest value of each series, named, over its sparkline."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(PROMETHEUS)
        .height(5)
        .span(width)
        .unit(unit)
        .color_scheme(FieldColor().mode(dashboard.FieldColorModeId.FIXED).fixed_color("text"))
        .reduce_options(
            common_builders.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)
        )
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .orientation(common.VizOrientation.VERTICAL)
        .justify_mode(common.BigValueJustifyMode.CENTER)
        .wide_layout(True)
        .show_percent_change(False)
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    return with_queries(panel, [query])


def graph(
    title: str,
    description: str,
    width: int,
    unit: str,
    queries: Sequence[Query],
    models: Sequence[Model] = (),
    dash: str = "",
) -> timeseries.Panel:
    """A time series panel from 0 up, a table legend, its models' colours, the series whose
    name matches `dash` dashed."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(PROMETHEUS)
        .height(8)
        .span(width)
        .unit(unit)
        .min(0)
        .color_scheme(FieldColor().mode(dashboard.FieldColorModeId.PALETTE_CLASSIC))
        .draw_style(common.GraphDrawStyle.LINE)
        .line_width(2)
        .fill_opacity(0)
        .show_points(common.VisibilityMode.NEVER)
        .span_nulls(True)
        .axis_soft_min(0)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "mean", "max"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    panel = model_colours(with_queries(panel, queries), models)
    return panel.override_by_regexp(f".*{dash}.*", [dashed()]) if dash else panel


def intro(models: Sequence[Model]) -> text.Panel:
    """The text at the top: what runs, each model's colour, how to read the rest."""
    colours = "\n".join(f"**{m.name}** in {m.colour}: {m.summary}." for m in models)
    content = (
        f"**{count(models)} Python TCP servers, the same load.** Locust runs **100 clients "
        f"against each server**\n(change it in the [Locust web UI]({LOCUST_UI})). One colour "
        f"per server everywhere:\n{colours}\n\n"
        "Read it top to bottom: *how much* (requests/s), *how fast* (latency \u2014 server side "
        "is the time\ninside the server, client side adds the network and queueing Locust "
        "sees), *how many*\n(connections, threads / greenlets / transports / pool queue), "
        "*what it costs* (CPU, memory), and *what went\nwrong* (errors, event-loop blocking). "
        "Higher requests/s and lower latency are better; errors\nshould stay at zero.\n"
        "At the bottom, the database behind `/db` (PostgreSQL): query latency, the wait for a "
        "pooled\nconnection, connections in use, errors, and PostgreSQL's own count of "
        "connections per server."
    )
    return (
        text.Panel()
        .title("")
        .transparent(True)
        .height(5)
        .span(24)
        .mode(TextMode.MARKDOWN)
        .content(content)
    )


def count(models: Sequence[Model]) -> str:
    """How many models, as a word while there are few."""
    return NUMBER_WORDS[len(models)] if len(models) < len(NUMBER_WORDS) else str(len(models))


def at_a_glance(models: Sequence[Model]) -> list[Item]:
    """The first row: the latest throughput, latency, connections and failures per model."""
    jobs = job_selector(models)
    panels = [
        stat_panel(
            "Requests per second",
            "Requests answered per second, server side.",
            5,
            "reqps",
            (f"sum by (job) (rate(arena_requests_total{{{jobs}}}{RATE}))", "{{job}}"),
            decimals=0,
        ),
        stat_panel(
            "Server p99 latency",
            "99 % of requests were answered within this time inside the server (from the "
            "request line read to the reply ready; includes pool queueing).",
            5,
            "s",
            (server_quantile(0.99, "arena_request_duration_seconds", jobs), "{{job}}"),
        ),
        stat_panel(
            "Client p99 latency",
            "99 % of requests got their reply within this time, as Locust measured it "
            "(network and server queueing included).",
            5,
            "s",
            (locust_quantile(0.99), "{{target}}"),
        ),
        stat_panel(
            "Open connections",
            "Connections each server holds now.",
            4,
            "short",
            (f"sum by (job) (arena_connections_active{{{jobs}}})", "{{job}}"),
            decimals=0,
        ),
        stat_panel(
            "Client failures per second",
            "Failed requests per second seen by Locust (wrong reply, timeout, connection "
            "error). Should be 0.",
            5,
            "reqps",
            (LOCUST_FAILURES, "{{target}}"),
            decimals=1,
        ),
    ]
    return [Row("At a glance (now)"), *(model_colours(panel, models) for panel in panels)]


def throughput_and_latency(models: Sequence[Model]) -> list[Item]:
    """Requests per second and latency, as the servers and as Locust measure them."""
    jobs = job_selector(models)
    return [
        Row("Throughput and latency"),
        graph(
            "Throughput (server side)",
            "Requests answered per second by each server.",
            12,
            "reqps",
            [(f"sum by (job) (rate(arena_requests_total{{{jobs}}}{RATE}))", "{{job}}")],
            models,
        ),
        graph(
            "Throughput (client side, Locust): achieved, and offered (dashed)",
            "Requests per second Locust completed against each server (successes and "
            "failures). Dashed: the offered load in arrival-rate mode (--arrival-rate, requests "
            "per second per target on a timetable; 0 in the closed loop). Achieved below offered "
            "means the server (or Locust) cannot keep up: late starts pile up and the latency "
            "counted from the intended start grows.",
            12,
            "reqps",
            [
                (
                    f'sum by (target) (rate(locust_requests_total{{command!="connect"}}{RATE}))',
                    "{{target}}",
                ),
                ("sum by (target) (locust_arrival_rate)", "{{target}} offered"),
            ],
            models,
            dash="offered",
        ),
        graph(
            "Latency inside the server: p50 (dashed) and p99",
            "From the complete request line being read to the reply being ready. For the pool "
            "this includes waiting in the queue for a free worker.",
            12,
            "s",
            [
                (server_quantile(0.5, "arena_request_duration_seconds", jobs), "{{job}} p50"),
                (server_quantile(0.99, "arena_request_duration_seconds", jobs), "{{job}} p99"),
            ],
            models,
            dash="p50",
        ),
        graph(
            "Latency seen by clients: p50 (dashed) and p99",
            "Measured by Locust, to the end of the reply from the request's intended start: "
            "when it was sent in the closed loop; in arrival-rate mode when it was due on the "
            "timetable, so waiting for a free connection counts (coordinated omission "
            "corrected). The gap to the server-side latency is time spent in kernel queues, the "
            "network and the server's accept/read loop.",
            12,
            "s",
            [
                (locust_quantile(0.5), "{{target}} p50"),
                (locust_quantile(0.99), "{{target}} p99"),
            ],
            models,
            dash="p50",
        ),
    ]


def connections_and_errors(models: Sequence[Model]) -> list[Item]:
    """Open connections against Locust's users, and every kind of error per second."""
    jobs = job_selector(models)
    return [
        Row("Connections and errors"),
        graph(
            "Open connections and Locust users (dashed)",
            "Connections each server holds, next to the number of Locust users aimed at it. The "
            "two should match: fewer connections than users means clients are waiting to "
            "connect.",
            12,
            "short",
            [
                (f"sum by (job) (arena_connections_active{{{jobs}}})", "{{job}} connections"),
                ("sum by (target) (locust_users)", "{{target}} users"),
            ],
            models,
            dash="users",
        ),
        graph(
            "Errors per second",
            "Server: error replies (unknown command, bad argument, line too long, server busy) "
            "and failed accept() calls. Client: failed requests and failed connection attempts "
            "seen by Locust. All should stay at 0. Late starts: arrival-rate requests that found "
            "every connection of their target busy when they were due (they are sent when one "
            "frees; their latency counts from when they were due).",
            12,
            "reqps",
            [
                (
                    f"sum by (job) (rate(arena_protocol_errors_total{{{jobs}}}{RATE}))",
                    "{{job}} error replies",
                ),
                (
                    f"sum by (job) (rate(arena_accept_errors_total{{{jobs}}}{RATE})) or "
                    f"sum by (job) (0 * arena_connections_active{{{jobs}}})",
                    "{{job}} accept errors",
                ),
                (LOCUST_FAILURES, "{{target}} client failures"),
                (
                    f"sum by (target) (rate(locust_connect_errors_total{RATE})) or "
                    "sum by (target) (0 * locust_users)",
                    "{{target}} connect errors",
                ),
                (
                    f"sum by (target) (rate(locust_late_starts_total{RATE}))",
                    "{{target}} late starts",
                ),
            ],
            models,
            dash="(client|connect)",
        ),
    ]


def costs(models: Sequence[Model]) -> list[Item]:
    """CPU (a pool's worker processes included) and resident memory per model."""
    jobs = job_selector(models)
    server_cpu = f"sum by (job) (rate(process_cpu_seconds_total{{{jobs}}}{RATE}))"
    # Worker processes report their CPU apart; `or 0 * ...` keeps the models without them.
    worker_cpu = f"sum by (job) (rate(arena_pool_worker_cpu_seconds_total{{{jobs}}}{RATE}))"
    return [
        Row("What it costs"),
        graph(
            "CPU (100 % = one core)",
            "CPU time used per second by each server, its worker processes included (pool with "
            "the process executor). Every server has the same CPU limit.",
            12,
            "percentunit",
            [(f"{server_cpu} + ({worker_cpu} or 0 * {server_cpu})", "{{job}}")],
            models,
        ),
        graph(
            "Memory (resident)",
            "Resident memory of each server's main process (the pool's worker processes are "
            "not included).",
            12,
            "bytes",
            [(f"sum by (job) (process_resident_memory_bytes{{{jobs}}})", "{{job}}")],
            models,
        ),
    ]


def family_queries(models: Sequence[Model], families: Sequence[tuple[str, str]]) -> list[Query]:
    """One gauge query per family that some model exposes, over exactly those models."""
    return [
        (f"sum by (job) ({family}{{{job_selector(having)}}})", f"{{{{job}}}} {word}")
        for family, word in families
        if (having := exposing(models, family))
    ]


def inside_each_model(models: Sequence[Model]) -> list[Item]:
    """The models' own families: the unit of concurrency, the pool's queue, the event loop."""
    panels: list[Item] = [Row("Inside each model")]
    if units := family_queries(models, CONCURRENCY_UNITS):
        panels.append(
            graph(
                "Threads, greenlets, transports and pool workers",
                "The unit of concurrency of each model: threaded needs one thread per "
                "connection; gevent one greenlet per connection; asyncio one transport (a "
                "Protocol, no thread or task) per connection; the pool a fixed set of workers, "
                "of which this many are busy.",
                8,
                "short",
                units,
                models,
                dash="busy",
            )
        )
    if queue := family_queries(models, POOL_QUEUE):
        panels.append(
            graph(
                "Pool: requests waiting for a worker",
                "Requests handed to the pool and not yet answered (in flight), and those still "
                "waiting for a free worker (queued). A growing queue means the workers cannot "
                "keep up.",
                8,
                "short",
                queue,
                models,
                dash="queued",
            )
        )
    if loops := event_loop_panel(models):
        panels.append(loops)
    return panels


def event_loop_panel(models: Sequence[Model]) -> timeseries.Panel | None:
    """How much the single event loop of each model that has one was blocked; None: no model
    runs the loop-lag probe."""
    blocked, lag = exposing(models, LOOP_BLOCKED), exposing(models, LOOP_LAG)
    queries = []
    if blocked:
        queries.append(
            (
                f"sum by (job) (rate({LOOP_BLOCKED}_total{{{job_selector(blocked)}}}{RATE}))",
                "{{job}} blocked share",
            )
        )
    if lag:
        queries.append(
            (server_quantile(0.99, LOOP_LAG, job_selector(lag)), "{{job}} timer lag p99")
        )
    if not queries:
        return None
    names = [model.name for model in models if model in blocked or model in lag]
    panel = graph(
        f"{and_join(names)}: event-loop blocking",
        f"Share of time the single event loop {and_join(names, 'of ')} was blocked (a 100 ms "
        "timer woke up more than 10 ms late), and the timer's p99 lateness (dashed, right "
        "axis). While the loop is blocked, every connection of that server waits.",
        8,
        "percentunit",
        queries,
        models,
        dash="lag",
    )
    # The lateness is seconds, not a share of time: its own unit on a right-hand axis.
    return panel.override_by_regexp(
        ".*lag.*",
        [
            dashboard.DynamicConfigValue(id_val="unit", value="s"),
            dashboard.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
        ],
    )


def replicas(models: Sequence[Model]) -> list[Item]:
    """Requests and connections of every replica apart (no model colours: one line each)."""
    jobs = job_selector(models)
    return [
        Row("Replicas (one line each: --scale, deploy.replicas)"),
        graph(
            "Requests per second per replica",
            "Server-side requests per second of each replica (label replica = its address). "
            "The panels above sum the replicas of a model; here an uneven spread or a replica "
            "left without load shows.",
            12,
            "reqps",
            [
                (
                    f"sum by (job, replica) (rate(arena_requests_total{{{jobs}}}{RATE}))",
                    "{{job}} {{replica}}",
                )
            ],
        ),
        graph(
            "Open connections per replica",
            "Connections each replica holds. Locust resolves the service name at every connect "
            "and takes its replicas in turn, so a model's users spread evenly over its replicas.",
            12,
            "short",
            [
                (
                    f"sum by (job, replica) (arena_connections_active{{{jobs}}})",
                    "{{job}} {{replica}}",
                )
            ],
        ),
    ]


def database(models: Sequence[Model]) -> list[Item]:
    """`/db`: the query and the wait for a pooled connection per model, errors, and what
    PostgreSQL itself counts (through postgres-exporter)."""
    jobs = job_selector(models)
    return [
        Row("Database (/db: PostgreSQL, one pool per server)"),
        graph(
            "Database query latency: p50 (dashed) and p99",
            "Time of the /db query itself, on a connection already taken from the pool: the "
            "database's pg_sleep plus the round trip and the driver. The wait for a free "
            "connection is the next panel.",
            8,
            "s",
            [
                (server_quantile(0.5, "arena_db_query_seconds", jobs), "{{job}} p50"),
                (server_quantile(0.99, "arena_db_query_seconds", jobs), "{{job}} p99"),
            ],
            models,
            dash="p50",
        ),
        graph(
            "Waiting for a free connection: p99",
            "How long a /db request waited for one of the server's pool connections "
            "(ARENA_DB_POOL). Near zero while the pool is large enough; it grows when every "
            "connection is in use, and past ARENA_DB_TIMEOUT the request fails as busy.",
            8,
            "s",
            [(server_quantile(0.99, "arena_db_pool_wait_seconds", jobs), "{{job}} p99")],
            models,
        ),
        graph(
            "Connections in use, and pool size (dashed)",
            "Database connections each server (all its replicas) is running a query on, against "
            "the most it may hold (ARENA_DB_POOL per replica). In use at the pool size means "
            "requests queue for a connection.",
            8,
            "short",
            [
                (f"sum by (job) (arena_db_connections_in_use{{{jobs}}})", "{{job}} in use"),
                (f"sum by (job) (arena_db_pool_size{{{jobs}}})", "{{job}} pool size"),
            ],
            models,
            dash="pool size",
        ),
        *database_health(models),
    ]


def database_health(models: Sequence[Model]) -> list[Item]:
    """The database row's second line: requests queued for a connection, errors by kind,
    PostgreSQL's connections per server and whether the exporter reaches it."""
    jobs = job_selector(models)
    return [
        graph(
            "Requests waiting for a database connection",
            "/db requests that hold no connection yet: the pool's queue. It should stay near "
            "zero; a growing line means the pool (or the database) is the bottleneck.",
            6,
            "short",
            [(f"sum by (job) (arena_db_waiting_requests{{{jobs}}})", "{{job}}")],
            models,
        ),
        graph(
            "Database errors per second, by kind",
            "unavailable: the database could not be reached; busy: no connection was free "
            "within ARENA_DB_TIMEOUT; error: the database refused the query. Should stay at "
            "zero.",
            6,
            "reqps",
            [
                (
                    f"sum by (job, kind) (rate(arena_db_errors_total{{{jobs}}}{RATE})) or "
                    f"sum by (job) (0 * arena_db_pool_size{{{jobs}}})",
                    "{{job}} {{kind}}",
                )
            ],
            models,
        ),
        graph(
            "PostgreSQL: connections per application (exporter)",
            "The database's own count (pg_stat_activity, read by postgres-exporter): client "
            "connections per application_name, arena-MODEL for every replica of a server model, "
            "arena-exporter for the exporter. PostgreSQL accepts at most "
            "ARENA_POSTGRES_MAX_CONNECTIONS in all.",
            8,
            "short",
            [
                (
                    'sum by (application_name) (pg_stat_activity_app_connections{job="postgres"})',
                    "{{application_name}}",
                )
            ],
            models,
        ),
        postgres_up(),
    ]


def postgres_up() -> stat.Panel:
    """pg_up as a red "down" or a green "up"."""
    panel = (
        stat_panel(
            "PostgreSQL up (exporter)",
            "pg_up: 1 when postgres-exporter reaches the database, 0 when it does not. The "
            "servers keep running without it; their /db answers ERR backend-unavailable.",
            4,
            "none",
            ('max(pg_up{job="postgres"})', "PostgreSQL"),
            decimals=0,
        )
        .height(8)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .color_scheme(FieldColor().mode(dashboard.FieldColorModeId.THRESHOLDS))
        .mappings(
            [
                dashboard.ValueMap(
                    {
                        "0": dashboard.ValueMappingResult(text="down", color="red"),
                        "1": dashboard.ValueMappingResult(text="up", color="green"),
                    }
                )
            ]
        )
    )
    return panel.thresholds(
        ThresholdsConfig()
        .mode(dashboard.ThresholdsMode.ABSOLUTE)
        .steps([dashboard.Threshold(None, "red"), dashboard.Threshold(1, "green")])
    )


def build(models: Sequence[Model] = MODELS) -> dashboard.Dashboard:
    """The whole dashboard for these models (the registry's by default)."""
    board = (
        Dashboard(f"Socket Arena: {' vs '.join(model.name for model in models)}")
        .uid(UID)
        .description(
            f"{count(models)} Python TCP servers under the same Locust load, side by side."
        )
        .tags(["socket-arena"])
        .readonly()
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .live_now(False)
        .refresh("5s")
        .version(1)
        .time("now-15m", "now")
        .timepicker(TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m"]))
        .timezone("browser")
        .variables([])
        .annotations([])
        .link(
            DashboardLink("Locust")
            .type(dashboard.DashboardLinkType.LINK)
            .url(LOCUST_UI)
            .target_blank(True)
            .icon("external link")
        )
    )
    sections = (at_a_glance, throughput_and_latency, connections_and_errors, costs)
    items: list[Item] = [intro(models)]
    for section in (*sections, inside_each_model, replicas, database):
        items.extend(section(models))
    # The SDK lays panels out left to right by their width and height, a row below the tallest
    # panel of the line before it.
    for item in items:
        board = board.with_row(item) if isinstance(item, Row) else board.with_panel(item)
    built = board.build()
    for number, panel in enumerate(built.panels or [], 1):
        panel.id_val = number
    return built


def render(models: Sequence[Model] = MODELS) -> str:
    """The dashboard's JSON as the committed file holds it."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build(models)) + "\n"


def generated(models: Sequence[Model] = MODELS) -> dict[Path, str]:
    """Every file written from the registry: the dashboard and Prometheus's scrape config."""
    return {DASHBOARD: render(models), scrapes.PROMETHEUS_YML: scrapes.compose_config(models)}


def stale(models: Sequence[Model] = MODELS, files: dict[Path, str] | None = None) -> str:
    """A diff of each committed file against what would be written; empty when they agree."""
    diffs = []
    for path, content in (files or generated(models)).items():
        committed = path.read_text() if path.exists() else ""
        lines = difflib.unified_diff(
            committed.splitlines(keepends=True),
            content.splitlines(keepends=True),
            f"{path} (committed)",
            f"{path} (from services/models.py)",
        )
        diffs.append("".join(itertools.islice(lines, DIFF_LINES)))
    return "".join(diffs)


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, verify) the dashboard and the scrape config; the exit code."""
    parser = cli.parser(
        "loadtest.tools.dashboard",
        "Write docker/grafana/dashboards/arena.json and docker/prometheus/prometheus.yml from "
        "the model registry.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff when a committed file is stale",
    )
    args = parser.parse_args(argv)
    if args.check:
        diff = stale()
        if diff:
            sys.stdout.write(diff)
            print(
                "dashboard: a file differs from the registry's; run `make dashboard` "
                "(python -m loadtest.tools.dashboard)",
                file=sys.stderr,
            )
        return 1 if diff else 0
    for path, content in generated().items():
        path.write_text(content)
        print(f"dashboard: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Client-side numbers for Prometheus and people: ``/metrics``, a latency tab, an end-of-run table.

Locust rounds response times to whole milliseconds, and loopback replies take tens of
microseconds, so every request event is also recorded here, per target and command, in two
histograms: Prometheus buckets from 50 µs (``locust_request_duration_seconds``) and a fine one
(1 µs steps below 1 ms, three significant digits above) for p50/p99/p99.9 in microseconds.

Distributed runs: each worker ships what it recorded since its last report to the master
(``report_to_master``), the master adds it up (``worker_report``); only the master (or a
stand-alone Locust) serves pages. Numbers start from zero when Locust resets its own statistics
(a new test, the Reset button, ``--reset-stats``), so ``/metrics`` always agrees with Locust's
tables and CSV files; Prometheus treats the drop as a counter reset.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtest.client import CONNECT
from loadtest.workload import COMMANDS, TARGETS, KnobError, Workload, current_workload

logger = logging.getLogger(__name__)

BUCKETS_SECONDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
PERCENTILES = ((0.5, "p50_us"), (0.99, "p99_us"), (0.999, "p999_us"))
REPORT_KEY = "socket_arena_stats"
LATENCY_TAB = "socket-arena-latency"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def fine_key(microseconds: int) -> int:
    """Bucket a duration: exact below 1000 µs, three significant digits (under 1 % error) above."""
    scale = 1
    while microseconds >= 1000 * scale:
        scale *= 10
    return microseconds // scale * scale


@dataclass
class Series:
    """Counts for one (target, command). Durations are of successful requests only."""

    requests: int = 0
    failures: int = 0
    duration_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_SECONDS) + 1))
    fine: dict[int, int] = field(default_factory=dict)

    def record(self, seconds: float, failed: bool) -> None:
        """Count one request; time it only if it succeeded."""
        self.requests += 1
        if failed:
            self.failures += 1
            return
        self.duration_sum += seconds
        self.buckets[bisect.bisect_left(BUCKETS_SECONDS, seconds)] += 1
        key = fine_key(max(0, round(seconds * 1_000_000)))
        self.fine[key] = self.fine.get(key, 0) + 1

    @property
    def timed(self) -> int:
        """How many durations were recorded (the successful requests)."""
        return self.requests - self.failures

    def percentile_us(self, fraction: float) -> int | None:
        """The smallest recorded bucket that covers `fraction` of the timed requests."""
        if not self.timed:
            return None
        rank = max(1, math.ceil(fraction * self.timed))
        seen = 0
        for key in sorted(self.fine):
            seen += self.fine[key]
            if seen >= rank:
                return key
        return max(self.fine)

    def merge(self, other: Series) -> None:
        """Add another series' counts to this one."""
        self.requests += other.requests
        self.failures += other.failures
        self.duration_sum += other.duration_sum
        for index, count in enumerate(other.buckets):
            self.buckets[index] += count
        for key, count in other.fine.items():
            self.fine[key] = self.fine.get(key, 0) + count


class ClientStats:
    """All series of one process (a worker's since its last report; the master's in total)."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], Series] = {}

    def record(self, target: str, command: str, seconds: float, failed: bool) -> None:
        """Count one request event."""
        key = (target, command)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series()
        series.record(seconds, failed)

    def reset(self) -> None:
        """Forget everything (Locust reset its statistics)."""
        self.series.clear()

    def to_message(self) -> list[list[Any]]:
        """A msgpack-friendly copy (only str keys and lists) for a worker report."""
        return [
            [target, command, s.requests, s.failures, s.duration_sum, list(s.buckets),
             [[key, count] for key, count in s.fine.items()]]
            for (target, command), s in self.series.items()
        ]

    def merge_message(self, message: Iterable[list[Any]]) -> None:
        """Add a worker's report."""
        for target, command, requests, failures, duration_sum, buckets, fine in message:
            incoming = Series(requests, failures, duration_sum, list(buckets),
                              {int(key): int(count) for key, count in fine})
            key = (str(target), str(command))
            if key in self.series:
                self.series[key].merge(incoming)
            else:
                self.series[key] = incoming

    def drain(self) -> list[list[Any]]:
        """The message for the master, and start over."""
        message = self.to_message()
        self.reset()
        return message

    def connect_errors(self, target: str) -> int:
        """Failed connection attempts to a target."""
        series = self.series.get((target, CONNECT))
        return series.failures if series else 0


def latency_rows(stats: ClientStats) -> list[dict[str, Any]]:
    """One row per (target, command): counts and p50/p99/p99.9/max in microseconds."""
    rows = []
    for (target, command), series in sorted(stats.series.items(), key=_series_order):
        row: dict[str, Any] = {
            "target": target, "command": command,
            "requests": series.requests, "failures": series.failures,
        }
        for fraction, name in PERCENTILES:
            row[name] = series.percentile_us(fraction)
        row["max_us"] = max(series.fine) if series.fine else None
        rows.append(row)
    return rows


def _series_order(item: tuple[tuple[str, str], Series]) -> tuple[int, int, str, str]:
    target, command = item[0]
    commands = (*COMMANDS, CONNECT)
    return (
        TARGETS.index(target) if target in TARGETS else len(TARGETS),
        commands.index(command) if command in commands else len(commands),
        target, command,
    )


def latency_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table (printed at the end of a run, served at /latency)."""
    header = ("target", "command", "requests", "failures", "p50 µs", "p99 µs", "p99.9 µs", "max µs")
    keys = ("target", "command", "requests", "failures", "p50_us", "p99_us", "p999_us", "max_us")
    lines = [f"{header[0]:<10}{header[1]:<9}" + "".join(f"{h:>11}" for h in header[2:])]
    for row in rows:
        cells = ["-" if row[k] is None else str(row[k]) for k in keys]
        lines.append(f"{cells[0]:<10}{cells[1]:<9}" + "".join(f"{c:>11}" for c in cells[2:]))
    return "\n".join(lines)


def render_metrics(
    stats: ClientStats, users_by_target: Mapping[str, int], targets: Iterable[str]
) -> bytes:
    """Prometheus text; every selected target has all its series (zeros included)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    shown_targets = list(dict.fromkeys([*targets, *(t for t, _ in stats.series)]))
    keys = list(dict.fromkeys(
        [(t, c) for t in shown_targets for c in (*COMMANDS, CONNECT)] + list(stats.series)
    ))

    class Snapshot:
        def collect(self) -> Iterable[Any]:
            users = GaugeMetricFamily(
                "locust_users", "Users running now, per target (summed over workers)",
                labels=["target"],
            )
            for target in shown_targets:
                users.add_metric([target], users_by_target.get(target, 0))
            requests = CounterMetricFamily(
                "locust_requests", "Requests sent, failures included", labels=["target", "command"]
            )
            failures = CounterMetricFamily(
                "locust_failures", "Requests that failed (error, timeout or wrong reply)",
                labels=["target", "command"],
            )
            durations = HistogramMetricFamily(
                "locust_request_duration_seconds",
                "Client-side time from sending a request to reading its whole reply "
                "(successful requests only)",
                labels=["target", "command"],
            )
            empty = Series()
            for target, command in keys:
                series = stats.series.get((target, command), empty)
                requests.add_metric([target, command], series.requests)
                failures.add_metric([target, command], series.failures)
                cumulative, buckets = 0, []
                for bound, count in zip((*BUCKETS_SECONDS, math.inf), series.buckets, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
                durations.add_metric([target, command], buckets, series.duration_sum)
            connect_errors = CounterMetricFamily(
                "locust_connect_errors", "Failed connection attempts", labels=["target"]
            )
            for target in shown_targets:
                connect_errors.add_metric([target], stats.connect_errors(target))
            yield from (users, requests, failures, durations, connect_errors)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)


class Exporter:
    """Wires the statistics into one Locust process: recording, shipping, merging and pages."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment
        self.stats = ClientStats()

    # --- recording and aggregation ------------------------------------------------------------
    def on_request(
        self, request_type: str, name: str, response_time: float, exception: Any = None, **_: Any
    ) -> None:
        """Record one request event (fired by our client on workers and stand-alone)."""
        self.stats.record(request_type, name, response_time / 1000.0, exception is not None)

    def on_report_to_master(self, data: dict[str, Any], **_: Any) -> None:
        """Worker: attach what was recorded since the last report."""
        if self.stats.series:
            data[REPORT_KEY] = self.stats.drain()

    def on_worker_report(self, data: dict[str, Any], **_: Any) -> None:
        """Master: add a worker's numbers."""
        message = data.get(REPORT_KEY)
        if message:
            self.stats.merge_message(message)

    def on_reset(self, **_: Any) -> None:
        """Start from zero together with Locust's own statistics."""
        self.stats.reset()

    def on_spawning_complete(self, **_: Any) -> None:
        """Honour --reset-stats (Locust resets its statistics here without firing reset_stats)."""
        if self.environment.reset_stats:
            self.stats.reset()

    # --- views --------------------------------------------------------------------------------
    def users_by_target(self) -> dict[str, int]:
        """Running users per target, summed over workers on a master."""
        runner = self.environment.runner
        if runner is None:
            return {}
        counts = getattr(runner, "reported_user_classes_count", None)
        if counts is None:
            counts = runner.user_classes_count
        classes = self.environment.available_user_classes or {
            cls.__name__: cls for cls in self.environment.user_classes
        }
        users: dict[str, int] = {}
        for class_name, count in counts.items():
            target = getattr(classes.get(class_name), "target", None)
            if target:
                users[target] = users.get(target, 0) + count
        return users

    def selected_targets(self) -> tuple[str, ...]:
        """The targets of this run (for zero-valued series before the first request)."""
        try:
            return current_workload(self.environment.parsed_options).targets
        except KnobError:
            return ()

    def metrics_text(self) -> bytes:
        """The /metrics page."""
        return render_metrics(self.stats, self.users_by_target(), self.selected_targets())

    def let_csv_writer_catch_up(self, **_: Any) -> None:
        """At exit with --csv: give Locust's CSV writer one more pass over the final numbers."""
        # Locust rewrites PREFIX_stats.csv once a second and not again at exit, so a headless run
        # would otherwise leave the last second out of the file. The test has stopped by now.
        if getattr(self.environment.parsed_options, "csv_prefix", None):
            import gevent
            from locust.stats import CSV_STATS_INTERVAL_SEC

            gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)

    def print_summary(self, **_: Any) -> None:
        """At exit: print the microsecond table and, with --csv, write PREFIX_latency.csv."""
        rows = latency_rows(self.stats)
        if not rows:
            return
        print("\nClient-side latency (successful requests, microseconds)", flush=True)
        print(latency_table(rows), flush=True)
        prefix = getattr(self.environment.parsed_options, "csv_prefix", None)
        if prefix:
            directory = os.path.dirname(prefix)
            if directory:
                os.makedirs(directory, exist_ok=True)
            with open(f"{prefix}_latency.csv", "w", encoding="utf-8") as out:
                keys = list(rows[0])
                out.write(",".join(keys) + "\n")
                for row in rows:
                    out.write(",".join("" if row[k] is None else str(row[k]) for k in keys) + "\n")


def install(environment: Any, runner: Any = None, web_ui: Any = None, **_kwargs: Any) -> Exporter:
    """The ``init`` listener: record on every process, aggregate and serve on the master."""
    from locust.runners import MasterRunner, WorkerRunner

    exporter = Exporter(environment)
    events = environment.events
    runner = runner or environment.runner
    if isinstance(runner, WorkerRunner):
        events.request.add_listener(exporter.on_request)
        events.report_to_master.add_listener(exporter.on_report_to_master)
        events.test_start.add_listener(exporter.on_reset)
        return exporter
    if isinstance(runner, MasterRunner):
        events.worker_report.add_listener(exporter.on_worker_report)
    else:
        events.request.add_listener(exporter.on_request)
    events.test_start.add_listener(exporter.on_reset)
    events.reset_stats.add_listener(exporter.on_reset)
    events.spawning_complete.add_listener(exporter.on_spawning_complete)
    events.quitting.add_listener(exporter.let_csv_writer_catch_up)
    events.quit.add_listener(exporter.print_summary)
    web_ui = web_ui or environment.web_ui
    if web_ui is not None:
        _add_web_routes(web_ui, exporter)
    return exporter


def _add_web_routes(web_ui: Any, exporter: Exporter) -> None:
    from flask import Response, jsonify, request

    app = web_ui.app

    @app.route("/metrics")
    def metrics() -> Response:
        return Response(exporter.metrics_text(), mimetype=PROMETHEUS_TEXT)

    @app.route("/latency")
    def latency() -> Response:
        rows = latency_rows(exporter.stats)
        if request.args.get("format") == "json":
            return jsonify(rows)
        return Response(latency_table(rows) + "\n", mimetype="text/plain; charset=utf-8")

    # The latency tab: Locust's UI renders extra tabs from these template arguments and fills
    # them from an "extended_stats" entry in its /stats/requests poll.
    web_ui.template_args["extended_tabs"] = [{"title": "Latency (µs)", "key": LATENCY_TAB}]
    web_ui.template_args["extended_tables"] = [{
        "key": LATENCY_TAB,
        "structure": [
            {"key": "target", "title": "Target"},
            {"key": "command", "title": "Command"},
            {"key": "requests", "title": "Requests"},
            {"key": "failures", "title": "Failures"},
            {"key": "p50_us", "title": "p50 µs"},
            {"key": "p99_us", "title": "p99 µs"},
            {"key": "p999_us", "title": "p99.9 µs"},
            {"key": "max_us", "title": "max µs"},
        ],
    }]
    web_ui.template_args["extended_csv_files"] = [
        {"href": "/latency?format=json", "title": "Download client-side latency (µs) as JSON"}
    ]

    @app.after_request
    def add_latency_to_stats(response: Response) -> Response:
        if not request.path.endswith("/stats/requests") or response.mimetype != "application/json":
            return response
        body = response.get_json(silent=True)
        if isinstance(body, dict):
            body["extended_stats"] = [{"key": LATENCY_TAB, "data": latency_rows(exporter.stats)}]
            response.set_data(json.dumps(body))
        return response

    @app.before_request
    def refuse_bad_knobs() -> Any:
        # Locust's own /swarm handler would store any text (or fail with a 500 on a number field);
        # check the knobs first and answer the way the form shows errors.
        if request.method != "POST" or not request.path.endswith("/swarm"):
            return None
        options = vars(exporter.environment.parsed_options)
        submitted = {**options, **request.form.to_dict()}
        try:
            new = Workload.from_options(submitted)
        except KnobError as error:
            return jsonify({"success": False, "message": str(error),
                            "host": exporter.environment.host})
        runner = exporter.environment.runner
        if runner is not None and runner.state in ("spawning", "running"):
            old = current_workload(exporter.environment.parsed_options)
            if (new.targets, new.users_per_target) != (old.targets, old.users_per_target):
                return jsonify({
                    "success": False,
                    "message": "--targets and --users-per-target apply when a test starts: "
                               "stop the test to change them",
                    "host": exporter.environment.host,
                })
        return None

"""Client-side numbers for Prometheus and people, wired into one Locust process.

Every request event is recorded (``loadtest.plugin.client_stats``); a worker ships what it recorded
since its last report to the master (``report_to_master``), the master adds it up
(``worker_report``); only the master (or a stand-alone Locust) serves pages
(``loadtest.plugin.webui``: ``/metrics``, the latency tab) and prints the end-of-run table. Numbers
start from zero when Locust resets its own statistics (a new test, the Reset button,
``--reset-stats``), so ``/metrics`` always agrees with Locust's tables and CSV files; Prometheus
treats the drop as a counter reset.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from loadtest.plugin.client import LATE, SERVICE_S
from loadtest.plugin.client_metrics import render_metrics
from loadtest.plugin.client_stats import ClientStats, latency_rows, latency_table
from loadtest.plugin.workload import KnobError, current_workload

logger = logging.getLogger(__name__)

REPORT_KEY = "socket_arena_stats"


class Exporter:
    """Wires the statistics into one Locust process: recording, shipping, merging and pages."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment
        self.stats = ClientStats()

    # --- recording and aggregation ------------------------------------------------------------
    def on_request(
        self,
        request_type: str,
        name: str,
        response_time: float,
        exception: Any = None,
        context: Any = None,
        **_: Any,
    ) -> None:
        """Record one request event (fired by our client on workers and stand-alone)."""
        context = context or {}
        self.stats.record(
            request_type,
            name,
            response_time / 1000.0,
            exception is not None,
            context.get(SERVICE_S),
            bool(context.get(LATE, False)),
        )

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

    def offered_rate(self) -> dict[str, float]:
        """The arrival rate per selected target (0 in the closed loop)."""
        try:
            workload = current_workload(self.environment.parsed_options)
        except KnobError:
            return {}
        return dict.fromkeys(workload.targets, workload.arrival_rate)

    def metrics_text(self) -> bytes:
        """The /metrics page."""
        return render_metrics(
            self.stats, self.users_by_target(), self.selected_targets(), self.offered_rate()
        )

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
        from loadtest.plugin.webui import add_web_routes

        add_web_routes(web_ui, exporter)
    return exporter

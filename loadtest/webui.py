"""The Locust web UI's additions: ``/metrics``, ``/latency``, the latency tab, the knob check.

Locust's UI renders extra tabs from template arguments and fills them from an
``extended_stats`` entry in its ``/stats/requests`` poll; its ``/swarm`` handler stores any form
text, so the knobs are validated here first and refused the way the form shows errors.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from loadtest.client_metrics import PROMETHEUS_TEXT
from loadtest.client_stats import latency_rows, latency_table
from loadtest.workload import KnobError, Workload, current_workload

if TYPE_CHECKING:
    from loadtest.exporter import Exporter

LATENCY_TAB = "socket-arena-latency"


def add_web_routes(web_ui: Any, exporter: Exporter) -> None:
    """Serve /metrics and /latency, add the latency tab, and check knobs before /swarm."""
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

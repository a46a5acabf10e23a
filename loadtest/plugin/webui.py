"""The Locust web UI's additions: ``/metrics``, ``/latency``, two tabs, the knob check.

Locust's UI renders extra tabs from template arguments and fills them from an
``extended_stats`` entry in its ``/stats/requests`` poll; its ``/swarm`` handler stores any form
text, so the knobs are validated here first and refused the way the form shows errors. The
``/swarm`` interception is one of the adapters of ``loadtest.plugin.locust_adapter``: checked
when the
routes are added, and ``/metrics`` ends with their ``locust_adapter_fallback`` gauge.

What a user sees, checked in Chromium (tests/test_webui_browser.py):
- tab titles survive Locust's upper-casing (no ``µ``: it becomes a Greek capital Mu, "MS");
- the custom parameters keep the order of ``workload.KNOBS`` (scenario, workload, targets):
  Jinja's ``tojson`` would sort them alphabetically;
- the header's "Host" names the targets, and no host warning shows: each user class has its own
  address, which Locust would otherwise report as "override the host for the User classes".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from loadtest.plugin import locust_adapter, scenarios
from loadtest.plugin.client import CONNECT
from loadtest.plugin.client_metrics import PROMETHEUS_TEXT
from loadtest.plugin.client_stats import ClientStats, latency_rows, latency_table
from loadtest.plugin.users import address_url, scenario_user_count, sync_hosts
from loadtest.plugin.workload import KnobError, Workload, current_workload

if TYPE_CHECKING:
    from flask import Response
    from werkzeug.datastructures import ImmutableMultiDict


class Exporter(Protocol):
    """What the routes read of the master's exporter (loadtest.plugin.exporter builds it)."""

    environment: Any
    stats: ClientStats

    def metrics_text(self) -> bytes:
        """The master's /metrics text."""
        ...


LATENCY_TAB = "socket-arena-latency"
SCENARIO_TAB = "socket-arena-scenario"
LATENCY_TITLE = "Latency (microseconds)"
SCENARIO_TITLE = "Scenario"
PICK_ANOTHER = (
    "Edit (or stop and start a new test) → Custom parameters → Scenario; knobs left "
    "blank take its values"
)


def targets_summary(workload: Workload) -> str:
    """What the header's "Host" shows: each selected target and its address."""
    return ", ".join(f"{t} {address_url(workload.addresses[t])}" for t in workload.targets)


def scenario_rows(workload: Workload) -> list[dict[str, str]]:
    """The Scenario tab: the lesson's paragraph, then every workload knob and where it came from."""
    lesson = scenarios.get(workload.scenario)
    rows = [
        {"item": "Scenario", "value": lesson.title},
        {"item": "Claim", "value": lesson.claim},
        {"item": "Watch", "value": lesson.watch},
        {"item": "Expect", "value": lesson.expect},
    ]
    verdict = scenarios.checked(lesson.id)
    if verdict:
        rows.append({"item": "Checked by make lessons", "value": verdict})
    rows.append({"item": "Pick another", "value": PICK_ANOTHER})
    for knob, value, source in workload.knob_values():
        rows.append({"item": knob.flag, "value": f"{value} ({source})"})
    return rows


def load_rows(workload: Workload, stats_entries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The Scenario tab's load rows: the mode, and the offered vs the achieved rate per target."""
    if not workload.open_loop:
        return [
            {
                "item": "Load",
                "value": "closed loop: each user waits for its answer, then thinks "
                "(--arrival-rate 0)",
            }
        ]
    achieved = dict.fromkeys(workload.targets, 0.0)
    for entry in stats_entries:
        if entry.get("method") in achieved and entry.get("name") != CONNECT:
            achieved[entry["method"]] += float(entry.get("current_rps") or 0.0)
    return [
        {
            "item": "Load",
            "value": f"arrival rate: {workload.arrival_rate:g} requests/s per target on a "
            f"{workload.arrival} timetable; latency counts from when each request was due",
        },
        {
            "item": "Offered vs achieved",
            "value": ", ".join(
                f"{target} {workload.arrival_rate:g}/s vs {rate:.1f}/s"
                for target, rate in achieved.items()
            ),
        },
    ]


def add_web_routes(web_ui: Any, exporter: Exporter) -> None:
    """Serve /metrics and /latency, add the tabs, tidy the start form, check knobs before /swarm."""
    app = web_ui.app
    app.route("/metrics")(metrics_route(exporter))
    app.route("/latency")(latency_route(exporter))
    add_tabs(web_ui)
    list_targets_as_host(web_ui, exporter.environment)
    app.after_request(stats_with_tabs(exporter))
    locust_adapter.intercept_swarm(app, knob_check(exporter.environment))


def metrics_route(exporter: Exporter) -> Callable[[], Response]:
    """The /metrics view: the exporter's text, then the adapters' fallback gauge."""
    from flask import Response

    def metrics() -> Response:
        """Answer /metrics."""
        text = exporter.metrics_text() + locust_adapter.metrics_text()
        return Response(text, mimetype=PROMETHEUS_TEXT)

    return metrics


def latency_route(exporter: Exporter) -> Callable[[], Response]:
    """The /latency view: the latency table as text, or its rows with ?format=json."""
    from flask import Response, jsonify, request

    def latency() -> Response:
        """Answer /latency."""
        rows = latency_rows(exporter.stats)
        if request.args.get("format") == "json":
            return jsonify(rows)
        return Response(latency_table(rows) + "\n", mimetype="text/plain; charset=utf-8")

    return latency


def add_tabs(web_ui: Any) -> None:
    """Declare the Scenario and Latency tabs and the latency download; keep the knobs' order."""
    # Locust's UI renders extra tabs from these template arguments and fills them from an
    # "extended_stats" entry in its /stats/requests poll. It upper-cases tab titles, so no µ.
    web_ui.template_args["extended_tabs"] = [
        {"title": SCENARIO_TITLE, "key": SCENARIO_TAB},
        {"title": LATENCY_TITLE, "key": LATENCY_TAB},
    ]
    web_ui.template_args["extended_tables"] = [
        {
            "key": SCENARIO_TAB,
            "structure": [{"key": "item", "title": "What"}, {"key": "value", "title": "Now"}],
        },
        {
            "key": LATENCY_TAB,
            "structure": [
                {"key": "target", "title": "Target"},
                {"key": "command", "title": "Command"},
                {"key": "requests", "title": "Requests"},
                {"key": "failures", "title": "Failures"},
                {"key": "p50_us", "title": "p50"},
                {"key": "p99_us", "title": "p99"},
                {"key": "p999_us", "title": "p99.9"},
                {"key": "max_us", "title": "max"},
                {"key": "service_p50_us", "title": "service p50"},
                {"key": "service_p99_us", "title": "service p99"},
                {"key": "late_starts", "title": "late starts"},
            ],
        },
    ]
    web_ui.template_args["extended_csv_files"] = [
        {"href": "/latency?format=json", "title": "Download client-side latency (microseconds)"}
    ]
    # The page embeds its arguments with Jinja's tojson, whose default policy sorts keys: the
    # custom parameters would show alphabetically, the scenario among the targets. Keep the
    # order they were added in (workload.KNOBS).
    web_ui.app.jinja_env.policies["json.dumps_kwargs"] = {"sort_keys": False}


def list_targets_as_host(web_ui: Any, environment: Any) -> None:
    """Make the header's "Host" list the targets, and drop Locust's host warnings."""
    update_template_args = web_ui.update_template_args

    def update_template_args_without_host_warnings() -> None:
        """Locust's template arguments, then the targets as Host and no host warning."""
        update_template_args()
        try:
            summary = targets_summary(current_workload(environment.parsed_options))
        except KnobError:
            summary = ""
        # Locust sees one host per user class and warns that a Host would override them all;
        # the targets are set under Custom parameters instead, and the header lists them.
        web_ui.template_args.update(
            override_host_warning=False, missing_host_warning=False, host=summary
        )

    web_ui.update_template_args = update_template_args_without_host_warnings


def stats_with_tabs(exporter: Exporter) -> Callable[[Response], Response]:
    """An after-request hook that adds both tabs' rows to Locust's /stats/requests poll."""
    from flask import request

    environment = exporter.environment

    def add_tables_to_stats(response: Response) -> Response:
        """Add "extended_stats" to a /stats/requests answer; pass any other response."""
        if not request.path.endswith("/stats/requests") or response.mimetype != "application/json":
            return response
        body = response.get_json(silent=True)
        if isinstance(body, dict):
            extended = [{"key": LATENCY_TAB, "data": latency_rows(exporter.stats)}]
            try:
                workload = current_workload(environment.parsed_options)
                rows = scenario_rows(workload)
                rows[1:1] = load_rows(workload, body.get("stats") or [])
                extended.append({"key": SCENARIO_TAB, "data": rows})
            except KnobError:
                pass
            body["extended_stats"] = extended
            response.set_data(json.dumps(body))
        return response

    return add_tables_to_stats


def knob_check(environment: Any) -> Callable[[], Any]:
    """The check before Locust's /swarm: refuse bad knobs, else hand Locust a form it can use."""
    from flask import jsonify, request

    def refuse(message: str) -> Response:
        """The answer the start form shows as an error."""
        return jsonify({"success": False, "message": message, "host": environment.host})

    def check_knobs_before_swarm() -> Any:
        """A refusal, or None to let Locust's /swarm handler go on with the rewritten form."""
        # Locust's own /swarm handler would store any text (or fail with a 500 on a number field);
        # check the knobs first and answer the way the form shows errors.
        options = vars(environment.parsed_options)
        submitted = {**options, **request.form.to_dict()}
        try:
            new = Workload.from_options(submitted)
        except KnobError as error:
            return refuse(str(error))
        refusal = swarm_refusal(environment, request.form, new)
        if refusal is not None:
            return refuse(refusal)
        request.form = form_for_locust(request.form, new)
        sync_hosts(environment, new)
        return None

    return check_knobs_before_swarm


def swarm_refusal(environment: Any, form: Mapping[str, str], new: Workload) -> str | None:
    """Why a start or edit with valid knobs is refused (a Host, new targets mid-test), or None."""
    old = current_workload(environment.parsed_options)
    host = form.get("host", "").strip()
    if host and host != targets_summary(old):
        return (
            "Locust's Host is not used: each target has its own address under "
            "Custom parameters (threaded_target, ...)"
        )
    running = environment.runner is not None and environment.runner.state in (
        "spawning",
        "running",
    )
    if running and (new.targets, new.users_per_target) != (old.targets, old.users_per_target):
        return (
            f"targets {','.join(new.targets)} with {new.users_per_target} users each "
            f"(scenario {new.scenario}): targets and users per target apply when a test "
            "starts; stop the test and start a new one with these settings"
        )
    return None


def form_for_locust(
    form: ImmutableMultiDict[str, str], new: Workload
) -> ImmutableMultiDict[str, str]:
    """The form Locust's /swarm reads: no Host, and the number of users the scenario asks for."""
    from werkzeug.datastructures import ImmutableMultiDict

    # Without the Host, which would overwrite every user class's host.
    fields = [(key, value) for key, value in form.items(multi=True) if key != "host"]
    try:
        user_count: int | None = int(form["user_count"])
    except (KeyError, ValueError):
        user_count = None  # Locust's handler reports it
    if user_count is not None:
        raised = str(scenario_user_count(new, user_count))
        fields = [(key, raised if key == "user_count" else value) for key, value in fields]
    return ImmutableMultiDict(fields)

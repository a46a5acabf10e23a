"""The Grafana dashboard is generated from the registry (loadtest/tools/dashboard.py): the
committed file is the generator's output, and a model added to the registry shows everywhere a
model shows without a dashboard edit."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from loadtest.tools import dashboard, scrapes
from services import models
from tests.conftest import run_module

# A model that is not in the registry, with an event loop and threads of its own, so that the
# model-specific panels must take it too. Its server is never imported: the dashboard needs none.
EXTRA = models.Model(
    "extra",
    "tests.no_such_module:Server",
    "a model added to the registry only in this test",
    "yellow",
    9099,
    flow="thread",
    variants=(models.Variant("extra"),),
    own_metrics=("arena_threads", *models.EVENT_LOOP_METRICS),
)
WITH_EXTRA = (*models.MODELS, EXTRA)


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    found, pending = [], list(board["panels"])
    while pending:
        panel = pending.pop(0)
        pending.extend(panel.get("panels", []))
        found.append(panel)
    return found


def generated(registry: tuple[models.Model, ...]) -> dict[str, Any]:
    """The dashboard the generator makes for this registry, as Grafana reads it."""
    board: dict[str, Any] = json.loads(dashboard.render(registry))
    return board


def model_colours(panel: dict[str, Any]) -> dict[str, str]:
    """{pattern: colour} of a panel's colour overrides."""
    return {
        override["matcher"]["options"]: prop["value"]["fixedColor"]
        for override in panel.get("fieldConfig", {}).get("overrides", [])
        for prop in override["properties"]
        if prop["id"] == "color"
    }


def exprs(panel: dict[str, Any]) -> list[str]:
    """The PromQL of a panel's queries."""
    return [target["expr"] for target in panel.get("targets", [])]


def test_the_committed_dashboard_is_the_generated_one() -> None:
    """`python -m loadtest.tools.dashboard --check` passes: arena.json was not edited by hand
    and the registry has not changed since it was written (else: `make dashboard`)."""
    result = run_module("loadtest.tools.dashboard", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_with_a_short_diff_on_a_stale_file(tmp_path: Path) -> None:
    """A dashboard that differs from the registry's is reported with a diff naming the line."""
    stale = tmp_path / "arena.json"
    stale.write_text(dashboard.render().replace('"fixedColor": "blue"', '"fixedColor": "red"', 1))
    lines = dashboard.stale(files={stale: dashboard.render()}).splitlines()
    changed = [line[0] + line[1:].strip(" ,") for line in lines if line[:1] in "-+"]
    assert [line for line in changed if "fixedColor" in line] == [
        '-"fixedColor": "red"',
        '+"fixedColor": "blue"',
    ]
    assert len(lines) <= dashboard.DIFF_LINES


def test_an_added_model_gets_its_colour_in_every_colour_override() -> None:
    """Every panel that colours models colours each registered model, the added one included,
    in its registry colour, and the intro and the title name it."""
    board = generated(WITH_EXTRA)
    coloured = [panel for panel in panels(board) if model_colours(panel)]
    before = [panel["id"] for panel in panels(generated(models.MODELS)) if model_colours(panel)]
    assert before and [panel["id"] for panel in coloured] == before
    for panel in coloured:
        overrides = model_colours(panel)
        assert len(overrides) == len(WITH_EXTRA), panel["title"]
        for model in WITH_EXTRA:
            # Grafana anchors the pattern at both ends: the colour of the series named after a
            # model, its PostgreSQL connections too, and of no other model's series.
            for series in (f"{model.name}", f"{model.name} p99", f"arena-{model.name}"):
                matched = [c for p, c in overrides.items() if re.fullmatch(p, series)]
                assert matched == [model.colour], (panel["title"], series, matched)
        assert [c for p, c in overrides.items() if re.fullmatch(p, "threaded pool size")] == [
            "blue"
        ], panel["title"]
    text = next(panel for panel in panels(board) if panel["type"] == "text")
    assert f"**{EXTRA.name}** in {EXTRA.colour}: {EXTRA.summary}." in text["options"]["content"]
    assert board["title"].endswith(f" vs {EXTRA.name}")
    assert board["uid"] == "socket-arena"


def test_an_added_model_is_in_every_server_query() -> None:
    """Every query over all the servers' jobs selects the added model's job too."""
    board = generated(WITH_EXTRA)
    every_job = 'job=~"' + "|".join(model.name for model in WITH_EXTRA) + '"'
    before = 'job=~"' + "|".join(models.NAMES) + '"'
    queries = [expr for panel in panels(board) for expr in exprs(panel)]
    assert any(every_job in expr for expr in queries)
    assert not [expr for expr in queries if before + "}" in expr or before + ")" in expr]


def test_model_specific_panels_follow_own_metrics() -> None:
    """The event-loop panel and the unit-of-concurrency series take the models whose
    own_metrics list those families, the added one included, and no other."""
    board = generated(WITH_EXTRA)
    loops = [m.name for m in WITH_EXTRA if "arena_event_loop_blocks" in m.own_metrics]
    (loop_panel,) = [p for p in panels(board) if p["title"].endswith(": event-loop blocking")]
    assert loop_panel["title"] == dashboard.and_join(loops) + ": event-loop blocking"
    for expr in exprs(loop_panel):
        assert 'job=~"' + "|".join(loops) + '"' in expr
    threads = dashboard.job_selector([m for m in WITH_EXTRA if "arena_threads" in m.own_metrics])
    assert any(f"arena_threads{{{threads}}}" in expr for p in panels(board) for expr in exprs(p))


def test_a_panel_no_model_feeds_is_left_out() -> None:
    """Without a model that has an event loop, there is no event-loop panel (a panel without a
    query would show "No data" for ever), and the rest is still laid out and numbered."""
    without = tuple(dataclasses.replace(model, own_metrics=()) for model in models.MODELS)
    board = generated(without)
    titles = [panel["title"] for panel in panels(board)]
    assert not [title for title in titles if "event-loop" in title or "Threads" in title]
    assert "Database errors per second, by kind" in titles
    ids = [panel["id"] for panel in panels(board)]
    assert ids == list(range(1, len(ids) + 1))


def test_prometheus_scrapes_every_registered_model_as_generated() -> None:
    """docker/prometheus/prometheus.yml is written from the registry: an added model gets its
    job, found by DNS with the replica labels, without an edit."""
    config = scrapes.compose_config(WITH_EXTRA)
    for model in WITH_EXTRA:
        assert f"  - job_name: {model.name}\n    honor_labels: true\n" in config
        assert f"{{names: [{model.name}], type: A, port: 9100" in config
    assert config.count("relabel_configs: *replica-labels") == len(WITH_EXTRA) - 1
    assert scrapes.PROMETHEUS_YML.read_text() == scrapes.compose_config(models.MODELS)

"""The docs' measured figures come from results/ and cannot drift from them unnoticed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from loadtest.plugin.workload import KNOBS
from loadtest.tools import docfigures
from services import models
from tests.conftest import run_module

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- (figures|source):([a-z0-9-]+):begin -->.*?<!-- \1:\2:end -->", re.S)
# A measured rate: `85,482 req/s`, `75-85k echo requests/s` (en dash too), `12,000 requests per
# second`.
RATE = re.compile(
    r"\d[\d,.]*(?:\s*(?:\u2013|-|to)\s*\d[\d,.]*)?\s*k?\s+(?:echo\s+)?"
    r"(?:req/s|requests/s|requests per second)"
)
PER_CORE = re.compile(
    r"\d[\d,.]*\s*k?\s+(?:echo\s+)?(?:req/s|requests(?:/s| per second)?)"
    r"[^.]{0,20}?\bper core"
)
# A soak-sized total: `824,445 requests`.
TOTAL = re.compile(r"\b\d{1,3}(?:,\d{3})+\s+requests\b(?!/s| per)")
# Outside the generated sections, only these figures may stand, each with the reason.
NOT_MEASURED = {
    "3,000 requests per second": "offered load, 300 users / 100 ms think time: arithmetic",
}


def _docs() -> list[Path]:
    return docfigures.doc_paths(ROOT)


def _outside_blocks(text: str) -> str:
    return " ".join(BLOCK.sub(" ", text).split())


def _inside_generated(text: str) -> str:
    return " ".join(
        " ".join(m.group(0) for m in BLOCK.finditer(text) if m.group(1) == "figures").split()
    )


def test_every_marked_section_matches_the_committed_results():
    stale = docfigures.stale(_docs(), docfigures.Sources())
    assert not stale, "sections differ from results/ (run `make docs`):\n" + "\n".join(
        stale.values()
    )


def test_every_generated_section_is_used_somewhere():
    text = "".join(path.read_text() for path in _docs())
    unused = [name for name in docfigures.RENDERERS if f"<!-- figures:{name}:begin -->" not in text]
    assert not unused


def test_figures_outside_the_sections_are_not_copies_of_measurements():
    generated = " ".join(_inside_generated(path.read_text()) for path in _docs())
    found = []
    for path in _docs():
        outside = _outside_blocks(path.read_text())
        for pattern in (RATE, PER_CORE, TOTAL):
            for match in pattern.finditer(outside):
                figure = match.group(0)
                if figure in NOT_MEASURED or figure in generated:
                    continue
                found.append(f"{path.relative_to(ROOT)}: {figure!r}")
    assert not found, (
        "measured figures written by hand; generate them "
        "(loadtest/tools/docfigures.py) or link to where they are: " + "; ".join(found)
    )


def test_locust_capacity_is_written_in_one_place_and_linked_from_the_others():
    places = []
    for path in _docs():
        text = path.read_text()
        places += [
            (path.name, m.group(0))
            for m in BLOCK.finditer(text)
            if "source:locust-capacity" in m.group(0)
        ]
        assert not PER_CORE.search(_outside_blocks(text)), path
    assert [name for name, _ in places] == ["LOADTEST.md"]
    assert PER_CORE.search(" ".join(places[0][1].split())) or "requests per second" in places[0][1]
    readme = (ROOT / "README.md").read_text()
    assert "docs/LOADTEST.md#locusts-capacity-here" in readme
    assert "### Locust's capacity here" in (ROOT / "docs" / "LOADTEST.md").read_text()


def test_the_check_fails_on_a_hand_edited_figure_and_the_generator_repairs_it(tmp_path):
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    readme = tmp_path / "README.md"
    text = readme.read_text()
    section = re.search(
        r"<!-- figures:bench-run:begin -->.*?<!-- figures:bench-run:end -->", text, re.S
    ).group(0)
    edited = re.sub(r"\| threaded \| [\d,]+", "| threaded | 99,999", section, count=1)
    assert edited != section
    readme.write_text(text.replace(section, edited))
    command = ("loadtest.tools.docfigures", "--root", str(tmp_path))

    check = run_module(*command, "--check")
    assert check.returncode == 1
    assert "-| threaded | 99,999" in check.stdout
    assert "README.md" in check.stderr and "make docs" in check.stderr

    write = run_module(*command)
    assert write.returncode == 0, write.stderr
    assert readme.read_text() == (ROOT / "README.md").read_text()
    assert run_module(*command, "--check").returncode == 0


def test_a_new_result_makes_the_docs_stale(tmp_path):
    bench = json.loads((ROOT / "results" / "bench.json").read_text())
    bench["meta"]["ceiling"]["rps"] = 123_456.0
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    shutil.copy(ROOT / "results" / "soak.json", tmp_path / "soak.json")
    shutil.copy(ROOT / "results" / "scrape_cost.json", tmp_path / "scrape_cost.json")
    if (ROOT / "results" / "replicas.json").exists():
        shutil.copy(ROOT / "results" / "replicas.json", tmp_path / "replicas.json")
    if (ROOT / "results" / "lessons").is_dir():
        shutil.copytree(ROOT / "results" / "lessons", tmp_path / "lessons")
    stale = docfigures.stale(_docs(), docfigures.Sources(tmp_path))
    assert {path.name for path in stale} == {"README.md", "BENCHMARK.md"}
    assert all("123,456 req/s" in diff for diff in stale.values())


def test_a_soak_report_becomes_the_summary_the_docs_quote(tmp_path):
    report = {
        "started": "2027-01-02T03:04:05+00:00",
        "finished": "2027-01-03T03:04:09+00:00",
        "settings": {"duration_s": 86400.0, "users_per_target": 100},
        "passed": True,
        "locust": {"requests": 25_000_300, "failures": 0},
        "figures": {
            model: {
                "requests": 8_333_333.0,
                "request_errors": 0.0,
                "rss_first_third_mib": 40.04,
                "rss_growth_mib": 1.234,
                "fd_growth": 0.0,
            }
            for model in models.NAMES
        },
    }
    summary = docfigures.soak_summary(report)
    text = docfigures.soak_readme(summary)
    total = 8_333_333 * len(models.NAMES)
    assert text.startswith(f"A 24-hour soak at 100 users per server (2027-01-02): {total:,}")
    assert "+1.23 MiB (threaded)" in text and "no descriptor growth" in text
    table = docfigures.soak_table(summary)
    assert "| gevent | 8,333,333 | 0 | 40.0 | +1.23 | 0 |" in table


def test_a_missing_result_is_said_not_invented(tmp_path):
    sources = docfigures.Sources(tmp_path)
    for name, render in docfigures.RENDERERS.items():
        assert render(sources) in (
            docfigures.NO_BENCH,
            docfigures.NO_SOAK,
            docfigures.NO_LESSONS,
            docfigures.NO_SCRAPE_COST,
            docfigures.NO_REPLICAS,
            docfigures.NO_OPEN_LOOP,
        ), name


def test_the_replicas_figure_states_both_rates_the_ratio_and_locusts_share():
    run = {"rps": 1000.0, "server_cores": [0.98], "locust_cores": 0.4, "replicas": 1}
    run |= {"other_cores": 0.05}
    runs = [run, {**run, "rps": 1700.0, "server_cores": [0.9, 0.8], "replicas": 2}]
    data = {"when": "2027-01-02 03:04 UTC", "commit": "abc1234", "cpus": 4, "model": "gevent"}
    data |= {"cpus_per_replica": 1.0, "users": 100, "runs": runs, "ratio": 1.7}
    text = " ".join(docfigures.replicas_figure(data).split())
    assert "one replica 1,000 requests/s, 2 replicas 1,700 requests/s, **1.70x**" in text
    assert "servers used 0.98 and 1.70 cores; Locust used 0.40 and 0.40 cores" in text
    assert "meanwhile, other processes 0.05 and 0.05." in text
    assert "busy" not in text
    runs[1]["other_cores"] = 0.8
    assert "The machine was busy" in docfigures.replicas_figure(data)


def test_the_replicas_measurement_refuses_a_bad_argument_without_docker():
    result = run_module("loadtest.tools.replicas", "--replicas", "1")
    assert result.returncode == 2 and "--replicas >= 2" in result.stderr
    result = run_module("loadtest.tools.replicas", "--model", "nginx")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_the_open_loop_section_reads_each_models_knee(tmp_path):
    def step(percent: int, offered: float, p99_us: float) -> dict:
        latency = {"p50": p99_us / 10, "p99": p99_us}
        return {"percent": percent, "offered_rps": offered, "latency_us": latency}

    first, second = models.NAMES[:2]
    data = {
        "meta": {
            "date": "2026-12-02 12:00 UTC",
            "machine": {"cores": 2},
            "pinning": "not pinned",
            "scenario_title": "echo 64 B, 100 conns",
            "steps_percent": [10, 20],
            "duration_s": 3,
            "knee_p99_us": 10_000.0,
            "kept_up_share": 0.9,
        },
        "models": [
            {
                "family": first,
                "closed_loop": {"rps": 10_000},
                "points": [step(10, 1000, 900), step(20, 2000, 45_000)],
                "knee": {"offered_rps": 1000, "percent": 10, "p99_us": 900},
            },
            {
                "family": second,
                "closed_loop": {"rps": 5000},
                "points": [step(10, 500, 20_000)],
                "knee": None,
            },
        ],
    }
    (tmp_path / "bench-open-loop.json").write_text(json.dumps(data))
    text = docfigures.RENDERERS["open-loop"](docfigures.Sources(tmp_path))
    assert f"| {first} | 10,000 | 1,000 | 10 % | 0.9 ms | 45.0 ms |" in text
    assert f"| {second} | 5,000 | none (p99 over 10 ms from the first step) |" in text
    assert "results/open-loop.png" in text


def test_unbalanced_markers_are_refused(tmp_path):
    broken = "<!-- figures:bench-run:begin -->\nno end\n"
    with pytest.raises(docfigures.FiguresError, match="unbalanced"):
        docfigures.render_text(broken, docfigures.Sources(tmp_path))
    with pytest.raises(docfigures.FiguresError, match="unknown figures section"):
        docfigures.render_text(
            "<!-- figures:nope:begin -->\n<!-- figures:nope:end -->", docfigures.Sources(tmp_path)
        )


def test_locust_help_lists_every_knob():
    result = run_module("loadtest", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--headless" in result.stdout  # Locust's own options too
    missing = [knob.flag for knob in KNOBS if knob.flag not in result.stdout]
    assert not missing


def _with_fairness(starved_target: str | None) -> docfigures.Bench:
    bench = json.loads((ROOT / "results" / "bench.json").read_text())
    for run in bench["runs"]:
        connections = bench["scenarios"][run["scenario"]]["connections"]
        starved = run["scenario"] == "echo64-c1000" and run["target"] == starved_target
        run["median"].update(
            {
                "connections": connections,
                "answered_connections": 352 if starved else connections,
                "starved": starved,
                "starved_reps": int(starved),
                "requests_per_connection_min": 0 if starved else 20,
                "requests_per_connection_median": 40,
                "requests_per_connection_max": 900,
                "longest_wait_s": 5.9 if starved else 0.031,
                "longest_wait_unanswered": starved,
            }
        )
    return docfigures.Bench(bench)


def test_the_fairness_figures_are_quoted_when_the_results_have_them():
    starved = _with_fairness("threaded")
    reading = " ".join(docfigures.bench_reading(starved).split())
    assert (
        "threaded answered 352 of 1000 connections (a request still waiting after 5.9 s; "
        "0\u2013900 requests per connection)"
    ) in reading
    assert reading.count("Not every connection was served in the measured window") == 1
    rows = docfigures.bench_run(starved).splitlines()
    threaded_row = next(row for row in rows if row.startswith("| threaded |"))
    assert "\u26a0 352/1000 answered" in threaded_row

    fair = " ".join(docfigures.bench_reading(_with_fairness(None)).split())
    assert "Every server answered all 1000 connections in every measured window" in fair

"""The benchmark: a tiny real run of every model writes valid JSON, Markdown and PNG charts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loadtest.bench import harness, loadgen, openloop, report, scenarios
from loadtest.bench.loadgen import Request
from loadtest.bench.scenarios import TEXTBOOK_NAMES, build_scenarios, build_targets
from loadtest.lessons.verdict import EVENT_LOOPS
from loadtest.tools import procs
from loadtest.tools.postgres import BINDIR_VARIABLE, Postgres
from services import models
from tests.conftest import run_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The benchmark's families: every variant of every registered model (services/models.py), then
# each event loop with --processes 2 (ours only, on every CPU).
FAMILIES = scenarios.FAMILIES
ONE_CORE = models.VARIANTS
SEVERAL = scenarios.PROCESS_FAMILIES
KINDS = ("ours", "no-metrics", "textbook")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """One scenario, every model (ours with and without metrics, textbook), one short rep."""
    out = tmp_path_factory.mktemp("bench")
    result = run_module(
        "loadtest.bench",
        *("--scenarios", "echo64", "--duration", "0.3", "--warmup", "0.1", "--reps", "1"),
        *("--noisy-retries", "0", "--out", str(out)),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    return out, json.loads((out / "bench.json").read_text()), result.stderr


def test_the_histogram_error_is_below_one_percent() -> None:
    binary = loadgen.build()
    output = subprocess.run(
        [str(binary), "--selftest"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert json.loads(output)["max_relative_error"] <= 0.01


@pytest.mark.slow
def test_a_tiny_run_measures_every_server_and_says_where_and_how(tiny_run) -> None:
    _, results, progress = tiny_run
    meta = results["meta"]
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["cpu_model"]
    assert meta["reps"] == 1 and meta["date"] and meta["pinning"]
    assert meta["ceiling"]["rps"] > 0
    assert list(results["scenarios"]) == ["echo64"]
    names = {target["name"] for target in results["targets"]}
    # Every kind per family; a variant without a textbook twin has no textbook target.
    textbook_twins = sum(variant.textbook is not None for _, variant in ONE_CORE.values())
    assert len(names) == len(ONE_CORE) * (len(KINDS) - 1) + textbook_twins + len(SEVERAL)
    textbooks = {t["family"]: t["command"] for t in results["targets"] if t["kind"] == "textbook"}
    assert textbooks == {
        family: TEXTBOOK_NAMES[variant.textbook]
        for family, (_, variant) in FAMILIES.items()
        if variant.textbook is not None
    }
    assert {run["target"] for run in results["runs"]} == names
    for run in results["runs"]:
        assert len(run["reps"]) == 1
        median = run["median"]
        for key in (
            "rps",
            "server_cpu_s",
            "server_cpu_us_per_request",
            "peak_rss_bytes",
            "threads",
            "loadgen_cpu_fraction",
            "loadgen_saturated",
            "other_cpu_fraction",
            "errors",
            "connections",
            "answered_connections",
            "starved",
            "requests_per_connection_min",
            "requests_per_connection_max",
            "longest_wait_s",
            "longest_wait_unanswered",
        ):
            assert key in median, (run["target"], key)
        assert set(median["latency_us"]) >= {"p50", "p99", "p999"}
        # Every reply was checked byte for byte by the load generator.
        assert median["errors"] == 0, (run["target"], run["reps"][0]["error_kinds"])
        assert run["reps"][0]["requests"] > 0 and median["peak_rss_bytes"] > 0
        assert run["reps"][0]["connected"] == results["scenarios"]["echo64"]["connections"]
        assert median["connections"] == results["scenarios"]["echo64"]["connections"]
    families = {row["family"] for row in results["comparisons"]}
    assert families == set(FAMILIES)
    assert "rep 1/1" in progress  # progress is shown while it runs


@pytest.mark.slow
def test_the_rows_of_two_processes_run_each_event_loop_on_every_cpu(tiny_run) -> None:
    out, results, progress = tiny_run
    assert set(SEVERAL) == {f"{name}-x2" for name in EVENT_LOOPS}
    several = {t["name"]: t for t in results["targets"] if t["family"] in SEVERAL}
    assert set(several) == set(SEVERAL)  # ours only: no textbook runs two processes
    for target in several.values():
        assert target["every_cpu"] and target["command"].endswith("--processes 2"), target
    assert not any(t["every_cpu"] for t in results["targets"] if t["family"] in ONE_CORE)
    runs = {run["target"]: run for run in results["runs"]}
    for name in several:
        assert runs[name]["reps"][0].get("shared_cpus") is True
        assert runs[name]["median"]["errors"] == 0
    cpus = sorted(os.sched_getaffinity(0))
    meta = results["meta"]["several_processes"]
    assert meta["families"] == sorted(SEVERAL) and meta["processes"] == 2
    if len(cpus) >= 2:
        every = ",".join(map(str, cpus))
        assert meta["pinning"] == f"server and load generator on CPU {every}"
        assert f"server and load generator on CPU {every}" in progress
    markdown = (out / "bench.md").read_text()
    assert f"- **{', '.join(sorted(SEVERAL))}:** the model with `--processes 2`" in markdown


def test_a_run_sharing_the_servers_cpus_counts_the_load_generator_apart() -> None:
    record = {"other_cpu_fraction": 0.62, "loadgen_cpu_fraction": 0.55}
    assert harness.without_loadgen(record) == {
        "other_cpu_fraction": 0.07,
        "loadgen_cpu_fraction": 0.55,
        "shared_cpus": True,
    }
    pinning = harness.Pinning(frozenset({1}), frozenset({0}))
    assert not pinning.shared
    assert pinning.every_cpu() == harness.Pinning(frozenset({0, 1}), frozenset({0, 1}))
    assert pinning.every_cpu().shared
    assert harness.Pinning(None, None).every_cpu() == harness.Pinning(None, None)


@pytest.mark.slow
def test_a_tiny_run_writes_a_markdown_table_and_valid_png_charts(tiny_run) -> None:
    out, results, _ = tiny_run
    for chart in report.CHARTS:
        assert (out / chart).read_bytes()[:8] == PNG_MAGIC, chart
    markdown = (out / "bench.md").read_text()
    assert "| server | req/s | p50 µs | p99 µs | p99.9 µs |" in markdown
    assert "| answered | req/conn | longest wait |" in markdown
    for target in results["targets"]:
        assert f"| {target['name']} |" in markdown
    for chart in report.CHARTS:
        assert f"({chart})" in markdown


@pytest.mark.slow
def test_a_saturated_load_generator_is_flagged_next_to_the_number(tiny_run, tmp_path) -> None:
    _, results, _ = tiny_run
    results["runs"][0]["median"]["loadgen_saturated"] = True
    markdown = report.write_markdown(results, tmp_path).read_text()
    flagged = [line for line in markdown.splitlines() if "load generator saturated" in line]
    assert len(flagged) == 1 and flagged[0].startswith(f"| {results['runs'][0]['target']} |")


@pytest.mark.slow
def test_open_loop_latency_counts_from_when_each_request_was_due(tmp_path) -> None:
    """The C echo server stopped for 0.5 s of a 2 s run at 1000 requests/s: about 500 requests
    fall due during the stall, so a quarter of the run waited up to 0.5 s, whatever was sent."""
    binary = loadgen.build()
    server = procs.start_server([str(binary), "--serve", "0"], name="c-epoll", timeout=30)
    try:
        generator = subprocess.Popen(
            loadgen.command(
                binary, server.port, 20, 2.0, 0.2, [Request(1, "abc", "ABC")], rate=1000
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # inside the measured window (connect + 0.2 s warm-up before it)
        os.kill(server.proc.pid, signal.SIGSTOP)
        time.sleep(0.5)  # the stall
        os.kill(server.proc.pid, signal.SIGCONT)
        output, _ = generator.communicate(timeout=60)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop(10)
    result = json.loads(output)
    assert result["errors"] == {"connect": 0, "closed": 0, "mismatch": 0, "timeout": 0}
    assert result["open_loop"]["rate"] == 1000
    assert result["open_loop"]["due"] >= 1500 and result["open_loop"]["backlog_end"] < 100
    # Closed loop, 20 connections would record at most 20 slow requests (p99 of 2000: fast).
    assert result["latency_us"]["p99"] >= 250_000, result["latency_us"]
    assert result["latency_us"]["p50"] < 250_000, result["latency_us"]


@pytest.mark.slow
def test_the_open_loop_sweep_charts_latency_against_offered_load(tmp_path) -> None:
    family = next(iter(FAMILIES))
    result = run_module(
        "loadtest.bench",
        *("--open-loop", "--quick", "--models", family, "--duration", "0.3", "--warmup", "0.1"),
        *("--out", str(tmp_path)),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / openloop.RESULT).read_text())
    [model] = data["models"]
    assert model["family"] == family and model["closed_loop"]["rps"] > 0
    assert [step["percent"] for step in model["points"]] == list(openloop.QUICK_STEPS)
    for step in model["points"]:
        assert step["achieved_rps"] > 0 and step["errors"] == 0
        assert step["latency_us"]["p99"] >= step["latency_us"]["p50"] > 0
    assert "knee" in model  # None when even the first step missed the bound (a busy machine)
    assert (tmp_path / openloop.CHART).read_bytes()[:8] == PNG_MAGIC
    assert "offered" in result.stderr and "knee" in result.stderr  # progress, then the knees


def test_the_knee_is_the_last_step_within_the_bound_before_the_first_miss() -> None:
    def step(percent: int, p99_us: float, achieved: float | None = None) -> dict:
        offered = percent * 10.0
        return {
            "percent": percent,
            "offered_rps": offered,
            "achieved_rps": offered if achieved is None else achieved,
            "errors": 0,
            "latency_us": {"p99": p99_us},
        }

    steps = [step(10, 500), step(20, 900), step(30, 20_000), step(40, 800)]
    assert openloop.knee(steps) == {"offered_rps": 200.0, "percent": 20, "p99_us": 900}
    assert openloop.knee([step(10, 500, achieved=50)]) is None  # did not keep up
    assert openloop.knee([step(10, 11_000)]) is None


@pytest.mark.parametrize(
    "module",
    [
        "loadtest.bench",
        "loadtest.bench.spread",
        "loadtest.tools.soak",
        "loadtest.tools.stack",
        "services",
    ],
)
def test_every_command_explains_itself_with_help(module: str) -> None:
    result = run_module(module, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "Traceback" not in result.stderr


def test_an_open_loop_sweep_goes_on_past_its_plan_while_the_model_keeps_up():
    kept_up = {"errors": 0, "offered_rps": 100.0, "achieved_rps": 100.0, "latency_us": {"p99": 900}}
    fell_behind = {**kept_up, "achieved_rps": 50.0}
    points: list[dict] = []
    steps = openloop.planned_steps((10, 20), points)
    assert [next(steps), next(steps)] == [10, 20]
    points += [kept_up, kept_up]
    assert next(steps) == 30  # the last step kept up: one more
    points.append(fell_behind)
    assert list(steps) == []  # saturation passed: the sweep ends
    endless = openloop.planned_steps((10, 20), [kept_up])
    assert list(endless)[-1] == openloop.MAX_PERCENT  # never past the cap


# ---- the /db scenarios: our models against a real PostgreSQL ----------------------------------


@pytest.mark.slow
def test_a_db_run_measures_the_servers_cpu_and_postgres_cpu_apart(postgres: Postgres) -> None:
    """One short /db 0 run of the threaded model, ours with and without metrics, against the
    session's PostgreSQL: every reply checked, and the postmaster's tree did work per request."""
    scenario = build_scenarios(20_000)["db0"]
    assert scenario.database and scenario.requests[0].line == "/db 0 dd"
    targets = build_targets(["threaded"], ["ours", "no-metrics"], 2)
    assert postgres.pid is not None
    runs = harness.run_targets(
        targets,
        scenario,
        loadgen.build(),
        harness.Pinning.choose(False),  # the session's cluster is shared: leave it unpinned
        1,
        0.3,
        0.1,
        harness.Progress(2, enabled=False),
        database=harness.Database(postgres.env(), postgres.pid),
    )
    assert [run["target"] for run in runs] == ["threaded", "threaded (metrics off)"]
    for run in runs:
        median = run["median"]
        assert median["errors"] == 0, run["reps"][0]["error_kinds"]
        assert median["requests"] > 0 and median["server_cpu_s"] > 0
        # A query costs PostgreSQL CPU: its backends are below the postmaster.
        assert median["postgres_cpu_s"] > 0 and median["postgres_cpu_us_per_request"] > 0
        assert median["postgres_cpu_fraction"] == pytest.approx(
            median["postgres_cpu_s"] / run["reps"][0]["elapsed_s"], abs=0.01
        )


@pytest.mark.slow
def test_the_db_scenarios_run_our_models_only_and_report_postgres_cpu(
    postgres: Postgres, tmp_path: Path
) -> None:
    """The whole command with /db 0 and /db 5: it starts its own PostgreSQL (`postgres` only
    skips this test where there is none), drops the textbook servers and writes the postgres
    CPU into the JSON, the tables and database.png."""
    chosen = [models.NAMES[0], models.NAMES[-1]]  # a thread per connection, an event loop
    result = run_module(
        "loadtest.bench",
        *("--scenarios", "db0,db5", "--models", ",".join(chosen), "--kinds", "ours,textbook"),
        *("--duration", "0.3", "--warmup", "0.1", "--reps", "1", "--noisy-retries", "0"),
        *("--no-ceiling", "--out", str(tmp_path)),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "bench.json").read_text())
    assert list(results["scenarios"]) == ["db0", "db5"] and results["skipped_scenarios"] == {}
    assert all(info["database"] for info in results["scenarios"].values())
    assert results["meta"]["postgres"]["version"]
    runs = {(run["scenario"], run["target"]) for run in results["runs"]}
    assert runs == {(s, t) for s in ("db0", "db5") for t in chosen}
    for run in results["runs"]:
        median = run["median"]
        assert median["errors"] == 0, (run["target"], run["reps"][0]["error_kinds"])
        assert median["postgres_cpu_s"] > 0, run["target"]
    # /db 5: no reply comes before PostgreSQL's 5 ms.
    for run in results["runs"]:
        if run["scenario"] == "db5" and run["reps"][0]["requests"]:
            assert run["reps"][0]["latency_us"]["min"] >= 5_000, (run["target"], run["reps"][0])
    markdown = (tmp_path / "bench.md").read_text()
    assert "| CPU µs/req | postgres CPU | postgres µs/req |" in markdown
    assert markdown.count("| threaded |") >= 2 and "| threaded textbook |" not in markdown
    assert results["charts"][-1] == report.DATABASE_CHART
    for chart in results["charts"]:
        assert (tmp_path / chart).read_bytes()[:8] == PNG_MAGIC, chart
    assert "postgres" in result.stderr  # the progress lines show its CPU per request


def test_without_postgresql_the_db_scenarios_are_skipped_with_the_install_hint(
    tmp_path: Path,
) -> None:
    env = {**os.environ, BINDIR_VARIABLE: str(tmp_path / "no-postgresql")}
    result = run_module(
        "loadtest.bench",
        *("--scenarios", "db0", "--models", "threaded", "--reps", "1", "--no-ceiling"),
        *("--out", str(tmp_path)),
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "apt-get install postgresql" in result.stderr
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["runs"] == [] and results["charts"] == []
    assert "apt-get install postgresql" in results["skipped_scenarios"]["db0"]
    assert "apt-get install postgresql" in (tmp_path / "bench.md").read_text()

"""`python -m loadtest.tools.soak`: a short real soak (every server, headless Locust), reported."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from loadtest.tools.soak import parse_duration
from services import models
from tests.conftest import run_module

MODELS = models.NAMES  # the soak runs each model as it starts by default

# How long the soak test soaks: 45 s by default, longer where ARENA_SOAK_SECONDS says (CI: 120).
SOAK_SECONDS = int(os.environ.get("ARENA_SOAK_SECONDS", "45"))


def run_soak(report_dir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """A real soak (`python -m loadtest.tools.soak ARGS`) that writes its report to `report_dir`."""
    return run_module(
        "loadtest.tools.soak", *args, "--report-dir", str(report_dir), timeout=timeout
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("45s", 45.0),
        ("2m", 120.0),
        ("1h30m", 5400.0),
        ("24h", 86400.0),
    ],
)
def test_durations_are_parsed_like_locust_run_times(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "command_line",
    [
        ["--duration", "soon"],
        ["--duration", "0"],
        ["--interval", "-1"],
        ["--max-fd-growth", "x"],
    ],
)
def test_bad_arguments_exit_2(command_line):
    result = run_module("loadtest.tools.soak", *command_line)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.locust
def test_short_soak_passes_and_writes_its_report(tmp_path):
    report_dir = tmp_path / "soak"
    result = run_soak(
        report_dir, "--duration", f"{SOAK_SECONDS}s", "--interval", "2", timeout=SOAK_SECONDS + 240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "soak: PASSED" in result.stdout

    report = json.loads((report_dir / "report.json").read_text())
    assert report["passed"] is True
    assert report["problems"] == []
    assert report["locust"]["failures"] == 0
    assert report["locust"]["requests"] > 0
    for model in MODELS:
        samples = report["samples"]["servers"][model]
        assert len(samples) >= 10, f"{model}: {len(samples)} samples"
        # Under load each server held Locust's 100 connections.
        assert max(sample["connections"] for sample in samples) == 100
        assert samples[-1]["requests"] > 0
        figures = report["figures"][model]
        assert abs(figures["rss_growth_mib"]) <= report["bounds"]["max_rss_growth_mib"]
        assert figures["fd_growth"] <= report["bounds"]["max_fd_growth"]
    # A thread per connection on threaded; greenlets on gevent; transports on asyncio.
    threaded = report["samples"]["servers"]["threaded"]
    assert max(sample["tasks"] for sample in threaded) >= 100
    gevent = report["samples"]["servers"]["gevent"]
    assert max(sample["tasks"] for sample in gevent) == 100
    asyncio = report["samples"]["servers"]["asyncio"]
    assert max(sample["tasks"] for sample in asyncio) == 100

    markdown = (report_dir / "report.md").read_text()
    assert markdown.startswith("# Soak report — PASSED")
    for chart in ("rss.png", "fds.png", "threads.png", "requests.png"):
        assert (report_dir / chart).read_bytes().startswith(b"\x89PNG"), chart
        assert f"]({chart})" in markdown
    for model in MODELS:
        assert (report_dir / f"server-{model}.log").stat().st_size > 0
        assert f"| {model} |" in markdown


@pytest.mark.slow
@pytest.mark.locust
def test_soak_fails_when_a_bound_is_broken(tmp_path):
    # A descriptor bound of -1000 cannot hold: the verdict, the exit code and the report say so.
    report_dir = tmp_path / "soak"
    result = run_soak(
        report_dir,
        *("--duration", "20s", "--interval", "1", "--warmup", "2s", "--max-fd-growth=-1000"),
        timeout=240,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert report["passed"] is False
    assert any("descriptors grew" in problem for problem in report["problems"]), report["problems"]
    assert (report_dir / "report.md").read_text().startswith("# Soak report — FAILED")

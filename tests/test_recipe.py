"""The recipe for a model holds: a module and a registry entry, and the server suites run on it.

docs/ARCHITECTURE.md lists the files a new model touches. This test registers a model written
inside the tests (tests/extra_model.py, tests/extra_server.py) through ARENA_EXTRA_MODELS and
runs the protocol, wire and metrics suites in a new pytest, selecting that model's cases: no
other file is edited for it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from services import models
from tests.conftest import ROOT
from tests.extra_model import MODEL

# The protocol suite over real sockets, and the metrics suite (tests/test_protocol.py checks the
# pure protocol functions, the same for every model).
SUITES = ("tests/test_protocol_wire.py", "tests/test_metrics.py")


def run_pytest(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A new pytest over the suites, selecting the extra model's cases."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    return subprocess.run(
        [*command, *SUITES, "-k", MODEL.name, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_a_model_written_in_the_tests_passes_the_protocol_wire_and_metrics_suites():
    assert MODEL.name not in models.NAMES  # not registered unless asked for
    env = {**os.environ, models.EXTRA_MODELS_VARIABLE: "tests.extra_model:MODEL"}
    listing = run_pytest("--collect-only", env=env)
    collected = [line for line in listing.stdout.splitlines() if f"[{MODEL.name}" in line]
    assert len(collected) >= 30, listing.stdout[-2000:]  # every model-parametrized case
    result = run_pytest(env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Skipped only where a tool is missing outside CI (promtool); CI fails instead of skipping.
    counts = {
        word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed)", result.stdout)
    }
    assert counts.get("passed", 0) + counts.get("skipped", 0) == len(collected), counts

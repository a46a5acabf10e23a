"""Every lesson's check can fail for the right reason: a quick lesson against a broken model.

Each case runs `python -m loadtest.lessons --quick` for one lesson with one model replaced by a
deliberately broken server of tests/sabotage.py (under the model's own name, through
ARENA_EXTRA_MODELS), and asserts the verdict is `fails` — not `inconclusive` — with the broken
model's figures named in the reason. The same command without the sabotage holds on this
machine (docs/LESSONS.md, "Sabotage"): a check that passed the broken server would be one that
cannot fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from loadtest.lessons.verdict import FAILS, INCONCLUSIVE
from loadtest.tools import postgres
from services import models
from tests.conftest import ROOT, run_module


@dataclass(frozen=True)
class Sabotage:
    """One broken model, the lesson that must catch it, and what the reason must name."""

    lesson: str
    models: str  # --models: the broken one and those its check compares it with
    sabotage: str  # tests.sabotage's attribute
    named: str  # the reason names this (the broken model's failed figure)
    database: bool = False


CASES = (
    Sabotage("io-wait", "threaded,pool", "LOCKED_THREADS", "threaded"),
    Sabotage("io-wait", "pool,gevent", "SLEEPING_HUB", "gevent"),
    Sabotage("cpu-work", "threaded", "WORK_IN_PROCESSES", "threaded used"),
    Sabotage("gil-tax", "threaded,asyncio", "LOCKED_THREADS", "threaded"),
    Sabotage("processes-x-coroutines", "threaded,asyncio", "ONE_CPU_PROCESSES", "asyncio x 2"),
    Sabotage("pool-bound", "pool", "UNSIZED_POOL", "workers"),
    Sabotage("cores", "threaded,pool", "THREADS_FOR_PROCESSES", "the pool of 2 processes on"),
    Sabotage("processes-x-coroutines", "threaded,gevent", "SLEEPING_HUB", "gevent x 2: "),
    Sabotage("many-clients", "threaded", "CAPPED_THREADS", "threaded answered"),
    Sabotage("blocked-loop", "threaded,gevent", "YIELDING_WORK", "gevent"),
    Sabotage("closed-loop", "threaded", "UNSTOPPABLE", "open-loop p99"),
    Sabotage("db-wait", "threaded,pool", "ONE_DB_CONNECTION", "threaded", database=True),
    Sabotage(
        "db-pool-bound", "threaded", "UNSIZED_DB_POOL", "2x the database pool gave", database=True
    ),
    Sabotage("undetected-io", "gevent", "COOPERATIVE_BLOCKING", "gevent", database=True),
)


# A lesson is inconclusive while a neighbour holds the CPU the check needs (too few free cores
# measured before the run, or noise that could account for the miss): measured again, a bounded
# number of times, before the test gives up. The verdict it asserts is a decided one.
ATTEMPTS = 3


def _require_postgres() -> None:
    try:
        postgres.find_bindir()
    except postgres.PostgresUnavailable as error:
        if os.environ.get("CI") or os.environ.get("ARENA_REQUIRE_POSTGRES", "0") != "0":
            pytest.fail(f"PostgreSQL is required here (CI or ARENA_REQUIRE_POSTGRES): {error}")
        pytest.skip(str(error))


def test_an_extra_model_with_a_registered_name_takes_its_place():
    """What the sabotage relies on: the broken server runs under the model's own name."""
    code = (
        "from services import models; "
        "print(models.NAMES); print(models.get('threaded').server, models.get('pool').server)"
    )
    env = {**os.environ, models.EXTRA_MODELS_VARIABLE: "tests.sabotage:LOCKED_THREADS"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    names, servers = result.stdout.splitlines()
    assert names == repr(models.NAMES)  # same models, same order
    assert servers.split() == [
        "tests.sabotage_servers:LockedThreadsServer",
        models.get("pool").server,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{c.lesson}-{c.sabotage.lower()}" for c in CASES])
def test_a_sabotaged_model_fails_its_lesson(case, tmp_path):
    if case.database:
        _require_postgres()
    env = {**os.environ, models.EXTRA_MODELS_VARIABLE: f"tests.sabotage:{case.sabotage}"}
    for _ in range(ATTEMPTS):
        result = run_module(
            "loadtest.lessons",
            *("--quick", "--lessons", case.lesson, "--models", case.models),
            *("--out", str(tmp_path)),
            env=env,
            timeout=300,
        )
        assert result.returncode in (0, 1), result.stderr
        [entry] = json.loads((tmp_path / "lessons.json").read_text())["lessons"]
        if entry["verdict"] != INCONCLUSIVE:
            break  # decided on a machine that could show it (else: a neighbour's busy minute)
    assert entry["verdict"] == FAILS, entry["reason"]
    assert result.returncode == 1
    assert case.named in entry["reason"], entry["reason"]

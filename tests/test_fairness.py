"""Every busy connection is served: 1000 closed-loop clients without think time, every model.

Issue 9: the threaded server answered only about 350 of 1000 busy connections in 6 s (its
accept thread starved for the GIL), and the oldest request waited the whole run. The bounds
below are the issue's own: every connection answered within the measured window, and no
request waiting 1 s or more. The load comes from the benchmark's C load generator
(`loadtest/bench/loadgen.c`), which starts every connection's first request at one fixed
moment and reports, per connection, the replies in the window and the longest wait -- a request
never answered counts with its age at the end. As in the benchmark, the server runs on one CPU
and the load generator on another, when there are two.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from loadtest.bench import harness, loadgen
from loadtest.bench.scenarios import Scenario, echo
from loadtest.tools import procs
from services import models
from tests.conftest import MODELS
from tests.reliability_helpers import ensure_descriptors

CONNECTIONS = 1000
WARMUP = 1.0  # seconds of load before the window, as in the measurement
WINDOW = 5.0  # the measured seconds
LONGEST_WAIT_BOUND = 1.0  # seconds: no request may wait this long (issue 9)
# Runs measured again when other processes took more than harness.NOISY_OTHER_FRACTION of the
# server's CPU: on a shared machine a neighbour, not the server, can make a request wait.
NOISY_RETRIES = 2


@pytest.fixture(scope="module")
def loadgen_binary():
    """The compiled load generator; skipped without a C compiler (except in CI)."""
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        if os.environ.get("CI"):
            pytest.fail("a C compiler is required in CI for the load generator")
        pytest.skip("no C compiler for loadtest/bench/loadgen.c")
    return loadgen.build()


@pytest.fixture(scope="module")
def measured(loadgen_binary) -> Iterator:
    """Measure each model once (the quietest of up to three runs); both tests read the result."""
    results: dict[str, dict] = {}
    servers: list[harness.ServerProcess] = []
    pinning = harness.Pinning.choose(True)

    def measure(model: str) -> dict:
        if model in results:
            return results[model]
        ensure_descriptors(CONNECTIONS)  # before the server starts: it inherits the limit
        registered, variant_flags = models.target(model)
        command = procs.server_command(registered.name, *variant_flags, *registered.small_flags)
        server = harness.ServerProcess(model, command, pinning.server)
        servers.append(server)
        scenario = Scenario("fairness", "echo 64 B, 1000 busy conns", CONNECTIONS, (echo(64),))
        attempts = []
        try:
            for _ in range(1 + NOISY_RETRIES):
                attempts.append(
                    harness.measure_once(server, scenario, loadgen_binary, WINDOW, WARMUP, pinning)
                )
                print(
                    f"\n[fairness] {model}: {harness.starved_text(attempts[-1])}; "
                    f"{attempts[-1]['rps']:,.0f} requests/s; other work took "
                    f"{attempts[-1]['other_cpu_fraction']:.0%} of the server's CPU"
                )
                if attempts[-1]["other_cpu_fraction"] <= harness.NOISY_OTHER_FRACTION:
                    break
        finally:
            server.stop()
        results[model] = min(attempts, key=lambda attempt: attempt["other_cpu_fraction"])
        return results[model]

    yield measure
    for server in servers:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_busy_connection_is_answered_in_the_window(measured, model, record_property):
    record = measured(model)
    for name in ("answered_connections", "longest_wait_s", "other_cpu_fraction"):
        record_property(f"{model}.{name}", record[name])
    # A starved connection waits the whole run, far beyond any noise: asserted always.
    assert record["answered_connections"] == CONNECTIONS, harness.starved_text(record)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_no_request_waits_a_second(measured, model):
    record = measured(model)
    if record["other_cpu_fraction"] > harness.NOISY_OTHER_FRACTION:
        pytest.skip(
            f"{record['other_cpu_fraction']:.0%} of the server's CPU went to other "
            "work in every attempt: too noisy to judge a 1 s wait "
            f"({harness.starved_text(record)})"
        )
    assert record["longest_wait_s"] < LONGEST_WAIT_BOUND, harness.starved_text(record)

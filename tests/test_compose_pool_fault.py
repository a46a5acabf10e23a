"""A pool worker killed inside its container under Locust load: no client sees a failure.

The OOM killer under `mem_limit` kills one process of a container, not the container. Before
the fix the pool server survived such a death without serving again, and Docker does not restart
an unhealthy container. Here a worker process is SIGKILLed from inside the running pool
container while Locust's 100 users load it; Locust's failure count for the pool must stay where
it was (the executor is replaced and the requests in flight run again), or the container must
have been restarted.

Without a Docker engine the module is skipped, unless ARENA_REQUIRE_DOCKER=1 (CI), where it
fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.compose_helpers import (
    SERVER_SERVICES,
    ComposeProject,
    engine_problem,
    http_text,
    metric_samples,
    ping,
    poll,
    require,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

# Locust needs every server healthy (depends_on); Prometheus and Grafana play no part.
SERVICES = (*SERVER_SERVICES, "locust", "locust-worker")
UP_TIMEOUT = 420.0  # image builds included; cached builds take seconds
TRAFFIC_TIMEOUT = 120.0
USERS = 100  # loadtest/plugin/locust.conf's users per target
HEAL_TIMEOUT = 30.0
# Locust workers report every 3 s: two reads this far apart that agree mean the count settled.
QUIET_INTERVAL = 7.0
# Run inside the pool container: SIGKILL one worker (a child of the forkserver, itself a child
# of the server) and print its pid. The image has no ps, so /proc is read directly.
KILL_A_WORKER = r"""
import os, signal
def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""
def parent(pid): return int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[1])
forked = [int(p) for p in os.listdir("/proc") if p.isdigit() and b"forkserver" in cmdline(p)]
helpers = {p for p in forked if b"forkserver" not in cmdline(parent(p))}
workers = sorted(p for p in forked if parent(p) in helpers)
os.kill(workers[0], signal.SIGKILL)
print(workers[0])
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeProject]:
    """The servers and Locust (100 users on the pool only), always taken down after."""
    require(engine_problem(), "Docker engine")
    project = ComposeProject()
    try:
        project.up(list(SERVICES), UP_TIMEOUT, env={**project.env, "LOCUST_TARGETS": "pool"})
        yield project
    finally:
        project.down()


def locust_pool(stack: ComposeProject) -> tuple[float, float, float]:
    """Locust's (users, requests, failures) on the pool target so far."""
    text = http_text(stack.url("locust", "/metrics"))

    def total(name: str) -> float:
        return sum(
            value
            for labels, value in metric_samples(text, name).items()
            if dict(labels).get("target") == "pool"
        )

    return total("locust_users"), total("locust_requests_total"), total("locust_failures_total")


def test_a_killed_pool_worker_costs_locust_no_failure(stack: ComposeProject) -> None:
    """SIGKILL one worker inside the pool container under load: failures stay 0 (or the
    container was restarted), the executor is replaced once, the pool answers on its port."""
    state = poll(
        lambda: (s := locust_pool(stack))[0] == USERS and s[1] > 0 and s,
        TRAFFIC_TIMEOUT,
        interval=1.0,
    )
    assert isinstance(state, tuple), f"no load on the pool: {state!r}\n{stack.diagnostics()}"
    _, requests_before, failures_before = state
    restarts_before = stack.container_state("pool")["RestartCount"]

    victim = int(
        stack.compose(
            "exec", "-T", "pool", "python", "-c", KILL_A_WORKER, timeout=30
        ).stdout.split()[-1]
    )

    def healed() -> float | None:
        if stack.container_state("pool")["RestartCount"] > restarts_before:
            return -1.0  # Docker restarted the container: also acceptable
        samples = metric_samples(stack.server_metrics("pool"), "arena_pool_worker_restarts_total")
        return sum(samples.values()) or None

    restarts = poll(healed, HEAL_TIMEOUT, interval=1.0)
    assert isinstance(restarts, float), f"pool never healed: {restarts!r}\n{stack.diagnostics()}"

    readings = [locust_pool(stack)]

    def settled() -> bool:
        time.sleep(QUIET_INTERVAL)
        readings.append(locust_pool(stack))
        return readings[-1][2] == readings[-2][2] and readings[-1][1] > readings[-2][1]

    assert poll(settled, 4 * QUIET_INTERVAL, interval=0.0), readings
    _, requests_after, failures_after = readings[-1]
    container_restarted = stack.container_state("pool")["RestartCount"] > restarts_before
    logs = stack.compose("logs", "--no-color", "pool").stdout
    print(
        f"pool: worker {victim} killed; executor restarts {restarts:g}; container restarted "
        f"{container_restarted}; Locust requests {requests_before:g} -> {requests_after:g}, "
        f"failures {failures_before:g} -> {failures_after:g}"
    )
    assert failures_after == failures_before or container_restarted, (
        f"{failures_after - failures_before:g} failed requests\n{stack.diagnostics()}"
    )
    if not container_restarted:
        assert restarts == 1
        assert f"worker process {victim} died: killed by SIGKILL" in logs, logs[-3000:]
    assert ping(stack.ports["pool"]) == b"PONG\n"

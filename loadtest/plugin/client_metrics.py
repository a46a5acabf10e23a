"""The Locust master's ``/metrics`` page: client-side statistics as Prometheus text."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from loadtest.plugin.client import CONNECT
from loadtest.plugin.client_stats import BUCKETS_SECONDS, ClientStats, Series, Timing
from loadtest.plugin.workload import COMMANDS

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _buckets(timing: Timing) -> list[tuple[str, float]]:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*BUCKETS_SECONDS, math.inf), timing.buckets, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
    return buckets


def _per_target(kind: Any, name: str, documentation: str, values: Mapping[str, float]) -> Any:
    """A metric family labelled by target alone: one sample per target, in the given order."""
    family = kind(name, documentation, labels=["target"])
    for target, value in values.items():
        family.add_metric([target], value)
    return family


def _per_command_families(stats: ClientStats, keys: Iterable[tuple[str, str]]) -> tuple[Any, ...]:
    """Requests, failures, both latency histograms and late starts per (target, command)."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    requests = CounterMetricFamily(
        "locust_requests", "Requests sent, failures included", labels=["target", "command"]
    )
    failures = CounterMetricFamily(
        "locust_failures",
        "Requests that failed (error, timeout or wrong reply)",
        labels=["target", "command"],
    )
    durations = HistogramMetricFamily(
        "locust_request_duration_seconds",
        "Client-side time from a request's intended start (arrival-rate mode: when it "
        "was due; else when it was sent) to reading its whole reply (successes only)",
        labels=["target", "command"],
    )
    service = HistogramMetricFamily(
        "locust_service_time_seconds",
        "Client-side time from sending a request to reading its whole reply "
        "(successful requests only)",
        labels=["target", "command"],
    )
    late = CounterMetricFamily(
        "locust_late_starts",
        "Arrival-rate starts that found no free connection when they were due",
        labels=["target", "command"],
    )
    empty = Series()
    for target, command in keys:
        series = stats.series.get((target, command), empty)
        requests.add_metric([target, command], series.requests)
        failures.add_metric([target, command], series.failures)
        durations.add_metric([target, command], _buckets(series.latency), series.latency.total)
        service.add_metric([target, command], _buckets(series.service), series.service.total)
        late.add_metric([target, command], series.late)
    return requests, failures, durations, service, late


def render_metrics(
    stats: ClientStats,
    users_by_target: Mapping[str, int],
    targets: Iterable[str],
    offered_rate: Mapping[str, float] | None = None,
) -> bytes:
    """Prometheus text; every selected target has all its series (zeros included).

    `offered_rate` is the arrival rate per target (requests per second, 0 in the closed loop).
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    shown_targets = list(dict.fromkeys([*targets, *(t for t, _ in stats.series)]))
    keys = list(
        dict.fromkeys(
            [(t, c) for t in shown_targets for c in (*COMMANDS, CONNECT)] + list(stats.series)
        )
    )
    offered = offered_rate or {}

    class Snapshot:
        def collect(self) -> Iterable[Any]:
            """The metric families, read from the stats now."""
            yield _per_target(
                GaugeMetricFamily,
                "locust_users",
                "Users running now, per target (summed over workers)",
                {target: users_by_target.get(target, 0) for target in shown_targets},
            )
            yield from _per_command_families(stats, keys)
            yield _per_target(
                CounterMetricFamily,
                "locust_connect_errors",
                "Failed connection attempts",
                {target: stats.connect_errors(target) for target in shown_targets},
            )
            yield _per_target(
                GaugeMetricFamily,
                "locust_arrival_rate",
                "Offered load: requests per second per target on the timetable (0: closed loop)",
                {target: offered.get(target, 0.0) for target in shown_targets},
            )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)

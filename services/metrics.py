"""Prometheus metrics, built on a registry passed in and computed at scrape time.

Connections keep plain per-connection counters (`session.Tally`); this collector sums them when
Prometheus scrapes, so the hot path takes no lock and touches no metric object. Names and
meanings: docs/METRICS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from services import protocol
from services.session import DURATION_BUCKETS, Histogram, ServerStats

ExtraMetrics = Callable[[], Iterable[Metric]]


def histogram_family(
    name: str, documentation: str, labelled: Iterable[tuple[list[str], Histogram]],
    labels: Iterable[str] = (),
) -> HistogramMetricFamily:
    """A Prometheus histogram family from our bucket counters."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    bounds = [*(repr(bound) for bound in DURATION_BUCKETS), "+Inf"]
    for label_values, histogram in labelled:
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, histogram.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(label_values, buckets, histogram.total)
    return family


class ArenaCollector(Collector):
    """The metrics every model shares, plus the model's own from `extra`."""

    def __init__(self, stats: ServerStats, info: dict[str, str], extra: ExtraMetrics) -> None:
        self.stats = stats
        self.info = info
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        """Sum every connection's tally into metric families."""
        stats = self.stats
        tally = stats.snapshot()
        info = InfoMetricFamily("arena_server", "Which concurrency model this server runs")
        info.add_metric([], self.info)
        yield info
        yield GaugeMetricFamily(
            "arena_connections_active", "Connections held now (accepted, not yet closed)",
            value=len(stats.sessions),
        )
        yield CounterMetricFamily(
            "arena_connections", "Connections accepted and served", value=stats.connections_total
        )
        rejected = CounterMetricFamily(
            "arena_connections_rejected", "Connections refused with ERR server-busy",
            labels=["reason"],
        )
        rejected.add_metric(["busy"], stats.rejected)
        yield rejected
        closed = CounterMetricFamily(
            "arena_connections_closed", "Why served connections ended", labels=["reason"]
        )
        for reason, count in stats.close_reasons.items():
            closed.add_metric([reason], count)
        yield closed
        requests = CounterMetricFamily(
            "arena_requests", "Requests answered", labels=["command", "outcome"]
        )
        for index, command in enumerate(protocol.COMMANDS):
            requests.add_metric([command, "ok"], tally.requests[2 * index])
            requests.add_metric([command, "error"], tally.requests[2 * index + 1])
        yield requests
        yield histogram_family(
            "arena_request_duration_seconds",
            "From the complete request line being read to its reply being ready",
            (([command], tally.durations[i]) for i, command in enumerate(protocol.COMMANDS)),
            labels=["command"],
        )
        yield CounterMetricFamily(
            "arena_received_bytes", "Request bytes read", value=tally.received
        )
        yield CounterMetricFamily("arena_sent_bytes", "Reply bytes written", value=tally.sent)
        errors = CounterMetricFamily(
            "arena_protocol_errors", "Error replies by code", labels=["code"]
        )
        for code in protocol.ERROR_CODES:
            errors.add_metric([code], tally.errors.get(code, 0))
        yield errors
        accept_errors = CounterMetricFamily(
            "arena_accept_errors", "Failed accept() calls by errno", labels=["errno"]
        )
        for name, count in sorted(stats.accept_errors.items()):
            accept_errors.add_metric([name], count)
        yield accept_errors
        internal = CounterMetricFamily(
            "arena_internal_errors",
            "Unexpected exceptions by where they were caught (a bug, contained or fatal)",
            labels=["where"],
        )
        for where, count in sorted(stats.internal_errors.items()):
            internal.add_metric([where], count)
        yield internal
        yield from self.extra()


def build_registry(stats: ServerStats, info: dict[str, str], extra: ExtraMetrics) -> (
    CollectorRegistry
):
    """A fresh registry with the arena metrics and the client library's process collectors."""
    registry = CollectorRegistry()
    registry.register(ArenaCollector(stats, info, extra))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve /metrics in a daemon thread; returns the real port (port 0 binds a free one)."""
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    return int(httpd.server_address[1])

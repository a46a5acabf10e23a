"""ArenaCollector on a fresh registry, fed by real sessions and tallies (no server, no HTTP)."""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from services import protocol
from services.adapters import Adapters
from services.metrics import ArenaCollector
from services.session import ServerStats, Session


def registry_for(stats: ServerStats, adapters: Adapters | None = None) -> CollectorRegistry:
    """A fresh registry holding only the arena collector (with one extra metric of a model)."""
    registry = CollectorRegistry()
    extra = [GaugeMetricFamily("arena_test_extra", "A model's own metric", value=7)]
    registry.register(ArenaCollector(stats, {"model": "test"}, lambda: extra, adapters))
    return registry


def open_pair(stats: ServerStats) -> tuple[Session, socket.socket]:
    """A registered session over a socketpair, and the peer's end."""
    ours, theirs = socket.socketpair()
    session = stats.open_session(ours, 64)
    assert session is not None
    return session, theirs


def test_requests_bytes_errors_and_connections_are_exported_exactly():
    stats = ServerStats(max_connections=2)
    registry = registry_for(stats)
    live, peer = open_pair(stats)
    closing, closing_peer = open_pair(stats)
    for line in (b"hello", b"/ping", b"/nope"):
        live.tally.record(protocol.answer(line), 0.0003)
    live.tally.received, live.tally.sent = 20, 30
    closing.tally.record(protocol.answer(b"/quit"), 0.00001)
    closing.tally.count_error("line-too-long")
    stats.close_session(closing, "quit")

    value = registry.get_sample_value
    assert value("arena_server_info", {"model": "test"}) == 1
    assert value("arena_requests_total", {"command": "echo", "outcome": "ok"}) == 1
    assert value("arena_requests_total", {"command": "ping", "outcome": "ok"}) == 1
    assert value("arena_requests_total", {"command": "unknown", "outcome": "error"}) == 1
    assert value("arena_requests_total", {"command": "quit", "outcome": "ok"}) == 1
    assert value("arena_protocol_errors_total", {"code": "unknown-command"}) == 1
    assert value("arena_protocol_errors_total", {"code": "line-too-long"}) == 1
    assert value("arena_received_bytes_total") == 20
    assert value("arena_sent_bytes_total") == 30
    assert value("arena_connections_closed_total", {"reason": "quit"}) == 1
    assert value("arena_request_duration_seconds_count", {"command": "echo"}) == 1
    assert value("arena_request_duration_seconds_bucket", {"command": "echo", "le": "0.00025"}) == 0
    assert value("arena_request_duration_seconds_bucket", {"command": "echo", "le": "0.0005"}) == 1
    assert value("arena_test_extra") == 7
    for sock in (peer, closing_peer):
        sock.close()


def test_a_busy_rejection_counts_as_rejected_and_as_a_server_busy_error():
    stats = ServerStats(max_connections=1)
    registry = registry_for(stats)
    _session, peer = open_pair(stats)
    extra, extra_peer = socket.socketpair()
    assert stats.open_session(extra, 64) is None
    value = registry.get_sample_value
    assert value("arena_connections_active") == 1
    assert value("arena_connections_total") == 1
    assert value("arena_connections_rejected_total", {"reason": "busy"}) == 1
    assert value("arena_protocol_errors_total", {"code": "server-busy"}) == 1
    for sock in (peer, extra, extra_peer):
        sock.close()


def test_scrapes_fold_live_tallies_by_delta_without_counting_twice():
    stats = ServerStats(max_connections=10)
    registry = registry_for(stats)
    session, peer = open_pair(stats)
    echo = {"command": "echo", "outcome": "ok"}
    session.tally.record(protocol.answer(b"a"), 0.001)
    assert registry.get_sample_value("arena_requests_total", echo) == 1
    assert registry.get_sample_value("arena_requests_total", echo) == 1  # nothing new
    session.tally.record(protocol.answer(b"b"), 0.001)
    assert registry.get_sample_value("arena_requests_total", echo) == 2
    stats.close_session(session, "client")
    assert registry.get_sample_value("arena_requests_total", echo) == 2  # the rest, folded once
    assert registry.get_sample_value("arena_connections_active") == 0
    peer.close()


def test_adapter_fallbacks_are_a_gauge_per_checked_adapter():
    adapters = Adapters()
    registry = registry_for(ServerStats(max_connections=1), adapters)
    assert registry.get_sample_value("arena_adapter_fallback", {"adapter": "gevent-io"}) is None
    adapters.works("gevent-io")
    adapters.fell_back("executor-processes", "missing in this Python")
    assert registry.get_sample_value("arena_adapter_fallback", {"adapter": "gevent-io"}) == 0
    value = registry.get_sample_value("arena_adapter_fallback", {"adapter": "executor-processes"})
    assert value == 1

"""Prometheus metrics, built on a registry passed in and computed at scrape time.

Connections keep plain per-connection counters (`session.Tally`); a scrape folds the ones that
changed into running totals (`ServerStats.snapshot`), so the hot path takes no lock and touches
no metric object, and an idle connection costs almost nothing per scrape. Names and meanings:
docs/METRICS.md.

`/metrics` is served by `MetricsServer`, a small HTTP/1.1 server on an OS thread with OS
sockets, for every model. Under gevent this is what matters: `prometheus_client`'s server would
run on a green thread and wait for the very loop a `/work` request blocks, so the scrape that
should show the blocked loop would not come back. An OS thread gets the GIL every switch
interval (5 ms) even while the loop computes, and reads the tallies the loop writes (under the
stats lock, itself an OS lock: `session.os_lock`). It serves every model, not only gevent,
because one small server is simpler than two, costs the same (the scrape's cost is the
collector, not the HTTP), and gives every model the same limits: a real listen backlog, a read
timeout, a request-size limit, one scrape at a time. The gevent-specific part is only
`os_primitives`, which asks gevent for the original socket and thread functions and falls back,
with a warning, to `prometheus_client.start_http_server` if they are missing.
"""

from __future__ import annotations

import _thread
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector

from services import protocol
from services.adapters import Adapters
from services.buckets import DURATION_BUCKETS
from services.session import Histogram, ServerStats

ExtraMetrics = Callable[[], Iterable[Metric]]

BACKLOG = 64  # scrapers that may wait while one scrape is answered (socketserver's is 5)
READ_TIMEOUT = 2.0  # seconds a client may take to send its request head
MAX_REQUEST = 8192  # bytes of request head (request line and headers) accepted
log = logging.getLogger("arena.metrics")


def histogram_family(
    name: str,
    documentation: str,
    labelled: Iterable[tuple[list[str], Histogram]],
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


def counter_by(
    name: str, documentation: str, label: str, counts: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    """A counter family with one label: a sample per (label value, count)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family


class ArenaCollector(Collector):
    """The metrics every model shares, plus the model's own from `extra`."""

    def __init__(
        self,
        stats: ServerStats,
        info: dict[str, str],
        extra: ExtraMetrics,
        adapters: Adapters | None = None,
    ) -> None:
        self.stats = stats
        self.info = info
        self.extra = extra
        self.adapters = adapters or Adapters()

    def collect(self) -> Iterator[Metric]:
        """Sum every connection's tally into metric families."""
        stats = self.stats
        tally = stats.snapshot()
        info = InfoMetricFamily("arena_server", "Which concurrency model this server runs")
        info.add_metric([], self.info)
        yield info
        yield GaugeMetricFamily(
            "arena_connections_active",
            "Connections held now (accepted, not yet closed)",
            value=len(stats.sessions),
        )
        yield CounterMetricFamily(
            "arena_connections", "Connections accepted and served", value=stats.connections_total
        )
        yield counter_by(
            "arena_connections_rejected",
            "Connections refused with ERR server-busy",
            "reason",
            [("busy", stats.rejected)],
        )
        yield counter_by(
            "arena_connections_closed",
            "Why served connections ended",
            "reason",
            stats.close_reasons.items(),
        )
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
        yield counter_by(
            "arena_protocol_errors",
            "Error replies by code",
            "code",
            ((code, tally.errors.get(code, 0)) for code in protocol.ERROR_CODES),
        )
        yield counter_by(
            "arena_accept_errors",
            "Failed accept() calls by errno",
            "errno",
            sorted(stats.accept_errors.items()),
        )
        yield counter_by(
            "arena_internal_errors",
            "Unexpected exceptions by where they were caught (a bug, contained or fatal)",
            "where",
            sorted(stats.internal_errors.items()),
        )
        fallbacks = GaugeMetricFamily(
            "arena_adapter_fallback",
            "1 when an adapter of another library's private API fell back at start-up",
            labels=["adapter"],
        )
        for adapter, fell_back in self.adapters.snapshot().items():
            fallbacks.add_metric([adapter], 1.0 if fell_back else 0.0)
        yield fallbacks
        yield from self.extra()


def boot_time() -> float:
    """The system's boot time in seconds since the epoch (/proc/stat `btime`; 0 off Linux)."""
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


class ProcessMetrics(Collector):
    """The client library's process metrics (same names), read from /proc with public sources.

    prometheus_client's `ProcessCollector` lists /proc/self/fd to count descriptors: about 15 ms
    at 10,000 connections here, more than the rest of a scrape. Linux (6.2 and later) reports the
    count as the directory's size; the listing remains the fallback where that size is 0. Boot
    time, page size and clock ticks come from /proc/stat, `resource` and `os.sysconf`, not from
    the client library's private attributes, so a change inside it cannot break a scrape.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._btime = boot_time()
        self._pagesize = resource.getpagesize()
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[Metric]:
        """process_* metrics as the client library names them."""
        if not self._btime:
            return []
        result: list[Metric] = []
        try:
            with open("/proc/self/stat", "rb") as stat:
                parts = stat.read().rsplit(b")", 1)[1].split()
            result += [
                GaugeMetricFamily(
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes.",
                    value=float(parts[20]),
                ),
                GaugeMetricFamily(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    value=float(parts[21]) * self._pagesize,
                ),
                GaugeMetricFamily(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    value=float(parts[19]) / self._ticks + self._btime,
                ),
                CounterMetricFamily(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds.",
                    value=(float(parts[11]) + float(parts[12])) / self._ticks,
                ),
            ]
            with open("/proc/self/limits", "rb") as limits:
                max_fds = next(
                    float(line.split()[3]) for line in limits if line.startswith(b"Max open file")
                )
            open_fds = os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))
            result += [
                GaugeMetricFamily(
                    "process_open_fds", "Number of open file descriptors.", value=float(open_fds)
                ),
                GaugeMetricFamily(
                    "process_max_fds", "Maximum number of open file descriptors.", value=max_fds
                ),
            ]
        except (OSError, StopIteration, IndexError, ValueError):
            pass  # not Linux, or /proc unreadable: what was read is still exposed
        return result


def build_registry(
    stats: ServerStats,
    info: dict[str, str],
    extra: ExtraMetrics,
    adapters: Adapters | None = None,
) -> CollectorRegistry:
    """A fresh registry with the arena metrics and the client library's process collectors."""
    registry = CollectorRegistry()
    registry.register(ArenaCollector(stats, info, extra, adapters))
    ProcessMetrics(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class OsPrimitives(NamedTuple):
    """The OS's own socket class, thread starter and sleep, whatever gevent patched."""

    socket: type[socket.socket]
    start_thread: Callable[[Callable[..., object], tuple[Any, ...]], int]
    sleep: Callable[[float], None]


def os_primitives() -> OsPrimitives | None:
    """The unpatched socket and thread functions; None if gevent patched and cannot give them.

    Checked at start-up: a native thread with *patched* sockets would wait on gevent's hub, the
    very thing it must not do (docs/METRICS.md).
    """
    monkey = sys.modules.get("gevent.monkey")  # imported only if the gevent model patched
    if monkey is None:
        return OsPrimitives(socket.socket, _thread.start_new_thread, time.sleep)
    try:
        if not monkey.is_module_patched("socket"):
            log.warning("gevent is loaded but did not patch socket: serving /metrics as usual")
        # get_original returns the module's current object when it was not patched.
        return OsPrimitives(
            monkey.get_original("socket", "socket"),
            monkey.get_original("_thread", "start_new_thread"),
            monkey.get_original("time", "sleep"),
        )
    except (AttributeError, ImportError, KeyError):
        return None


def _reply(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class MetricsServer:
    """GET /metrics over HTTP/1.1 from one OS thread, one connection at a time, then close."""

    def __init__(self, registry: CollectorRegistry, primitives: OsPrimitives) -> None:
        self.registry = registry
        self.primitives = primitives
        self.listener: socket.socket | None = None

    def start(self, host: str, port: int) -> int:
        """Bind and serve in a daemon OS thread; returns the real port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = self.primitives.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(BACKLOG)
        except OSError:
            listener.close()
            raise
        self.listener = listener
        self.primitives.start_thread(self.serve_forever, ())
        return int(listener.getsockname()[1])

    def serve_forever(self) -> None:
        """Answer scrapes until the process ends; no error stops the loop."""
        listener = self.listener
        assert listener is not None
        new_socket = self.primitives.socket
        while True:
            try:
                # Not accept(): it wraps the descriptor in the socket module's *current* class,
                # which under gevent is the green one.
                fd, _address = listener._accept()  # type: ignore[attr-defined]
            except OSError:
                self.primitives.sleep(0.1)  # out of descriptors, most likely: do not spin
                continue
            connection = new_socket(listener.family, socket.SOCK_STREAM, fileno=fd)
            try:
                connection.settimeout(READ_TIMEOUT)
                connection.sendall(self.answer(self.read_head(connection)))
            except OSError:
                pass  # the client went away or was too slow: nothing to answer
            finally:
                connection.close()

    @staticmethod
    def read_head(connection: socket.socket) -> bytes | None:
        """The request head, or None if it is larger than MAX_REQUEST or ends early."""
        deadline = time.monotonic() + READ_TIMEOUT
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            if len(head) > MAX_REQUEST:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request head too slow")
            connection.settimeout(remaining)
            data = connection.recv(4096)
            if not data:
                return None
            head += data
        return head

    def answer(self, head: bytes | None) -> bytes:
        """The whole HTTP response to one request head."""
        if head is None:
            return _reply("400 Bad Request", b"bad or oversized request\n")
        parts = head.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _reply("400 Bad Request", b"bad request line\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return _reply("404 Not Found", b"only /metrics is served here\n")
        if method not in (b"GET", b"HEAD"):
            return _reply("405 Method Not Allowed", b"use GET\n")
        try:
            body = generate_latest(self.registry)
        except Exception as error:  # a collector bug: say so, keep serving
            return _reply("500 Internal Server Error", f"collect failed: {error!r}\n".encode())
        response = _reply("200 OK", body, CONTENT_TYPE_LATEST)
        if method == b"HEAD":
            return response[: len(response) - len(body)]
        return response


OS_PRIMITIVES_ADAPTER = "gevent-os-primitives"


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, adapters: Adapters | None = None
) -> int:
    """Serve /metrics from an OS thread; returns the real port (port 0 binds a free one)."""
    adapters = adapters or Adapters()
    primitives = os_primitives()
    if primitives is None:
        adapters.fell_back(
            OS_PRIMITIVES_ADAPTER,
            "gevent offers no original socket or thread: /metrics falls back to "
            "prometheus_client's server on a green thread, which waits while the loop is blocked",
            log,
        )
        httpd, _thread_handle = start_http_server(port, addr=host, registry=registry)
        return int(httpd.server_address[1])
    if "gevent.monkey" in sys.modules:
        adapters.works(OS_PRIMITIVES_ADAPTER)
    return MetricsServer(registry, primitives).start(host, port)

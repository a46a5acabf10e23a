"""Scraped metrics match the traffic sent, on every model, and pass `promtool check metrics`."""

from __future__ import annotations

import pytest

from services import models
from tests.conftest import EVENT_LOOPS, MODELS, RunningServer, small_flags
from tests.server_helpers import LineClient, Metrics, promtool_check, scrape, wait_for_metrics

COMMON_METRICS = (
    "arena_server_info",
    "arena_connections_active",
    "arena_connections_total",
    "arena_connections_rejected_total",
    "arena_connections_closed_total",
    "arena_requests_total",
    "arena_request_duration_seconds_bucket",
    "arena_request_duration_seconds_count",
    "arena_request_duration_seconds_sum",
    "arena_received_bytes_total",
    "arena_sent_bytes_total",
    "arena_protocol_errors_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
)


def sample_name(family: str, kind: str) -> str:
    """The sample every family of this type exposes: a counter's total, a histogram's count."""
    return family + {"counter": "_total", "histogram": "_count"}.get(kind, "")


def all_closed(metrics: Metrics) -> bool:
    """The server holds no connection any more."""
    return metrics.value("arena_connections_active") == 0


def send_known_traffic(server: RunningServer) -> tuple[int, int]:
    """The mix 30 echo, 5 ping, 4 sleep, 3 work, 2 unknown, 1 bad argument, 1 quit.

    Spread over three connections (two closed by the client, one by /quit), partly pipelined.
    Returns (request bytes sent, reply bytes received).
    """
    sent = received = 0
    with LineClient(server.address) as mixed:
        for number in range(20):
            assert mixed.request(b"echo %d" % number) == b"ECHO %d\n" % number
        for _ in range(5):
            assert mixed.request(b"/ping") == b"PONG\n"
        mixed.send(b"/sleep 1 a\n/sleep 1 b\n/sleep 1 c\n/sleep 1 d\n")
        assert mixed.read_lines(4) == [b"A\n", b"B\n", b"C\n", b"D\n"]
        for number in range(3):
            assert mixed.request(b"/work 10 w%d" % number) == b"W%d\n" % number
        assert mixed.request(b"/nope").startswith(b"ERR unknown-command ")
        assert mixed.request(b"/PING").startswith(b"ERR unknown-command ")
        assert mixed.request(b"/sleep abc").startswith(b"ERR bad-argument ")
        sent, received = sent + mixed.sent_bytes, received + mixed.received_bytes
    with LineClient(server.address) as pipelined:
        pipelined.send(b"".join(b"piped %d\n" % number for number in range(10)))
        assert pipelined.read_lines(10) == [b"PIPED %d\n" % number for number in range(10)]
        sent, received = sent + pipelined.sent_bytes, received + pipelined.received_bytes
    with LineClient(server.address) as quitter:
        assert quitter.request(b"/quit") == b"BYE\n"
        assert quitter.read_until_closed() == b""
        sent, received = sent + quitter.sent_bytes, received + quitter.received_bytes
    return sent, received


EXPECTED_REQUESTS = {
    ("echo", "ok"): 30,
    ("ping", "ok"): 5,
    ("sleep", "ok"): 4,
    ("sleep", "error"): 1,
    ("work", "ok"): 3,
    ("unknown", "error"): 2,
    ("quit", "ok"): 1,
}


def test_counters_match_the_traffic_sent(server):
    sent, received = send_known_traffic(server)
    metrics = wait_for_metrics(server, all_closed)

    exposed_pairs = {
        (labels["command"], labels["outcome"])
        for labels, _ in metrics.matching("arena_requests_total")
    }
    for command, outcome in exposed_pairs | EXPECTED_REQUESTS.keys():
        assert metrics.sum("arena_requests_total", command=command, outcome=outcome) == (
            EXPECTED_REQUESTS.get((command, outcome), 0)
        ), (command, outcome)

    # Every answered request is timed, errors included, under its command.
    for command in ("echo", "ping", "sleep", "work", "unknown", "quit"):
        answered = sum(n for (name, _), n in EXPECTED_REQUESTS.items() if name == command)
        assert metrics.value("arena_request_duration_seconds_count", command=command) == answered
        assert (
            metrics.value("arena_request_duration_seconds_bucket", command=command, le="+Inf")
            == answered
        )

    assert metrics.sum("arena_protocol_errors_total", code="unknown-command") == 2
    assert metrics.sum("arena_protocol_errors_total", code="bad-argument") == 1
    assert metrics.sum("arena_protocol_errors_total", code="line-too-long") == 0
    assert metrics.sum("arena_protocol_errors_total", code="server-busy") == 0

    assert metrics.value("arena_received_bytes_total") == sent
    assert metrics.value("arena_sent_bytes_total") == received

    assert metrics.value("arena_connections_total") == 3
    assert metrics.value("arena_connections_active") == 0
    assert metrics.sum("arena_connections_rejected_total") == 0
    assert metrics.sum("arena_connections_closed_total", reason="client") == 2
    assert metrics.sum("arena_connections_closed_total", reason="quit") == 1
    assert metrics.sum("arena_connections_closed_total") == 3


def test_duration_histogram_shape(server):
    with LineClient(server.address) as client:
        client.send(b"/sleep 1 a\n/sleep 1 b\n/sleep 1 c\n/sleep 1 d\n")
        client.read_lines(4)
    metrics = scrape(server)
    bounds = sorted(
        float(labels["le"])
        for labels, _ in metrics.matching("arena_request_duration_seconds_bucket", command="sleep")
    )
    assert bounds[0] == pytest.approx(25e-6)  # sub-millisecond resolution for loopback echo
    assert bounds[-2] == 60.0 and bounds[-1] == float("inf")
    counts = [
        value
        for _, value in sorted(
            metrics.matching("arena_request_duration_seconds_bucket", command="sleep"),
            key=lambda sample: float(sample[0]["le"]),
        )
    ]
    assert counts == sorted(counts), "buckets must be cumulative"
    # Each /sleep 1 lasted at least a millisecond, so none is in a sub-millisecond bucket.
    assert metrics.value("arena_request_duration_seconds_bucket", command="sleep", le="0.0005") == 0
    assert metrics.value("arena_request_duration_seconds_sum", command="sleep") >= 0.004


def test_model_metrics_and_promtool_after_traffic(server):
    send_known_traffic(server)
    metrics = wait_for_metrics(server, all_closed)
    for name in COMMON_METRICS:
        assert metrics.has(name), f"{name} missing on {server.model}"
    # The registry names each model's own metric families (counters without `_total`).
    model = models.target(server.model)[0]
    for family in model.own_metrics:
        assert family in metrics.types, f"{family} missing on {server.model}"
        assert metrics.has(sample_name(family, metrics.types[family])), family
        if metrics.types[family] == "histogram":
            assert metrics.has(f"{family}_bucket"), family
    for other in models.MODELS:
        for family in set(other.own_metrics) - set(model.own_metrics):
            assert family not in metrics.types, f"{family} exposed on {server.model}"
    assert metrics.types["arena_requests"] == "counter"
    assert metrics.types["arena_request_duration_seconds"] == "histogram"
    assert metrics.types["arena_connections_active"] == "gauge"
    info = metrics.matching("arena_server_info")
    assert len(info) == 1 and info[0][1] == 1
    assert info[0][0]["model"] == model.name
    if model.sized:  # a pool: the default executor, and the size its small run asks for
        workers = model.small_flags[model.small_flags.index("--workers") + 1]
        expected_info = {"executor": "process", "workers": workers}
    else:
        expected_info = {"executor": "none"}
    assert expected_info.items() <= info[0][0].items()
    assert promtool_check(metrics.text) == ""


@pytest.mark.parametrize("model", MODELS)
def test_busy_and_line_too_long_are_counted(server_factory, model):
    server = server_factory(
        model, *small_flags(model), "--max-connections", "1", "--line-limit", "16"
    )
    with LineClient(server.address) as holder:
        assert holder.request(b"/ping") == b"PONG\n"
        with LineClient(server.address) as refused:
            assert refused.read_line().startswith(b"ERR server-busy ")
            assert refused.read_until_closed() == b""
        holder.send(b"q" * 17 + b"\n")
        assert holder.read_line().startswith(b"ERR line-too-long ")
        assert holder.read_until_closed() == b""
    metrics = wait_for_metrics(server, all_closed)
    assert metrics.value("arena_connections_rejected_total", reason="busy") == 1
    assert metrics.value("arena_protocol_errors_total", code="server-busy") == 1
    assert metrics.value("arena_protocol_errors_total", code="line-too-long") == 1
    assert metrics.value("arena_connections_closed_total", reason="line-too-long") == 1
    # Only the served connection counts as accepted; the refused one is a rejection.
    assert metrics.value("arena_connections_total") == 1
    assert promtool_check(metrics.text) == ""


def test_connection_gauges_follow_open_connections(server):
    baseline = scrape(server)
    clients = [LineClient(server.address) for _ in range(4)]
    try:
        for client in clients:
            assert client.request(b"/ping") == b"PONG\n"
        metrics = wait_for_metrics(server, lambda m: m.value("arena_connections_active") == 4)
        if server.model == "threaded":
            # One thread per connection.
            assert metrics.value("arena_threads") >= baseline.value("arena_threads") + 4
        if server.model == "gevent":
            assert metrics.value("arena_greenlets") == 4
        if models.target(server.model)[0].name == "asyncio":
            assert metrics.value("arena_asyncio_transports") == 4
    finally:
        for client in clients:
            client.close()
    wait_for_metrics(server, all_closed)
    # A thread or greenlet ends a moment after its connection is closed: poll for that too.
    if server.model == "threaded":
        wait_for_metrics(
            server, lambda m: m.value("arena_threads") <= baseline.value("arena_threads")
        )
    if server.model == "gevent":
        wait_for_metrics(server, lambda m: m.value("arena_greenlets") == 0)
    if models.target(server.model)[0].name == "asyncio":
        wait_for_metrics(server, lambda m: m.value("arena_asyncio_transports") == 0)


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_pool_gauges_show_queued_requests(server_factory, executor):
    server = server_factory("pool", "--workers", "2", "--executor", executor)
    clients = [LineClient(server.address) for _ in range(4)]
    try:
        for number, client in enumerate(clients):
            client.send(b"/sleep 1500 q%d\n" % number)
        # Four requests, two workers: two run, two wait.
        busy = wait_for_metrics(server, lambda m: m.value("arena_pool_inflight_requests") == 4)
        assert busy.value("arena_pool_busy_workers") == 2
        assert busy.value("arena_pool_queue_depth") == 2
        for number, client in enumerate(clients):
            assert client.read_line() == b"Q%d\n" % number
    finally:
        for client in clients:
            client.close()
    idle = wait_for_metrics(server, lambda m: m.value("arena_pool_inflight_requests") == 0)
    assert idle.value("arena_pool_busy_workers") == 0
    assert idle.value("arena_pool_queue_depth") == 0
    assert idle.value("arena_pool_submissions_total") >= 4
    assert idle.value("arena_pool_workers") == 2


def test_pool_counts_worker_process_cpu(server_factory):
    server = server_factory("pool", "--workers", "2", "--executor", "process")
    with LineClient(server.address) as client:
        # About 100 ms of CPU in a worker process, not in the reactor.
        assert client.request(b"/work 2000000 burnt") == b"BURNT\n"
    wait_for_metrics(server, lambda m: m.value("arena_pool_worker_cpu_seconds_total") > 0)


@pytest.mark.parametrize("model", EVENT_LOOPS)
def test_event_loop_block_is_measured(server_factory, model):
    server = server_factory(model)
    before = scrape(server)
    with LineClient(server.address) as client:
        # Several hundred ms of CPU holding the GIL blocks the whole event loop; the 100 ms
        # probe wakes up far more than 10 ms late.
        assert client.request(b"/work 6000000 blocked") == b"BLOCKED\n"
    after = wait_for_metrics(
        server,
        lambda m: (
            m.value("arena_event_loop_blocks_total") > before.value("arena_event_loop_blocks_total")
        ),
    )
    assert after.value("arena_event_loop_blocked_seconds_total") > before.value(
        "arena_event_loop_blocked_seconds_total"
    )
    assert after.value("arena_event_loop_lag_seconds_count") > before.value(
        "arena_event_loop_lag_seconds_count"
    )


def test_process_metrics_agree_with_the_client_librarys_collector():
    """Our /proc reader (public sources only) names and measures what ProcessCollector does."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.process_collector import ProcessCollector

    from services.metrics import ProcessMetrics

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    ProcessMetrics(registry=ours)
    ProcessCollector(registry=theirs)
    ours_by_name = {family.name: family for family in ours.collect()}
    theirs_by_name = {family.name: family for family in theirs.collect()}
    assert set(ours_by_name) == set(theirs_by_name)
    start = ours_by_name["process_start_time_seconds"].samples[0].value
    assert start == pytest.approx(theirs_by_name["process_start_time_seconds"].samples[0].value)
    assert ours_by_name["process_max_fds"].samples[0].value == (
        theirs_by_name["process_max_fds"].samples[0].value
    )
    assert ours_by_name["process_resident_memory_bytes"].samples[0].value > 0

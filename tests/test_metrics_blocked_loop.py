"""/metrics answers while `/work` blocks the event loop: gevent, asyncio (issue 9, part 2).

The one timing assert in the suite is the issue's own bound: every scrape within 1 s.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from services import protocol
from tests.conftest import EVENT_LOOPS
from tests.server_helpers import LineClient, Metrics, scrape

CLIENTS = 8
WORK_SECONDS = 0.3  # each request holds the loop about this long
SCRAPE_EVERY = 0.2
SCRAPING_FOR = 6.0
SCRAPE_BOUND = 1.0  # the bound on one scrape while the loop is blocked


def rounds_for(seconds: float) -> int:
    """`/work` rounds that take about `seconds` here, measured once in this process."""
    sample = 200_000
    started = time.perf_counter()
    protocol.burn_cpu(sample)
    per_round = (time.perf_counter() - started) / sample
    return min(protocol.MAX_WORK_ROUNDS, int(seconds / per_round))


@pytest.mark.slow
@pytest.mark.parametrize("model", EVENT_LOOPS)
def test_metrics_answer_within_a_second_while_work_blocks_the_loop(server_factory, model):
    server = server_factory(model)
    rounds = rounds_for(WORK_SECONDS)
    before = scrape(server)
    stop = threading.Event()
    replies = [0] * CLIENTS
    failures: list[BaseException] = []

    def keep_the_loop_busy(index: int) -> None:
        try:
            with LineClient(server.address, timeout=60) as client:
                while not stop.is_set():
                    assert client.request(b"/work %d w%d" % (rounds, index)) == b"W%d\n" % index
                    replies[index] += 1
        except BaseException as error:  # reported by the test thread
            failures.append(error)

    workers = [
        threading.Thread(target=keep_the_loop_busy, args=(index,), daemon=True)
        for index in range(CLIENTS)
    ]
    for worker in workers:
        worker.start()
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    durations: list[float] = []
    last_text = ""
    try:
        time.sleep(0.5)  # every client has a /work in the loop's queue
        deadline = time.monotonic() + SCRAPING_FOR
        while time.monotonic() < deadline:
            started = time.monotonic()
            with urllib.request.urlopen(url, timeout=30) as response:
                last_text = response.read().decode()
            durations.append(time.monotonic() - started)
            time.sleep(max(0.0, SCRAPE_EVERY - durations[-1]))
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    assert not failures, failures
    assert sum(replies) >= CLIENTS, replies  # the loop really was busy with /work
    assert len(durations) >= SCRAPING_FOR / (SCRAPE_EVERY + SCRAPE_BOUND)
    assert max(durations) < SCRAPE_BOUND, sorted(durations)[-5:]
    during = Metrics(last_text)  # parsed with text_string_to_metric_families
    assert during.value("arena_event_loop_blocked_seconds_total") > before.value(
        "arena_event_loop_blocked_seconds_total"
    )
    assert during.sum("arena_requests_total", command="work", outcome="ok") > 0

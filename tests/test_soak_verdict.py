"""Soak's verdict (`loadtest.tools.soak.judge`) on synthetic samples: no servers, no Locust."""

from __future__ import annotations

from loadtest.tools.soak import MIB, Samples, ServerSample, growth, judge

WARMUP, DURATION = 10.0, 100.0
BOUNDS = {"max_rss_growth": 32.0, "max_fd_growth": 16}


def series(rss_mib: list[float], fds: list[int] | None = None, errors: float = 0.0):
    """One server's samples every 10 s from t=10, with the given RSS (MiB) and descriptors."""
    fds = fds or [40] * len(rss_mib)
    return [
        ServerSample(
            t=WARMUP + 10.0 * index,
            rss=int(rss * MIB),
            fds=fd,
            threads=5,
            tasks=100,
            connections=100,
            requests=1000.0 * (index + 1),
            request_errors=errors if index == len(rss_mib) - 1 else 0.0,
            protocol_errors=0.0,
            resets=0.0,
        )
        for index, (rss, fd) in enumerate(zip(rss_mib, fds, strict=True))
    ]


def verdict(**servers):
    return judge(Samples(servers=servers), WARMUP, DURATION, **BOUNDS)


def test_a_steady_server_passes_and_its_figures_are_reported():
    figures, problems = verdict(pool=series([50, 51, 50, 52, 50, 51, 50, 51, 50]))
    assert problems == []
    assert abs(figures["pool"]["rss_growth_mib"]) < 2
    assert figures["pool"]["fd_growth"] == 0
    assert figures["pool"]["requests"] == 9000


def test_memory_growth_beyond_the_bound_fails_and_names_the_server():
    # Medians of the first and last thirds: 55 and 110 MiB.
    _figures, problems = verdict(gevent=series([50, 55, 60, 70, 80, 90, 100, 110, 120]))
    assert problems == ["gevent: RSS grew by 55.0 MiB (bound 32 MiB)"]


def test_one_spike_decides_nothing():
    # A single garbage-collection spike in the last third: medians ignore it.
    _figures, problems = verdict(threaded=series([50, 50, 50, 50, 50, 50, 50, 500, 50]))
    assert problems == []


def test_descriptor_growth_beyond_the_bound_fails():
    fds = [40, 40, 40, 60, 60, 60, 80, 80, 80]
    _figures, problems = verdict(pool=series([50] * 9, fds))
    assert problems == ["pool: open descriptors grew by 40 (bound 16)"]


def test_any_error_reply_fails():
    _figures, problems = verdict(pool=series([50] * 9, errors=3))
    assert len(problems) == 1 and "answered 3 requests with an error" in problems[0]


def test_too_few_samples_after_the_warm_up_is_a_problem_not_a_pass():
    _figures, problems = verdict(pool=series([50] * 5))
    assert problems and "only 5 samples after the warm-up" in problems[0]


def test_samples_after_the_load_stopped_are_left_out():
    steady = series([50] * 9)
    after = series([50] * 9 + [400, 400, 400])[9:]  # t=100..120: Locust has stopped
    assert [sample.t for sample in after] == [100.0, 110.0, 120.0]
    _figures, problems = verdict(pool=steady + after[1:])
    assert problems == []


def test_growth_is_the_median_of_the_last_third_minus_the_first():
    assert growth([1, 2, 3, 10, 10, 10, 7, 8, 9]) == 8 - 2
